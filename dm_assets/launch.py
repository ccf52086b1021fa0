"""Launch a job with ``dagster job launch``, follow it, and exit with its outcome.

    python -m dm_assets.launch JOB [--partitions all|KEY|FIRST...LAST] [--tags JSON]
                                   [--no-wait] [--timeout SECONDS] [--quiet]
    python -m dm_assets.launch --list            # the jobs and their partitions

``dagster job launch`` alone returns 0 as soon as the run is submitted, even if it then fails.
This command submits the run through it (so what CI runs is exactly Dagster's launch path),
prints the run's log as it goes, and exits 0 only when the run succeeded: 1 when it failed or
was canceled, 124 when ``--timeout`` passed first (the run is then terminated), 2 for a usage
error, 130 on Ctrl-C (SIGINT), which terminates the run: its worker processes end, its SLURM
jobs are cancelled. Jobs over partitions get every partition unless ``--partitions`` says
otherwise (one key, or an inclusive range ``FIRST...LAST``).

When ``DAGSTER_HOME`` is not set it is ``$DM_HOME/dagster`` (default ``.dm/dagster``), prepared
with the shipped instance configuration (``dm_assets/dagster.yaml``: SQLite storage, runs start
at once without the daemon, the ``gpu`` pool's limit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dm_assets.home import dm_home

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
SHIPPED_INSTANCE_CONFIG = Path(__file__).resolve().parent / "dagster.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def prepare_dagster_home(environ: dict[str, str] | None = None) -> Path:
    """``$DAGSTER_HOME``, or ``$DM_HOME/dagster`` set in ``environ`` (default ``os.environ``);
    the shipped ``dagster.yaml`` is copied there when the folder has none."""
    env = os.environ if environ is None else environ
    home = Path(env.get("DAGSTER_HOME") or dm_home() / "dagster").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        tmp = home / f".dagster.yaml.{uuid.uuid4().hex[:8]}"
        shutil.copyfile(SHIPPED_INSTANCE_CONFIG, tmp)
        os.replace(tmp, config)
    env["DAGSTER_HOME"] = str(home)
    return home


def _jobs() -> dict[str, list[str]]:
    """Every experiment's jobs and their partition keys (empty: not partitioned), read from
    the experiment files (the same ones the definitions are built from)."""
    from dm_assets.pipeline.experiment import load_experiments

    out: dict[str, list[str]] = {}
    for experiment in load_experiments():
        out.update(experiment.jobs())
    return out


def partition_tags(job: str, keys: list[str], selection: str) -> dict[str, str]:
    """The range tags that make ``dagster job launch`` run ``selection`` of ``keys``."""
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


def _print_event(entry: Any, quiet: bool) -> None:
    event = entry.dagster_event
    kind = event.event_type_value if event is not None else "LOG"
    if kind not in _SHOWN or (quiet and kind not in _FAILURES):
        return
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
    print(f"{stamp}{where} {kind}: {message}", flush=True)


_PID = re.compile(r"Started process for run \(pid: (\d+)\)")
_UNFINISHED = ("STARTING", "STARTED", "CANCELING")
# a run that has not recorded its process after this long never will
_START_GRACE_SECONDS = 120.0


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process of this machine running dagster."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return not re.search(r"^State:\s+Z", status, re.M) and b"dagster" in cmdline


def reap_dead_runs(instance: Any) -> list[str]:
    """Mark failed every unfinished run whose run worker process is gone (killed, OOM, the
    machine rebooted), and free the ``gpu`` pool slots it claimed.

    Without the daemon's run monitoring nothing else does: a SIGKILLed run would stay STARTED
    and keep its pool slots forever, and once the pool's limit is reached every later training
    or fitting step waits forever. Assumes the instance's runs ran on this machine (what the
    shipped configuration's default run launcher does). Returns the run ids reaped.
    """
    from dagster import DagsterRunStatus, RunsFilter

    statuses = [DagsterRunStatus[name] for name in _UNFINISHED]
    reaped = []
    for run in instance.get_runs(filters=RunsFilter(statuses=statuses)):
        pids = _run_worker_pids(instance, run.run_id)
        if pids:
            if any(_alive(pid) for pid in pids):
                continue
            why = f"its run worker (pid {pids[-1]}) is gone: killed, out of memory, or rebooted"
        else:
            record = instance.get_run_record_by_id(run.run_id)
            started = record.create_timestamp.timestamp() if record else time.time()
            if time.time() - started < _START_GRACE_SECONDS:
                continue
            why = f"it never started a run worker in {_START_GRACE_SECONDS:g} s"
        instance.report_run_failed(run, message=f"dm_assets.launch: marked failed: {why}")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
    return reaped


def _run_worker_pids(instance: Any, run_id: str) -> list[int]:
    return [
        int(match[1])
        for entry in instance.all_logs(run_id)
        if entry.message and (match := _PID.search(entry.message))
    ]


def terminate_run(instance: Any, run_id: str) -> None:
    """Stop run ``run_id``: through the run launcher (the code server that started it), else,
    when that server is gone (``dagster job launch`` keeps it only about a minute), by
    interrupting the run worker process directly, as Ctrl-C would: its steps unwind, and the
    training launchers end their worker processes and cancel their SLURM jobs."""
    run = instance.get_run_by_id(run_id)
    if run is None or run.is_finished:
        return
    print(f"interrupted: terminating run {run_id}", file=sys.stderr, flush=True)
    try:
        if instance.run_launcher.terminate(run_id):
            return
    except Exception as exc:  # the code server may have shut down meanwhile
        print(f"the run launcher could not terminate it ({exc}); interrupting its process")
    for pid in _run_worker_pids(instance, run_id):
        if _alive(pid):
            os.kill(pid, signal.SIGINT)


def follow_run(
    run_id: str,
    *,
    instance: Any = None,
    timeout: float | None = None,
    poll: float = 1.0,
    quiet: bool = False,
    terminate_on_interrupt: bool = True,
) -> int:
    """Print the run's log until it ends; its exit status (see the module docstring). Ctrl-C
    terminates the run unless ``terminate_on_interrupt`` is false (the caller does it)."""
    from dagster import DagsterInstance, DagsterRunStatus

    terminal = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    instance = instance if instance is not None else DagsterInstance.get()
    cursor = None
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            run = instance.get_run_by_id(run_id)
            if run is None:
                print(f"error: run {run_id} is not in the instance at {instance.root_directory}")
                return EXIT_FAILED
            while True:
                conn = instance.get_records_for_run(run_id, cursor=cursor, limit=500)
                for record in conn.records:
                    _print_event(record.event_log_entry, quiet)
                cursor = conn.cursor
                if not conn.has_more:
                    break
            if run.status in terminal:
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"run {run_id}: still {run.status.value} after {timeout:g} s; terminating it")
                terminate_run(instance, run_id)
                return EXIT_TIMEOUT
            time.sleep(poll)
    except KeyboardInterrupt:
        if terminate_on_interrupt:
            terminate_run(instance, run_id)
        raise
    status = run.status
    print(f"run {run_id}: {status.value}")
    return 0 if status == DagsterRunStatus.SUCCESS else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dm_assets.launch",
        description="Launch a Dagster job with `dagster job launch`, follow its log, and exit "
        "non-zero unless it succeeded.",
    )
    parser.add_argument("job", nargs="?", help="the job, e.g. minimal_all (see --list)")
    parser.add_argument("--list", action="store_true", help="list the jobs and exit")
    parser.add_argument(
        "--partitions",
        default="all",
        help="all (default), one partition key, or an inclusive range FIRST...LAST",
    )
    parser.add_argument("--tags", default="{}", help="more run tags, as a JSON object")
    parser.add_argument("--no-wait", action="store_true", help="submit and exit at once")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the end")
    parser.add_argument(
        "-w", "--workspace", default=str(REPO_ROOT / "workspace.yaml"), help="workspace file"
    )
    args = parser.parse_args(argv)
    try:
        extra_tags = json.loads(args.tags)
        if not isinstance(extra_tags, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        parser.error(f"--tags must be a JSON object of strings ({exc}): got {args.tags!r}")
    prepare_dagster_home()
    jobs = _jobs()
    if args.list or args.job is None:
        for name, keys in jobs.items():
            where = f"{len(keys)} partitions {keys[0]} ... {keys[-1]}" if keys else "unpartitioned"
            print(f"{name:30s} {where}")
        return 0 if args.list else EXIT_USAGE
    if args.job not in jobs:
        parser.error(f"no job {args.job!r}; the jobs are: {', '.join(sorted(jobs))}")
    try:
        tags = partition_tags(args.job, jobs[args.job], args.partitions)
    except ValueError as exc:
        parser.error(str(exc))
    tags.update({str(k): str(v) for k, v in extra_tags.items()})
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    for dead in reap_dead_runs(instance):
        print(f"run {dead} had lost its process: marked failed, its pool slots freed")
    run_id = str(uuid.uuid4())
    command = [
        sys.executable,
        "-m",
        "dagster",
        "job",
        "launch",
        "-w",
        args.workspace,
        "-j",
        args.job,
        "--run-id",
        run_id,
        "--tags",
        json.dumps(tags),
    ]
    home = Path(os.environ["DAGSTER_HOME"])
    log_path = home / "launch_logs" / f"{run_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"launching {args.job} as run {run_id} (DAGSTER_HOME={home}; output of the run's "
        f"processes: {log_path})",
        flush=True,
    )
    try:
        with open(log_path, "ab") as log:
            # the run's own processes inherit this output: to the log file, not over ours
            launched = subprocess.run(
                command, cwd=Path(args.workspace).resolve().parent, stdout=log, stderr=log
            )
        if launched.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            print("\n".join(tail), file=sys.stderr)
            print(f"error: dagster job launch exited {launched.returncode}", file=sys.stderr)
            return launched.returncode
        if args.no_wait:
            return 0
        return follow_run(
            run_id,
            instance=instance,
            timeout=args.timeout,
            quiet=args.quiet,
            terminate_on_interrupt=False,
        )
    except KeyboardInterrupt:
        # from the launch on, an interrupt stops whatever was started
        terminate_run(instance, run_id)
        raise


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("launch: interrupted (the run was terminated)", file=sys.stderr)
        sys.exit(130)
