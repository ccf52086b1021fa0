"""Launch a job with ``dagster job launch``, follow it, and exit with its outcome.

    python -m dm_assets.launch JOB [--partitions all|KEY|FIRST...LAST] [--tags JSON]
                                   [--no-wait] [--timeout SECONDS] [--quiet]
    python -m dm_assets.launch --list            # the jobs and their partitions

``dagster job launch`` alone returns 0 as soon as the run is submitted, even if it then fails.
This command submits the run through it (so what CI runs is exactly Dagster's launch path),
prints the run's log as it goes, and exits 0 only when the run succeeded: 1 when it failed or
was canceled, 124 when ``--timeout`` passed first (the run is then terminated), 2 for a usage
error or an experiment file with problems (each printed, before anything is launched), 130 on
Ctrl-C (SIGINT), which terminates the run: its worker processes end, its SLURM jobs are
cancelled. Jobs over partitions get every partition unless ``--partitions`` says otherwise (one
key, or an inclusive range ``FIRST...LAST``).

When ``DAGSTER_HOME`` is not set it is ``$DM_HOME/dagster`` (default ``.dm/dagster``), prepared
with the shipped instance configuration (``dm_assets/dagster.yaml``: SQLite storage, runs start
at once without the daemon, the ``gpu`` pool's limit). Before each launch, unfinished runs whose
process is gone are marked failed and their pool slots freed. The implementation is
:mod:`dm_assets.pipeline.runs`; this module is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from dm_assets.errors import DmError
from dm_assets.pipeline.runs import (
    REPO_ROOT,
    follow_run,
    job_partition_keys,
    launch_log_path,
    partition_tags,
    prepare_dagster_home,
    reap_dead_runs,
    submit_run,
    terminate_run,
)

EXIT_USAGE = 2


def _say(line: str) -> None:
    print(line, flush=True)


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    for dead in reap_dead_runs(instance):
        print(f"run {dead} had lost its process: marked failed, its pool slots freed")
    run_id = str(uuid.uuid4())
    log_path = launch_log_path(run_id)
    print(
        f"launching {args.job} as run {run_id} (DAGSTER_HOME={os.environ['DAGSTER_HOME']}; "
        f"output of the run's processes: {log_path})",
        flush=True,
    )
    try:
        returncode = submit_run(
            args.job, tags, run_id=run_id, workspace=Path(args.workspace), log_path=log_path
        )
        if returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            print("\n".join(tail), file=sys.stderr)
            print(f"error: dagster job launch exited {returncode}", file=sys.stderr)
            return returncode
        if args.no_wait:
            return 0
        return follow_run(
            run_id,
            instance=instance,
            timeout=args.timeout,
            quiet=args.quiet,
            terminate_on_interrupt=False,
            echo=_say,
            warn=_warn,
        )
    except KeyboardInterrupt:
        # from the launch on, an interrupt stops whatever was started
        terminate_run(instance, run_id, warn=_warn)
        raise


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("launch: interrupted (the run was terminated)", file=sys.stderr)
        sys.exit(130)
