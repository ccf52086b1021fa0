"""Dagster runs of the experiments' jobs, from outside Dagster: what ``python -m dm_assets.launch``
does.

- :func:`prepare_dagster_home`: ``$DAGSTER_HOME`` (default ``$DM_HOME/dagster``), with the
  shipped instance configuration ``dm_assets/dagster.yaml`` copied in when it has none (or an
  untouched copy of an earlier shipped one);
- :func:`job_partition_keys`: every experiment's jobs and their partition keys
  (:func:`dm_assets.pipeline.jobs.job_specs`); :func:`partition_tags`: the run tags selecting
  some of them;
- :func:`start_run`: a run worker process (:mod:`dm_assets.pipeline.run_worker`) executing one
  run in itself, its output to :func:`launch_log_path`; :func:`wait_for_run`: the run's id
  once the worker has created it;
- :func:`follow_run`: a run's log, line by line, until it ends, and its exit status;
- :func:`terminate_run`: stop a run and the processes it started;
- :func:`reap_dead_runs`: mark failed the runs whose run worker process is gone.

- :func:`ensure_instance_storage`, :func:`open_instance`: the instance's storage created by one
  process at a time (Dagster's first-time SQLite set-up is not safe against a concurrent one);
- :func:`prepare_ui_dagster_home`: the UI's instance, ``$DAGSTER_HOME/ui``: the same storage
  with a queued run coordinator for the daemon that ``dagster dev`` runs.

Two instances on one storage: the command line's (``$DAGSTER_HOME``) starts runs at once
(``DefaultRunCoordinator``), so ``dagster job launch`` works where no daemon runs (CI); the UI's
queues its runs and backfills for the daemon (``QueuedRunCoordinator``), as Dagster advises for
backfills. Both see every run. The launch executes its run in a process of its own (no code
server): the definitions load once instead of twice, and the run is recorded in the same
storage, where the UI shows it.

Lines meant for a person (the run's log, warnings) go to the ``echo`` / ``warn`` callables the
caller passes (the command line prints them), by default to this module's logger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dm_assets.home import dm_home

logger = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_TIMEOUT = 124
SHIPPED_INSTANCE_CONFIG = Path(__file__).resolve().parent.parent / "dagster.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
# the tag by which a launch finds the run its worker created
LAUNCH_ID_TAG = "dm_assets/launch_id"
# sha256 of the instance configurations shipped before this one: a DAGSTER_HOME holding an
# untouched copy of one gets the current one (an edited copy is the user's and kept)
EARLIER_SHIPPED_CONFIGS = frozenset(
    {
        "aa69bd8ea0bf37453d9bcf81e88aa6c202d70ead852e67c332422fb9f10f0a9c",
        "e1d0f8d5cf73a796c49a6f605dab065f1afc0086bef73bfc32fa81ac20b84c79",
    }
)
# how long a terminated run worker gets to unwind (its training workers get 5 s after SIGTERM)
# before it is killed
TERMINATE_WAIT_SECONDS = 60.0

Echo = Callable[[str], None]


def prepare_dagster_home(environ: dict[str, str] | None = None) -> Path:
    """``$DAGSTER_HOME``, or ``$DM_HOME/dagster`` set in ``environ`` (default ``os.environ``);
    the shipped ``dagster.yaml`` is copied there when the folder has none, or has an untouched
    copy of an earlier shipped one (:data:`EARLIER_SHIPPED_CONFIGS`; a copy someone edited is
    left alone)."""
    env = os.environ if environ is None else environ
    home = Path(env.get("DAGSTER_HOME") or dm_home() / "dagster").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or _sha256(config) in EARLIER_SHIPPED_CONFIGS:
        if config.exists():
            logger.info("%s: replacing an earlier shipped instance configuration", config)
        tmp = home / f".dagster.yaml.{uuid.uuid4().hex[:8]}"
        shutil.copyfile(SHIPPED_INSTANCE_CONFIG, tmp)
        os.replace(tmp, config)
    env["DAGSTER_HOME"] = str(home)
    return home


# written into $DAGSTER_HOME once its storage exists, holding the sha256 of the dagster.yaml
# it was created for
STORAGE_READY_MARKER = ".dm_storage_ready"
STORAGE_LOCK = ".dm_storage.lock"
# what Dagster's default SQLite storage creates in $DAGSTER_HOME
SQLITE_STORAGE_FILES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")
_CUSTOM_STORAGE = re.compile(
    r"^(storage|run_storage|event_log_storage|schedule_storage)\s*:", re.MULTILINE
)


def _storage_ready(home: Path) -> bool:
    config = home / "dagster.yaml"
    marker = home / STORAGE_READY_MARKER
    try:
        data = config.read_bytes()
        if marker.read_text().strip() != hashlib.sha256(data).hexdigest():
            return False
    except OSError:
        return False
    text = data.decode(errors="replace")
    # a storage the configuration names elsewhere (Postgres) has no files here to look for
    return bool(_CUSTOM_STORAGE.search(text)) or all(
        (home / name).is_file() for name in SQLITE_STORAGE_FILES
    )


def ensure_instance_storage(home: Path | None = None) -> Path:
    """Create the storage of the Dagster instance at ``home`` (default ``$DAGSTER_HOME``) if
    it does not exist yet, one process at a time; ``home``.

    Dagster creates its SQLite databases the first time an instance is opened, and two
    processes doing that at once (the launch and its run worker, the webserver and the daemon
    of ``dagster dev``, two launches) can leave a database with two Alembic heads, which no
    later process can open ("Version table 'alembic_version' has more than one head
    present"), or fail outright ("table ... already exists"). Every dm_assets process opens
    its instance after this: the first creates the storage under an exclusive lock
    (``$DAGSTER_HOME/.dm_storage.lock``) and marks it ready; the rest wait for the lock, or
    see the mark and do not import Dagster here at all."""
    home = Path(home if home is not None else os.environ["DAGSTER_HOME"]).resolve()
    if _storage_ready(home):
        return home
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    with open(home / STORAGE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _storage_ready(home):
            return home
        from dagster import DagsterInstance

        with DagsterInstance.from_config(str(home)):
            pass  # opening it creates and migrates every storage it has
        tmp = home / f".{STORAGE_READY_MARKER}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(_sha256(home / "dagster.yaml") + "\n")
        os.replace(tmp, home / STORAGE_READY_MARKER)
    return home


def open_instance() -> Any:
    """The Dagster instance at ``$DAGSTER_HOME``, its storage created first if need be
    (:func:`ensure_instance_storage`): what every dm_assets process opens instead of
    ``DagsterInstance.get()``."""
    from dagster import DagsterInstance

    ensure_instance_storage()
    return DagsterInstance.get()


UI_INSTANCE_FOLDER = "ui"


def prepare_ui_dagster_home(environ: dict[str, str] | None = None) -> Path:
    """The UI's Dagster instance, ``<command-line instance>/ui`` (see
    :func:`prepare_dagster_home`), set as ``DAGSTER_HOME`` in ``environ``.

    Its ``dagster.yaml`` is written on every call from the command line's: the same storage
    (its SQLite folders, artifacts and compute logs, unless that file names its own storage),
    pool limits and run monitoring, with Dagster's ``QueuedRunCoordinator`` (the daemon of
    ``dagster dev`` starts queued runs, looking every second). Runs launched by either instance
    are runs of both.
    """
    import yaml

    base = prepare_dagster_home(environ)
    # the webserver and the daemon open the storage at once: create it before either starts
    ensure_instance_storage(base)
    env = os.environ if environ is None else environ
    config = yaml.safe_load((base / "dagster.yaml").read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{base / 'dagster.yaml'} is not a YAML mapping: fix or remove it")
    config["run_coordinator"] = {
        "module": "dagster._core.run_coordinator",
        "class": "QueuedRunCoordinator",
        "config": {"dequeue_interval_seconds": 1},
    }
    concurrency = config.setdefault("concurrency", {})
    concurrency.setdefault("runs", {}).setdefault("max_concurrent_runs", 10)
    if not any(key in config for key in ("storage", "run_storage", "event_log_storage")):
        config["storage"] = {"sqlite": {"base_dir": str(base)}}
    config.setdefault(
        "local_artifact_storage",
        {
            "module": "dagster._core.storage.root",
            "class": "LocalArtifactStorage",
            "config": {"base_dir": str(base)},
        },
    )
    config.setdefault(
        "compute_logs",
        {
            "module": "dagster._core.storage.local_compute_log_manager",
            "class": "LocalComputeLogManager",
            "config": {"base_dir": str(base / "storage")},
        },
    )
    home = base / UI_INSTANCE_FOLDER
    home.mkdir(exist_ok=True)
    header = (
        f"# Written by dm_assets.ui from {base / 'dagster.yaml'} on every start: edit that file.\n"
        "# The UI's instance: the same storage, its runs queued for the daemon.\n"
    )
    tmp = home / f".dagster.yaml.{uuid.uuid4().hex[:8]}"
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, home / "dagster.yaml")
    env["DAGSTER_HOME"] = str(home)
    return home


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def job_partition_keys() -> dict[str, list[str]]:
    """Every experiment's jobs and their partition keys (empty: not partitioned), read from
    the experiment files through the one table of jobs the definitions are built from
    (:func:`dm_assets.pipeline.jobs.job_specs`), without loading Dagster."""
    from dm_assets.pipeline.experiment import load_experiments
    from dm_assets.pipeline.jobs import job_specs

    out: dict[str, list[str]] = {}
    for experiment in load_experiments():
        out.update({spec.name: list(spec.partition_keys) for spec in job_specs(experiment)})
    return out


def partition_tags(job: str, keys: list[str], selection: str) -> dict[str, str]:
    """The range tags that make a run of ``job`` cover ``selection`` of ``keys``."""
    if not keys:
        if selection != "all":
            raise ValueError(f"job {job!r} has no partitions; leave out --partitions")
        return {}
    if selection == "all":
        first, last = keys[0], keys[-1]
    else:
        first, sep, last = selection.partition("...")
        last = last if sep else first
        for key in (first, last):
            if key not in keys:
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                raise ValueError(f"{key!r} is not a partition of job {job!r} (its keys: {shown})")
        if keys.index(first) > keys.index(last):
            raise ValueError(f"partition range {selection!r} runs backwards: use FIRST...LAST")
    return {RANGE_START: first, RANGE_END: last}


def launch_log_path(name: str) -> Path:
    """``$DAGSTER_HOME/launch_logs/<name>.log`` (its folder created): the output of a run
    worker and of the processes it starts."""
    path = Path(os.environ["DAGSTER_HOME"]) / "launch_logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def start_run(job: str, tags: dict[str, str], *, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a run worker (:mod:`dm_assets.pipeline.run_worker`) executing one run of ``job``
    with ``tags``, its output (and that of the processes it starts, which inherit it) appended
    to ``log_path``. It runs in a session of its own, so a terminal's Ctrl-C reaches only the
    caller, which terminates the run in order (:func:`terminate_run`); it keeps running when
    the caller exits."""
    command = [
        sys.executable,
        "-m",
        "dm_assets.pipeline.run_worker",
        job,
        "--tags",
        json.dumps(tags),
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def wait_for_run(
    instance: Any, launch_id: str, process: subprocess.Popen[bytes], *, poll: float = 0.1
) -> str | None:
    """The id of the run tagged :data:`LAUNCH_ID_TAG` = ``launch_id`` once ``process`` (its run
    worker) has created it; None when the process ended without creating it (its log says
    why: a broken import, say)."""
    from dagster import RunsFilter

    runs_filter = RunsFilter(tags={LAUNCH_ID_TAG: launch_id})
    while True:
        ended = process.poll() is not None
        found = instance.get_runs(filters=runs_filter, limit=1)
        if found:
            return str(found[0].run_id)
        if ended:
            return None
        time.sleep(poll)


_SHOWN = {
    "LOG",
    "RUN_START",
    "RUN_SUCCESS",
    "RUN_FAILURE",
    "RUN_CANCELED",
    "STEP_SUCCESS",
    "STEP_FAILURE",
    "ASSET_MATERIALIZATION",
    "ASSET_CHECK_EVALUATION",
}
_FAILURES = {"STEP_FAILURE", "RUN_FAILURE", "RUN_CANCELED", "RUN_SUCCESS"}


def event_line(entry: Any, quiet: bool) -> str | None:
    """The line showing one event log entry of a run, or None when it is not shown (``quiet``:
    only failures and the run's end)."""
    event = entry.dagster_event
    kind = event.event_type_value if event is not None else "LOG"
    if kind not in _SHOWN or (quiet and kind not in _FAILURES):
        return None
    stamp = time.strftime("%H:%M:%S", time.localtime(entry.timestamp))
    where = f" {entry.step_key}" if entry.step_key else ""
    message = entry.user_message or ""
    if event is not None and kind == "STEP_FAILURE":
        error = event.step_failure_data.error if event.step_failure_data else None
        while error is not None:  # the wrapper's message, then what the asset raised
            message = f"{message}\n{error.message.rstrip()}"
            error = error.cause
    elif event is not None and kind == "ASSET_CHECK_EVALUATION":
        data = event.event_specific_data
        message = (
            f"check {data.asset_check_key.name} on {data.asset_key.to_user_string()}: "
            f"{'passed' if data.passed else 'FAILED'}"
        )
        if not data.passed and data.severity.value == "WARN":
            message += " (a warning)"
    return f"{stamp}{where} {kind}: {message}"


_UNFINISHED = ("STARTING", "STARTED", "CANCELING")


# what a run worker's command line holds: Dagster's (``dagster api execute_run``) or ours
_RUN_WORKER_MARKS = (b"dagster", b"dm_assets.pipeline.run_worker")


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process of this machine running a run worker
    (its command line is checked: the pid of a dead worker may have been reused)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if re.search(r"^State:\s+Z", status, re.M):
        return False
    return any(mark in cmdline for mark in _RUN_WORKER_MARKS)


def reap_dead_runs(instance: Any) -> list[str]:
    """Mark failed every unfinished run whose run worker process is gone (killed, OOM, the
    machine rebooted), and free the ``gpu`` pool slots it claimed. Returns the run ids reaped.

    Without the daemon's run monitoring nothing else does: a SIGKILLed run would stay STARTED
    and keep its pool slots forever, and once the pool's limit is reached every later training
    or fitting step waits forever. Assumes the instance's runs ran on this machine (what the
    shipped configuration's default run launcher and :func:`start_run` do).

    A run's worker is the process Dagster's launchers record when they start it (the ``pid``
    in the metadata of that engine event: :func:`run_worker_pids`). A run with a recorded
    worker is failed when none of its workers is alive. A run with none recorded is left
    alone once it has started (its worker may be this very process, or another machine's; a
    healthy long run is never failed for its age); only a run still ``STARTING`` longer than
    the instance's ``run_monitoring.start_timeout_seconds`` after its launch is failed, as
    Dagster's run monitoring does.
    """
    from dagster import DagsterRunStatus, RunsFilter

    statuses = [DagsterRunStatus[name] for name in _UNFINISHED]
    timeout = float(instance.run_monitoring_start_timeout_seconds)
    reaped = []
    for run in instance.get_runs(filters=RunsFilter(statuses=statuses)):
        pids = run_worker_pids(instance, run.run_id)
        if pids:
            if any(_alive(pid) for pid in pids):
                continue
            why = f"its run worker (pid {pids[-1]}) is gone: killed, out of memory, or rebooted"
        elif run.status == DagsterRunStatus.STARTING:
            launched = instance.get_run_stats(run.run_id).launch_time
            if launched is None:
                record = instance.get_run_record_by_id(run.run_id)
                launched = record.create_timestamp.timestamp() if record else time.time()
            if time.time() - launched < timeout:
                continue
            why = f"it did not start its run worker within {timeout:g} s of its launch"
        else:
            continue
        _fail(instance, run, why)
        reaped.append(run.run_id)
    return reaped


def _fail(instance: Any, run: Any, why: str) -> None:
    """Mark ``run`` failed because of ``why`` and free the pool slots it claimed."""
    instance.report_run_failed(run, message=f"dm_assets.launch: marked failed: {why}")
    # what the daemon's run monitoring does for a finished run (free_slots_after_run_end)
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


def run_worker_pids(instance: Any, run_id: str) -> list[int]:
    """The process ids of the run's workers, in the order they started: the ``pid`` that
    Dagster's launchers put in the metadata of the engine event reporting a started run
    worker (``EngineEventData.in_process``), not parsed from the message. Events of a step
    (a step's own subprocess) are passed over."""
    from dagster import DagsterEventType

    pids = []
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT)
    for record in records.records:
        if record.event_log_entry.step_key is not None:
            continue
        event = record.event_log_entry.dagster_event
        data = event.engine_event_data if event is not None else None
        value = data.metadata.get("pid") if data is not None else None
        text = getattr(value, "value", None)
        if isinstance(text, str) and text.isdigit():
            pids.append(int(text))
    return pids


def terminate_run(
    instance: Any,
    run_id: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    warn: Echo = logger.warning,
) -> None:
    """Stop run ``run_id`` as Ctrl-C would: its steps unwind, and the training launchers end
    their worker processes and cancel their SLURM jobs; the run ends canceled.

    ``process``: the run worker :func:`start_run` started; it is marked canceling, interrupted
    (SIGINT) and waited for, at most :data:`TERMINATE_WAIT_SECONDS` (then killed). Without it
    (a run the daemon launched), through the instance's run launcher (the code server that
    started it), else, when that server is gone, by interrupting the run worker processes
    recorded in the run's log. ``warn`` receives what is done."""
    run = instance.get_run_by_id(run_id)
    if run is None or run.is_finished:
        return
    warn(f"interrupted: terminating run {run_id}")
    if process is not None:
        if process.poll() is None:
            instance.report_run_canceling(run)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=TERMINATE_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                warn(
                    f"its run worker (pid {process.pid}) did not end within "
                    f"{TERMINATE_WAIT_SECONDS:g} s of the interrupt: killed"
                )
                process.kill()
                process.wait()
        return
    try:
        if instance.run_launcher.terminate(run_id):
            return
    except Exception as exc:  # the code server may have shut down meanwhile
        warn(f"the run launcher could not terminate it ({exc}); interrupting its process")
    for pid in run_worker_pids(instance, run_id):
        if _alive(pid):
            os.kill(pid, signal.SIGINT)


def follow_run(
    run_id: str,
    *,
    instance: Any = None,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float | None = None,
    poll: float = 0.25,
    quiet: bool = False,
    terminate_on_interrupt: bool = True,
    echo: Echo = logger.info,
    warn: Echo = logger.warning,
) -> int:
    """Pass the run's log to ``echo`` line by line until the run ends; its exit status: 0 when
    it succeeded, :data:`EXIT_FAILED` when it failed or was canceled, :data:`EXIT_TIMEOUT`
    when ``timeout`` seconds passed first (the run is then terminated). ``process``: the run's
    worker (:func:`start_run`), when this caller started it: terminating interrupts it, and
    when it ends before the run does (killed, out of memory) the run is marked failed. Ctrl-C
    terminates the run unless ``terminate_on_interrupt`` is false (the caller does it);
    ``warn`` receives what terminating does."""
    from dagster import DagsterRunStatus

    terminal = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    instance = instance if instance is not None else open_instance()
    cursor = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            # read before the run: a worker that has ended wrote everything it will write
            exit_code = process.poll() if process is not None else None
            run = instance.get_run_by_id(run_id)
            if run is None:
                echo(f"error: run {run_id} is not in the instance at {instance.root_directory}")
                return EXIT_FAILED
            while True:
                conn = instance.get_records_for_run(run_id, cursor=cursor, limit=500)
                for record in conn.records:
                    line = event_line(record.event_log_entry, quiet)
                    if line is not None:
                        echo(line)
                cursor = conn.cursor
                if not conn.has_more:
                    break
            if run.status in terminal:
                break
            if process is not None and exit_code is not None:
                why = f"its run worker (pid {process.pid}) exited with code {exit_code}"
                echo(f"run {run_id}: {why} before the run ended; marked failed")
                _fail(instance, run, why)
                return EXIT_FAILED
            if deadline is not None and time.monotonic() > deadline:
                echo(f"run {run_id}: still {run.status.value} after {timeout:g} s; terminating it")
                terminate_run(instance, run_id, process=process, warn=warn)
                return EXIT_TIMEOUT
            time.sleep(poll)
    except KeyboardInterrupt:
        if terminate_on_interrupt:
            terminate_run(instance, run_id, process=process, warn=warn)
        raise
    status = run.status
    echo(f"run {run_id}: {status.value}")
    return 0 if status == DagsterRunStatus.SUCCESS else EXIT_FAILED
