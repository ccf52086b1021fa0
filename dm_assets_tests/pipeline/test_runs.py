"""reap_dead_runs: runs whose recorded run worker process is dead are failed (and their pool
slots freed); a run with no recorded process is never failed for its age once it started (a
healthy long run), only a run stuck STARTING past the instance's run-monitoring start timeout,
as Dagster's own run monitoring does. The shipped instance configurations (runs at once for the
command line, queued for the UI, one storage) and how a launch finds, follows and terminates
the run its worker executes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import EngineEventData

from dm_assets.pipeline import runs
from dm_assets.pipeline.runs import reap_dead_runs

DAY = 86400.0


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as found:
        found.event_log_storage.set_concurrency_slots("gpu", 8)
        yield found


def add_run(
    instance: dg.DagsterInstance, status: dg.DagsterRunStatus, pid: int | None = None
) -> str:
    """A run in ``status`` holding a ``gpu`` slot, its run worker ``pid`` recorded as
    Dagster's launchers record it (an engine event with the pid in its metadata)."""
    run = instance.add_run(dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4()), status=status))
    if pid is not None:
        instance.report_engine_event(
            f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
        )
    instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "fit")
    return run.run_id


def status(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRunStatus:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return run.status


def a_day_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every clock read by the reaper a day ahead: every run is old."""
    now = time.time() + DAY
    monkeypatch.setattr(runs, "_now", lambda: now, raising=False)
    monkeypatch.setattr(runs.time, "time", lambda: now)


def test_healthy_long_run_without_a_recorded_pid_is_left_alone(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = add_run(instance, dg.DagsterRunStatus.STARTED)  # e.g. launched in process
    a_day_later(monkeypatch)
    assert reap_dead_runs(instance) == []
    monkeypatch.undo()
    assert status(instance, started) == dg.DagsterRunStatus.STARTED
    holders = instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
    assert holders == {started}


def test_run_whose_recorded_worker_is_dead_is_failed(instance: dg.DagsterInstance) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass", "dagster"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dagster"])
    try:
        gone = add_run(instance, dg.DagsterRunStatus.STARTED, dead.pid)
        healthy = add_run(instance, dg.DagsterRunStatus.STARTED, alive.pid)
        assert reap_dead_runs(instance) == [gone]
        assert status(instance, gone) == dg.DagsterRunStatus.FAILURE
        assert status(instance, healthy) == dg.DagsterRunStatus.STARTED
        failure = instance.all_logs(gone, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert f"its run worker (pid {dead.pid}) is gone" in (failure[-1].message or "")
        holders = instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
        assert holders == {healthy}
    finally:
        alive.kill()
        alive.wait()


def test_run_stuck_starting_past_the_start_timeout_is_failed(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = add_run(instance, dg.DagsterRunStatus.STARTING)
    assert reap_dead_runs(instance) == []  # within the start timeout
    a_day_later(monkeypatch)
    assert reap_dead_runs(instance) == [fresh]
    monkeypatch.undo()
    assert status(instance, fresh) == dg.DagsterRunStatus.FAILURE
    failure = instance.all_logs(fresh, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert "did not start its run worker within" in (failure[-1].message or "")


def test_the_ui_queues_its_runs_and_the_command_line_needs_no_daemon(tmp_path: Path) -> None:
    """The UI's launch dialog warns about backfills without a queued run coordinator: the UI's
    instance has one (the daemon dequeues every second); the command line's starts runs at
    once (`dagster job launch` in CI, no daemon). Both are one storage: each sees the other's
    runs, and both keep the gpu pool's limit."""
    from dagster._core.run_coordinator import QueuedRunCoordinator

    env = {"DAGSTER_HOME": str(tmp_path / "dagster")}
    cli_home = runs.prepare_dagster_home(dict(env))
    ui_home = runs.prepare_ui_dagster_home(env)
    assert ui_home == cli_home / "ui" and env["DAGSTER_HOME"] == str(ui_home)
    with (
        dg.DagsterInstance.from_config(str(cli_home)) as cli,
        dg.DagsterInstance.from_config(str(ui_home)) as ui,
    ):
        # what the UI's `runQueuingSupported` checks
        assert isinstance(ui.run_coordinator, QueuedRunCoordinator)
        assert ui.run_coordinator.dequeue_interval_seconds == 1
        assert ui.run_coordinator.get_run_queue_config().max_concurrent_runs == 10
        assert not isinstance(cli.run_coordinator, QueuedRunCoordinator)
        for instance in (cli, ui):
            assert instance.get_concurrency_config().pool_config.default_pool_limit == 2
        from_cli = cli.add_run(dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4())))
        from_ui = ui.add_run(dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4())))
        assert ui.get_run_by_id(from_cli.run_id) is not None
        assert cli.get_run_by_id(from_ui.run_id) is not None
        logs = [i.compute_log_manager._base_dir for i in (cli, ui)]  # type: ignore[attr-defined]
        assert logs[0] == logs[1] == str(cli_home / "storage")
    assert not (ui_home / "history").exists()  # no storage of its own
    assert runs._sha256(cli_home / "dagster.yaml") not in runs.EARLIER_SHIPPED_CONFIGS


def test_prepare_dagster_home_replaces_only_an_untouched_earlier_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = "run_coordinator:\n  module: dagster._core.run_coordinator\n"
    edited = earlier + "# mine\n"
    monkeypatch.setattr(
        runs, "EARLIER_SHIPPED_CONFIGS", {hashlib.sha256(earlier.encode()).hexdigest()}
    )
    shipped = runs.SHIPPED_INSTANCE_CONFIG.read_text()
    for text, expected in ((earlier, shipped), (edited, edited)):
        home = tmp_path / str(len(text))
        home.mkdir()
        (home / "dagster.yaml").write_text(text)
        assert runs.prepare_dagster_home({"DAGSTER_HOME": str(home)}) == home.resolve()
        assert (home / "dagster.yaml").read_text() == expected
    fresh = tmp_path / "fresh"
    env = {"DAGSTER_HOME": str(fresh)}
    runs.prepare_dagster_home(env)
    assert (fresh / "dagster.yaml").read_text() == shipped
    assert env["DAGSTER_HOME"] == str(fresh.resolve())


def test_wait_for_run_is_none_when_the_worker_exits_without_a_run(
    instance: dg.DagsterInstance,
) -> None:
    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert runs.wait_for_run(instance, "no-such-launch", worker) is None
    assert worker.returncode == 3


def test_wait_for_run_finds_the_run_by_its_launch_tag(instance: dg.DagsterInstance) -> None:
    run = instance.add_run(
        dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4()), tags={runs.LAUNCH_ID_TAG: "L1"})
    )
    instance.add_run(dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4())))
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert runs.wait_for_run(instance, "L1", worker) == run.run_id
    finally:
        worker.kill()
        worker.wait()


def test_follow_run_fails_a_run_whose_worker_ended_first(instance: dg.DagsterInstance) -> None:
    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    worker.wait()
    run_id = add_run(instance, dg.DagsterRunStatus.STARTED, worker.pid)
    lines: list[str] = []
    code = runs.follow_run(run_id, instance=instance, process=worker, echo=lines.append)
    assert code == runs.EXIT_FAILED
    assert status(instance, run_id) == dg.DagsterRunStatus.FAILURE
    assert f"its run worker (pid {worker.pid}) exited with code 3" in lines[-1]
    assert instance.event_log_storage.get_concurrency_info("gpu").active_run_ids == set()


INTERRUPTIBLE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGINT, lambda *_: sys.exit(130))\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_terminate_run_marks_it_canceling_and_interrupts_its_worker(
    instance: dg.DagsterInstance,
) -> None:
    worker = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE], stdout=subprocess.PIPE)
    assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"
    run_id = add_run(instance, dg.DagsterRunStatus.STARTED, worker.pid)
    said: list[str] = []
    runs.terminate_run(instance, run_id, process=worker, warn=said.append)
    assert worker.returncode == 130  # interrupted, and waited for
    assert status(instance, run_id) == dg.DagsterRunStatus.CANCELING
    assert said == [f"interrupted: terminating run {run_id}"]
    # a finished run is left alone
    instance.report_run_failed(instance.get_run_by_id(run_id))  # type: ignore[arg-type]
    runs.terminate_run(instance, run_id, process=worker, warn=said.append)
    assert len(said) == 1


RACER = """
import sys, time
import dagster  # noqa: F401  (imported before the start line, so the openings coincide)
from dm_assets.pipeline.runs import open_instance
start = float(sys.argv[1])
while time.time() < start:
    pass
with open_instance() as instance:
    print(instance.get_runs_count())
"""


def alembic_heads(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as connection:
        return int(connection.execute("select count(*) from alembic_version").fetchone()[0])


def test_processes_opening_a_new_instance_at_once_create_its_storage_once(
    tmp_path: Path,
) -> None:
    # Dagster's own first opening is not safe against another: two processes opening a new
    # SQLite instance at the same moment left two Alembic heads in a database (no process
    # could open the instance again) or failed with "table ... already exists", 2 of 10 tries
    # with two processes here before open_instance
    homes = [tmp_path / f"home{i}" for i in range(2)]
    procs = []
    start = time.time() + 12.0  # every racer has imported Dagster by then, even on 2 busy cores
    for home in homes:
        runs.prepare_dagster_home({"DAGSTER_HOME": str(home)})
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        for _ in range(3):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", RACER, str(start)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    assert all(out.strip().splitlines()[-1] == "0" for out in outputs), outputs
    for home in homes:
        for name in runs.SQLITE_STORAGE_FILES:
            assert alembic_heads(home / name) == 1, (home, name)
        assert (home / runs.STORAGE_READY_MARKER).read_text().strip() == hashlib.sha256(
            (home / "dagster.yaml").read_bytes()
        ).hexdigest()


def test_a_ready_instance_is_not_created_again_and_an_edited_config_is(tmp_path: Path) -> None:
    home = runs.prepare_dagster_home({"DAGSTER_HOME": str(tmp_path / "home")})
    runs.ensure_instance_storage(home)
    assert runs._storage_ready(home)
    # ready: nothing imports Dagster or takes the lock (checked in a process without Dagster)
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from dm_assets.pipeline.runs import ensure_instance_storage; "
            f"ensure_instance_storage({str(home)!r}); print('dagster' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip() == "False"
    # an edited configuration, or storage files removed, is checked (and created) again
    with open(home / "dagster.yaml", "a") as config:
        config.write("\n# edited\n")
    assert not runs._storage_ready(home)
    runs.ensure_instance_storage(home)
    assert runs._storage_ready(home)
    (home / "schedules" / "schedules.db").unlink()
    assert not runs._storage_ready(home)
    runs.ensure_instance_storage(home)
    assert alembic_heads(home / "schedules" / "schedules.db") == 1
