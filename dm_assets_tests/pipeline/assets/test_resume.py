"""Training runs as an operator meets them: a run killed midway and launched again, two runs at
once on the same device slots, and the exit status of ``python -m dm_assets.launch``.

Every run goes through the real command (``dagster job launch``, the code server, the run
worker, the worker processes) or, for the concurrent runs, ``dg.materialize`` in two processes,
with data, Dagster instance and lock files in ``tmp_path``. The training script is
``dm_assets_tests/scripts/orch_counting.py``: it appends a JSON line when a model begins and
one when it ends (with its device slot, pid and times), so the tests count how often each model
trained and where.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from dm_assets.store.store import Store
from dm_assets_tests.helpers import REPO_ROOT, cli_env

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
MARK_VAR = "DM_ORCH_TEST_MARK"
LAUNCH_TIMEOUT = 120.0


def write_experiment(
    folder: Path,
    name: str,
    *,
    num_models: int,
    per_partition: int,
    args: list[str],
    cpu_workers: int = 2,
    retries: int = 1,
) -> Path:
    """An experiment file ``<folder>/<name>.yaml`` training ``orch_counting`` on CPU slots;
    rows are stored as soon as each model is done (``commit_every: 0``)."""
    path = folder / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            name: {name}
            spec:
              num_models: {num_models}
              schema:
                masks: {{shape: [6], dtype: bool_}}
                margins: {{shape: [2], dtype: float32}}
            trainer:
              main_import: dm_assets_tests.scripts.orch_counting
              args: {json.dumps(args)}
              retries: {retries}
              commit_every: 0
              job_timeout: 60
            models_per_partition: {per_partition}
            devices: {{gpus: none, cpu_workers: {cpu_workers}}}
            """
        )
    )
    return path


def read_records(path: Path) -> tuple[Counter[int], list[dict[str, Any]]]:
    """How many times each index began training, and the records of the models that ended."""
    begun: Counter[int] = Counter()
    ended = []
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "begin" in record:
                begun[record["index"]] += 1
            else:
                ended.append(record)
    return begun, ended


def completed(store: Path) -> set[int]:
    if not (store / "_completed.npy").exists():
        return set()
    with Store.open(store) as opened:
        return {int(i) for i in opened.completed_indices()}


def _marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries ``DM_ORCH_TEST_MARK=<mark>``: everything a launch
    started, whatever its session or process group (the worker processes have their own)."""
    wanted = f"{MARK_VAR}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0"):
            found.append(int(entry))
    return found


def _signal(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


@dataclass
class Launcher:
    """Runs ``python -m dm_assets.launch`` with its own DM_HOME, DAGSTER_HOME and
    DM_EXPERIMENTS under ``root``, each launch in a new process group; every process it
    started (found by an environment mark) is killed at teardown."""

    root: Path
    experiments: list[Path]
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    def env(self) -> dict[str, str]:
        env = cli_env()
        env.update(
            DM_HOME=str(self.home),
            DAGSTER_HOME=str(self.dagster_home),
            DM_EXPERIMENTS=os.pathsep.join(str(p) for p in self.experiments),
            PYTHONUNBUFFERED="1",
        )
        env[MARK_VAR] = self.mark
        return env

    def start(self, *args: str, log: str) -> tuple[subprocess.Popen[bytes], Path]:
        # the output goes to a file, not a pipe: the code server outlives the command
        out = self.root / log
        with open(out, "wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dm_assets.launch", *args],
                cwd=REPO_ROOT,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc, out

    def run(self, *args: str, log: str) -> tuple[int, str]:
        """The command's exit status and output."""
        proc, out = self.start(*args, log=log)
        try:
            code = proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"launch {args} still running after {LAUNCH_TIMEOUT:g} s:\n{tail(out)}")
        return code, out.read_text(errors="replace")

    def kill_all(self) -> None:
        """Stop, then SIGKILL, every process of every launch: the launch command, the code
        server and run worker (its process group) and the worker processes (own sessions).
        Stopping all first means none can start a replacement or store a row meanwhile."""
        for _ in range(20):
            pids = _marked_pids(self.mark)
            groups = [p.pid for p in self.procs if p.poll() is None]
            if not pids and not groups:
                break
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                for pid in groups:
                    _signal(pid, sig, group=True)
                for pid in pids:
                    _signal(pid, sig)
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1)
            time.sleep(0.1)
        left = _marked_pids(self.mark)
        assert not left, f"processes {left} survived SIGKILL"


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


@pytest.fixture
def launcher_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Launcher] = []

    def make(name: str, experiments: list[Path]) -> Launcher:
        launcher = Launcher(tmp_path / name, experiments)
        launcher.root.mkdir(parents=True, exist_ok=True)
        made.append(launcher)
        return launcher

    yield make
    for launcher in made:
        launcher.kill_all()


# ---------------------------------------------------------------------------------------------
# a. a run killed midway, launched again


@dataclass
class KilledAndResumed:
    num_models: int
    done_at_kill: set[int]
    begun_at_kill: Counter[int]
    begun: Counter[int]
    done: set[int]
    resume_code: int
    resume_output: str
    launcher: Launcher


RESUME_MODELS = 60


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KilledAndResumed]:
    """``orch_resume_train`` (60 models, 2 worker processes, 0.08 s each) launched, SIGKILLed
    with every process it started once at least 10 models are stored, then launched again."""
    root = tmp_path_factory.mktemp("resume")
    record = root / "trained.jsonl"
    experiment = write_experiment(
        root,
        "orch_resume",
        num_models=RESUME_MODELS,
        per_partition=30,
        args=[f"--orch.record={record}", "--orch.sleep=0.08"],
    )
    launcher = Launcher(root / "run", [experiment])
    launcher.root.mkdir()
    store = launcher.home / "orch_resume" / "store"
    try:
        proc, out = launcher.start("orch_resume_train", log="first.log")
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while len(completed(store)) < 10:
            if proc.poll() is not None:
                pytest.fail(
                    f"the first run ended ({proc.returncode}) before the kill:\n{tail(out)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"fewer than 10 models stored after {LAUNCH_TIMEOUT:g} s:\n{tail(out)}")
            time.sleep(0.05)
        launcher.kill_all()
        done_at_kill = completed(store)
        begun_at_kill, _ = read_records(record)
        code, output = launcher.run("orch_resume_train", log="second.log")
        begun, _ = read_records(record)
        yield KilledAndResumed(
            num_models=RESUME_MODELS,
            done_at_kill=done_at_kill,
            begun_at_kill=begun_at_kill,
            begun=begun,
            done=completed(store),
            resume_code=code,
            resume_output=output,
            launcher=launcher,
        )
    finally:
        launcher.kill_all()


@pytest.mark.slow
def test_killed_run_resumes_without_retraining_completed_models(
    killed_and_resumed: KilledAndResumed,
) -> None:
    r = killed_and_resumed
    assert 10 <= len(r.done_at_kill) < r.num_models, "the kill came too late to test a resume"
    # the relaunch succeeds and completes every model
    assert r.resume_code == 0, r.resume_output
    assert r.done == set(range(r.num_models))

    # no model stored before the kill began training again
    assert all(r.begun[i] == 1 for i in r.done_at_kill), {
        i: r.begun[i] for i in r.done_at_kill if r.begun[i] != 1
    }
    # the ones trained twice were in flight at the kill, at most one per worker process
    twice = {i for i in range(r.num_models) if r.begun[i] > 1}
    in_flight = {i for i in r.begun_at_kill if i not in r.done_at_kill}
    assert twice <= in_flight
    assert len(in_flight) <= 2, f"more models in flight than worker processes: {in_flight}"
    assert all(r.begun[i] <= 2 for i in range(r.num_models))
    # everything else was trained exactly once, in one run or the other
    assert all(r.begun[i] == 1 for i in set(range(r.num_models)) - twice)


@pytest.mark.slow
def test_resumed_run_reports_the_completed_models_as_skipped(
    killed_and_resumed: KilledAndResumed,
) -> None:
    r = killed_and_resumed
    skipped, trained = len(r.done_at_kill), r.num_models - len(r.done_at_kill)
    summary = re.search(
        r"(\d+) model\(s\): (\d+) trained, (\d+) skipped \(already completed\), (\d+) failed",
        r.resume_output,
    )
    assert summary is not None, r.resume_output
    assert tuple(int(g) for g in summary.groups()) == (r.num_models, trained, skipped, 0)

    # the second run's materializations of model_outputs carry the same counts
    instance = dg.DagsterInstance.from_config(str(r.launcher.dagster_home))
    try:
        records = instance.fetch_materializations(
            dg.AssetKey(["orch_resume", "model_outputs"]), limit=10
        ).records
        assert {rec.partition_key for rec in records} == {"00-29", "30-59"}
        for rec in records:
            materialization = rec.asset_materialization
            assert materialization is not None
            meta = {k: v.value for k, v in materialization.metadata.items()}
            assert (meta["run_models"], meta["run_trained"], meta["run_skipped"]) == (
                r.num_models,
                trained,
                skipped,
            )
            assert meta["run_failed"] == 0
    finally:
        instance.dispose()


@pytest.mark.slow
def test_killed_run_gives_back_its_gpu_pool_slot(killed_and_resumed: KilledAndResumed) -> None:
    r = killed_and_resumed
    instance = dg.DagsterInstance.from_config(str(r.launcher.dagster_home))
    try:
        runs = instance.get_runs()
        killed = [run for run in runs if run.status != dg.DagsterRunStatus.SUCCESS]
        info = instance.event_log_storage.get_concurrency_info("gpu")
        holders = {slot.run_id for slot in info.claimed_slots}
        assert not holders, f"gpu pool slots still claimed by runs {holders}"
        assert all(run.status == dg.DagsterRunStatus.FAILURE for run in killed)
    finally:
        instance.dispose()


# ---------------------------------------------------------------------------------------------
# b. two runs at once never share a device slot


def _materialize_range(
    experiment_file: str, home: str, lock_dir: str, first: str, last: str, barrier: Any, out: Any
) -> None:
    """In a child process: materialize the store and the partitions ``first...last`` with two
    CPU device slots locked in ``lock_dir``; puts (first, succeeded, start, end) on ``out``."""
    from dm_assets.pipeline.assets import experiment_assets
    from dm_assets.pipeline.experiment import load_experiment
    from dm_assets.pipeline.resources.device_slots import DeviceSlotsResource
    from dm_assets.pipeline.resources.experiment_home import HomeResource
    from dm_assets.pipeline.resources.trainers import LocalTrainer

    experiment = load_experiment(experiment_file)
    devices = DeviceSlotsResource(lock_dir=lock_dir, cpu_slots=2)
    resources = {
        "home": HomeResource(path=home),
        "devices": devices,
        "trainer": LocalTrainer(devices=devices, progress_every=0.5),
    }
    assets = [a for a in experiment_assets(experiment) if isinstance(a, dg.AssetsDefinition)]
    selection = [dg.AssetKey([experiment.name, k]) for k in ("store", "model_outputs")]
    barrier.wait(timeout=60)  # both imported: start together
    start = time.time()
    result = dg.materialize(
        assets,
        selection=selection,
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        tags={RANGE_START: first, RANGE_END: last},
    )
    out.put((first, result.success, start, time.time()))


@pytest.mark.slow
def test_concurrent_runs_never_share_a_device_slot(tmp_path: Path) -> None:
    record = tmp_path / "trained.jsonl"
    num_models = 32
    experiment = write_experiment(
        tmp_path,
        "orch_slots",
        num_models=num_models,
        per_partition=16,
        args=[f"--orch.record={record}", "--orch.sleep=0.1"],
    )
    home, locks = tmp_path / "home", tmp_path / "locks"
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(
            target=_materialize_range,
            args=(str(experiment), str(home), str(locks), first, first, barrier, out),
        )
        for first in ("00-15", "16-31")
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = [out.get(timeout=LAUNCH_TIMEOUT) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
            assert proc.exitcode == 0, f"run process exited {proc.exitcode}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    outcomes = [o[1:] for o in sorted(outcomes)]
    assert all(ok for ok, _, _ in outcomes), outcomes
    (_, start_a, end_a), (_, start_b, end_b) = outcomes
    assert max(start_a, start_b) < min(end_a, end_b), "the two runs did not run at the same time"
    assert completed(home / "orch_slots" / "store") == set(range(num_models))

    begun, ended = read_records(record)
    assert sorted(r["index"] for r in ended) == list(range(num_models))
    assert all(n == 1 for n in begun.values())
    by_slot: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ended:
        by_slot[r["slot"]].append(r)
    assert set(by_slot) <= {"cpu:0", "cpu:1"}, set(by_slot)
    # per slot, a worker process's models never overlap in time with another process's
    for slot, records in by_slot.items():
        records.sort(key=lambda r: r["start"])
        for before, after in itertools.pairwise(records):
            if before["pid"] != after["pid"]:
                assert before["end"] <= after["start"], (
                    f"slot {slot}: pid {before['pid']} trained model {before['index']} until "
                    f"{before['end']:.3f} while pid {after['pid']} began model {after['index']} "
                    f"at {after['start']:.3f}"
                )
    # and the runs each wanted two workers: at no moment were more than two models training
    events = sorted(
        [(r["start"], 1) for r in ended] + [(r["end"], -1) for r in ended],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


# ---------------------------------------------------------------------------------------------
# c. the launch command's exit status


@pytest.mark.slow
def test_launch_exit_status_failing_model_and_usage_errors(
    tmp_path: Path, launcher_factory: Any
) -> None:
    experiment = write_experiment(
        tmp_path,
        "orch_fail",
        num_models=8,
        per_partition=4,
        args=["--orch.fail=3", "--orch.sleep=0.01"],
        retries=0,
    )
    launcher: Launcher = launcher_factory("launch", [experiment])
    # the two usage errors need no run: started alongside the failing run
    failing, failing_out = launcher.start("orch_fail_train", log="failing.log")
    bad_key, bad_key_out = launcher.start(
        "orch_fail_train", "--partitions", "99-99", log="bad_key.log"
    )
    bad_job, bad_job_out = launcher.start("no_such_job", log="bad_job.log")
    codes = {}
    for name, proc in (("bad_key", bad_key), ("bad_job", bad_job), ("failing", failing)):
        try:
            codes[name] = proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            launcher.kill_all()
            pytest.fail(f"{name} still running after {LAUNCH_TIMEOUT:g} s")

    output = bad_key_out.read_text()
    assert codes["bad_key"] == 2, output
    assert "'99-99' is not a partition of job 'orch_fail_train'" in output
    assert "(its keys: 0-3, 4-7)" in output

    output = bad_job_out.read_text()
    assert codes["bad_job"] == 2, output
    assert "no job 'no_such_job'" in output
    for job in ("orch_fail_train", "orch_fail_all", "minimal_train", "minimal_all"):
        assert job in output

    output = failing_out.read_text()
    assert codes["failing"] == 1, output
    assert "STEP_FAILURE" in output and "FAILURE" in output.splitlines()[-1]
    assert "still failing after 0 retry round(s): [3]" in output
    assert "model 3: main() raised RuntimeError: model 3 always fails" in output
    # every other model is stored; the partition without model 3 is materialized
    assert completed(launcher.home / "orch_fail" / "store") == set(range(8)) - {3}
