"""Launch a job, follow it, and exit with its outcome; no daemon needed.

    python -m dm_assets.launch JOB [--partitions all|KEY|FIRST...LAST] [--tags JSON]
                                   [--no-wait] [--timeout SECONDS] [--quiet]
    python -m dm_assets.launch --list            # the jobs and their partitions

The run executes in a run worker process of its own (:mod:`dm_assets.pipeline.run_worker`:
the definitions loaded once, the steps in that process), recorded in the Dagster instance like
any run, so the UI shows it. This command prints the run's log as it goes and exits 0 only when
the run succeeded: 1 when it failed or was canceled, 124 when ``--timeout`` passed first (the
run is then terminated), 2 for a usage error or an experiment file with problems (each printed,
before anything is launched), 130 on Ctrl-C (SIGINT), which terminates the run: its worker
processes end, its SLURM jobs are cancelled. Jobs over partitions get every partition unless
``--partitions`` says otherwise (one key, or an inclusive range ``FIRST...LAST``), all in one
run. ``--no-wait`` returns once the run has started; the run goes on.

When ``DAGSTER_HOME`` is not set it is ``$DM_HOME/dagster`` (default ``.dm/dagster``), prepared
with the shipped instance configuration (``dm_assets/dagster.yaml``: SQLite storage, runs
started at once without a daemon, the ``gpu`` pool's limit; the UI serves the same storage
through ``$DAGSTER_HOME/ui``, whose runs are queued for its daemon). Before each launch,
unfinished runs whose process is gone are marked failed and their pool slots freed. The
implementation is :mod:`dm_assets.pipeline.runs`; this module is the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence

from dm_assets.errors import DmError
from dm_assets.pipeline.runs import (
    LAUNCH_ID_TAG,
    follow_run,
    job_partition_keys,
    launch_log_path,
    open_instance,
    partition_tags,
    prepare_dagster_home,
    reap_dead_runs,
    start_run,
    terminate_run,
    wait_for_run,
)

EXIT_USAGE = 2


def _say(line: str) -> None:
    print(line, flush=True)


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dm_assets.launch",
        description="Run a Dagster job of dm_assets (no daemon needed), follow its log, and "
        "exit non-zero unless it succeeded.",
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
    args = parser.parse_args(argv)
    try:
        extra_tags = json.loads(args.tags)
        if not isinstance(extra_tags, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        parser.error(f"--tags must be a JSON object of strings ({exc}): got {args.tags!r}")
    prepare_dagster_home()
    try:
        # the experiment files are read here, in this process, before anything is submitted:
        # a user's mistake is a list of problems and exit 2, never a traceback from Dagster
        jobs = job_partition_keys()
    except DmError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
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
    launch_id = str(uuid.uuid4())
    tags[LAUNCH_ID_TAG] = launch_id
    log_path = launch_log_path(launch_id)
    # the worker loads the definitions while this process imports Dagster and reaps
    process = start_run(args.job, tags, log_path=log_path)
    try:
        instance = open_instance()
        for dead in reap_dead_runs(instance):
            print(f"run {dead} had lost its process: marked failed, its pool slots freed")
        run_id = wait_for_run(instance, launch_id, process)
    except BaseException:
        # nothing to follow yet: the worker must not go on alone
        process.send_signal(signal.SIGINT)
        process.wait()
        raise
    if run_id is None:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        print(
            f"error: the run worker exited with code {process.returncode} before creating the "
            f"run (its output: {log_path})",
            file=sys.stderr,
        )
        return process.returncode or 1
    named = launch_log_path(run_id)
    os.replace(log_path, named)  # the worker keeps writing to it: same file, new name
    print(
        f"launched {args.job} as run {run_id} (DAGSTER_HOME={os.environ['DAGSTER_HOME']}; "
        f"output of the run's processes: {named})",
        flush=True,
    )
    if args.no_wait:
        return 0
    try:
        return follow_run(
            run_id,
            instance=instance,
            process=process,
            timeout=args.timeout,
            quiet=args.quiet,
            terminate_on_interrupt=False,
            echo=_say,
            warn=_warn,
        )
    except KeyboardInterrupt:
        # from the launch on, an interrupt stops whatever was started
        terminate_run(instance, run_id, process=process, warn=_warn)
        raise


def _exit_now(code: int) -> None:
    """Exit with ``code`` at once: Python's own finalization of the thousands of modules
    Dagster imports takes seconds (1.8 s on an idle 2-core machine, 4 s loaded) and nothing
    here needs it: the output is flushed, every write to the instance is committed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        status = main()
    except KeyboardInterrupt:
        print("launch: interrupted (the run was terminated)", file=sys.stderr)
        status = 130
    except SystemExit as exc:  # argparse's usage errors, --help
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    _exit_now(status)
