"""``python -m dm_assets.launch``: interrupting it terminates the Dagster run, and the run's
worker processes end with it; a fit without trained models fails with a clear message; runs
whose worker process is gone are reaped before a launch (:mod:`dm_assets.pipeline.runs`); a
launch needs no daemon (the UI's instance queues its runs for one; the command line's does not)
(:mod:`dm_assets.pipeline.run_worker`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import EngineEventData

from dm_assets.pipeline.runs import partition_tags, reap_dead_runs
from dm_assets.store.store import Store
from dm_assets_tests.helpers import REPO_ROOT, cli_env, sigint_default

SLEEPY = """
name: sleepy
spec:
  num_models: 40
  schema:
    masks: {shape: [4], dtype: bool_}
    margins: {shape: [1], dtype: float32}
trainer:
  main_import: dm_assets_tests.scripts.sleepy
models_per_partition: 10
max_partitions_per_run: 4
devices: {gpus: none, cpu_workers: 2}
regression:
  data: {num_train: 20, num_val: 10}
  cfg: {k: 5, batch_size: 10, device: cpu, num_workers: 1}
"""


def environment(tmp_path: Path) -> dict[str, str]:
    experiments = tmp_path / "experiments"
    experiments.mkdir(exist_ok=True)
    (experiments / "sleepy.yaml").write_text(SLEEPY)
    return {
        **cli_env(),
        "DM_HOME": str(tmp_path / "home"),
        "DM_EXPERIMENTS": str(experiments),
        "DAGSTER_HOME": str(tmp_path / "home" / "dagster"),
        "SLEEPY_SECONDS": "0.4",
    }


def finished_run(instance: dg.DagsterInstance, run_id: str, *, seconds: float) -> dg.DagsterRun:
    """Run ``run_id`` once it has finished (waiting at most ``seconds``)."""
    deadline = time.monotonic() + seconds
    while (run := instance.get_run_by_id(run_id)) is None or not run.is_finished:
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    return run


def processes_mentioning(text: str) -> list[int]:
    """Live processes (not zombies) whose command line or environment mentions ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "status").read_text()
            if re.search(r"^State:\s+Z", status, re.M):
                continue
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(entry.name))
    return found


def test_partition_tags() -> None:
    keys = ["00-09", "10-19", "20-29"]
    assert partition_tags("j", keys, "all") == {
        "dagster/asset_partition_range_start": "00-09",
        "dagster/asset_partition_range_end": "20-29",
    }
    assert partition_tags("j", keys, "10-19")["dagster/asset_partition_range_end"] == "10-19"
    with pytest.raises(ValueError, match="not a partition"):
        partition_tags("j", keys, "10-20")
    with pytest.raises(ValueError, match="backwards"):
        partition_tags("j", keys, "20-29...00-09")
    with pytest.raises(ValueError, match="no partitions"):
        partition_tags("j", [], "00-09")


def sleeping_process(*extra: str) -> subprocess.Popen[bytes]:
    """A real process that sleeps; ``extra`` ends its command line (``dagster`` there makes it
    look like a run worker to the reaper, which checks the command line against reused pids)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *extra])


def started_run(instance: dg.DagsterInstance, pid: int | None) -> str:
    """A STARTED run whose log records its run worker ``pid`` as Dagster's launcher does, and
    that holds a slot of the ``gpu`` pool."""
    run = instance.add_run(
        dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED)
    )
    if pid is not None:
        instance.report_engine_event(
            f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
        )
    instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "fit")
    return run.run_id


def test_reap_dead_runs_fails_runs_whose_worker_is_gone(tmp_path: Path) -> None:
    dead = sleeping_process("dagster")
    dead.kill()
    dead.wait()  # gone, not a zombie
    healthy = sleeping_process("dagster")
    reused = sleeping_process()  # alive, but not a run worker: its pid was reused
    try:
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            instance.event_log_storage.set_concurrency_slots("gpu", 8)
            gone = started_run(instance, dead.pid)
            alive = started_run(instance, healthy.pid)
            not_ours = started_run(instance, reused.pid)
            starting = started_run(instance, None)  # no process recorded yet, within grace
            finished = started_run(instance, dead.pid)
            instance.report_run_failed(instance.get_run_by_id(finished))

            slots = instance.event_log_storage.get_concurrency_info("gpu")
            assert slots.active_run_ids == {gone, alive, not_ours, starting, finished}

            assert sorted(reap_dead_runs(instance)) == sorted([gone, not_ours])

            status = {
                run_id: instance.get_run_by_id(run_id).status  # type: ignore[union-attr]
                for run_id in (gone, alive, not_ours, starting, finished)
            }
            assert status == {
                gone: dg.DagsterRunStatus.FAILURE,
                alive: dg.DagsterRunStatus.STARTED,
                not_ours: dg.DagsterRunStatus.FAILURE,
                starting: dg.DagsterRunStatus.STARTED,
                finished: dg.DagsterRunStatus.FAILURE,
            }
            failure = instance.all_logs(gone, of_type=dg.DagsterEventType.RUN_FAILURE)
            assert f"its run worker (pid {dead.pid}) is gone" in failure[-1].message
            # the reaped runs' pool slots are free; the others keep theirs
            holders = instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
            assert holders == {alive, starting, finished}
            assert healthy.poll() is None and reused.poll() is None  # nothing was killed
            assert reap_dead_runs(instance) == []  # a second pass finds nothing more
    finally:
        for proc in (healthy, reused):
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_interrupting_launch_terminates_the_run_and_its_workers(tmp_path: Path) -> None:
    env = environment(tmp_path)
    launch = subprocess.Popen(
        [sys.executable, "-m", "dm_assets.launch", "sleepy_train"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_default,
    )
    store_dir = tmp_path / "home" / "sleepy" / "store"
    deadline = time.monotonic() + 120
    while True:
        if store_dir.joinpath("_completed.npy").exists():
            with Store.open(store_dir) as store:
                if len(store.completed_indices()) >= 2:
                    break
        assert launch.poll() is None, launch.communicate()[0]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    launch.send_signal(signal.SIGINT)
    output, _ = launch.communicate(timeout=120)
    assert launch.returncode != 0, output
    run_id = re.search(r"as run ([0-9a-f-]{36})", output)
    assert run_id is not None, output
    assert "terminating run" in output

    # the run ends canceled, and nothing it started keeps running
    from dagster import DagsterInstance, DagsterRunStatus

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        instance = DagsterInstance.get()
        deadline = time.monotonic() + 60
        while True:
            run = instance.get_run_by_id(run_id[1])
            assert run is not None
            left = processes_mentioning(str(tmp_path))
            if run.status == DagsterRunStatus.CANCELED and not left:
                break
            assert time.monotonic() < deadline, (run.status, left)
            time.sleep(0.5)
    finally:
        os.environ.pop("DAGSTER_HOME", None)
    with Store.open(store_dir) as store:
        done = store.completed_indices()
        margins = store.read("margins")
        assert 2 <= len(done) < 40
        assert [float(margins[i, 0]) for i in done] == [float(i) for i in done]


def test_fit_without_trained_models_fails_clearly(tmp_path: Path) -> None:
    env = environment(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "dm_assets.launch", "sleepy_fit", "--quiet"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "STEP_FAILURE" in proc.stdout
    assert "store" in proc.stdout.lower()


def test_a_bad_experiment_file_is_reported_without_a_traceback(tmp_path: Path) -> None:
    env = environment(tmp_path)
    bad = SLEEPY.replace("num_models: 40", "num_models: 10").replace(
        "models_per_partition: 10", "models_per_partition: 0"
    )
    (tmp_path / "experiments" / "sleepy.yaml").write_text(bad)
    for argv in (["sleepy_all"], ["--list"]):
        proc = subprocess.run(
            [sys.executable, "-m", "dm_assets.launch", *argv],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, output
        assert "Traceback" not in output, output
        assert f"experiment file {tmp_path / 'experiments' / 'sleepy.yaml'}" in proc.stderr
        # every problem of the file, at once
        assert "field models_per_partition" in proc.stderr, output
        assert "num_train + num_val = 20 + 10 = 30 is more than" in proc.stderr, output
        # caught in this process, before any run was submitted
        assert not (tmp_path / "home" / "dagster" / "launch_logs").exists()


def test_no_wait_returns_once_started_and_the_run_goes_on_without_a_daemon(
    tmp_path: Path,
) -> None:
    """A launch executes its run itself: no daemon runs here, and the run of two partitions
    (one run) still succeeds."""
    env = {**environment(tmp_path), "SLEEPY_SECONDS": "0.01"}
    launch = [sys.executable, "-m", "dm_assets.launch", "sleepy_train"]
    proc = subprocess.run(
        [*launch, "--partitions", "10-19...20-29", "--no-wait"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"as run ([0-9a-f-]{36})", proc.stdout)
    assert found is not None, proc.stdout
    run_id = found[1]
    home = Path(env["DAGSTER_HOME"])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = finished_run(instance, run_id, seconds=120)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/asset_partition_range_start"] == "10-19"
        assert run.tags["dagster/asset_partition_range_end"] == "20-29"
        assert [r.run_id for r in instance.get_runs()] == [run_id]
    # the output of the run's processes, under the run's id
    assert (home / "launch_logs" / f"{run_id}.log").stat().st_size > 0
    with Store.open(tmp_path / "home" / "sleepy" / "store") as store:
        assert list(store.completed_indices()) == list(range(10, 30))


def test_run_worker_refuses_an_unknown_job(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dm_assets.pipeline.run_worker", "nope", "--tags", "{}"],
        cwd=REPO_ROOT,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no job 'nope'; the jobs are: " in proc.stderr
    assert "sleepy_train" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dagster_job_launch_runs_at_once_without_a_daemon(tmp_path: Path) -> None:
    """CI may use Dagster's own command: on the shipped instance `dagster job launch` starts the
    run at once (no daemon runs here) and it succeeds; the UI's queued instance is separate."""
    from dm_assets.pipeline.runs import prepare_dagster_home

    env = {**environment(tmp_path), "SLEEPY_SECONDS": "0.01"}
    home = prepare_dagster_home(env)
    tags = json.dumps(partition_tags("sleepy_train", ["00-09"], "all"))
    dagster = Path(sys.executable).parent / "dagster"
    workspace = str(REPO_ROOT / "workspace.yaml")
    proc = subprocess.run(
        [str(dagster), "job", "launch", "-w", workspace, "-j", "sleepy_train", "--tags", tags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        launched = instance.get_runs()[0]
        run = finished_run(instance, launched.run_id, seconds=240)
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
    with Store.open(Path(env["DM_HOME"]) / "sleepy" / "store") as store:
        assert set(store.completed_indices().tolist()) == set(range(10))
