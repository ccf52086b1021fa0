"""The process that executes one run of a job in itself: what ``python -m dm_assets.launch``
starts for each launch.

    python -m dm_assets.pipeline.run_worker JOB [--tags JSON]

It loads the definitions (:mod:`dm_assets.pipeline.definitions`) once and executes the job with
:func:`dagster.execute_job` on the instance at ``$DAGSTER_HOME``. The run is recorded there like
any other (the UI shows its events, logs and materializations), its steps run in this process
(the definitions' in-process executor: pool limits hold as for any run), and neither a run
coordinator, a code server nor the daemon is involved, so it works where no daemon runs (CI),
whatever run coordinator the instance names. Dagster's ``dagster job launch`` (which also
works on the shipped instance without a daemon) instead starts a code server and a run worker
process, each loading the definitions (seconds each).

``--tags`` are the run's tags (partition range, the launch's id by which the caller finds the
run). SIGINT interrupts the run as Ctrl-C does: its steps unwind (the training launchers end
their worker processes, cancel their SLURM jobs) and the run ends canceled when it was marked
canceling first, else failed. Exit status: 0 when the run succeeded, 1 otherwise, 2 for a usage
error (an unknown job, tags that are not a JSON object of strings).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dm_assets.pipeline.run_worker",
        description="Execute one run of a dm_assets job in this process.",
    )
    parser.add_argument("job", help="the job's name, e.g. minimal_all")
    parser.add_argument("--tags", default="{}", help="the run's tags, a JSON object of strings")
    args = parser.parse_args(argv)
    try:
        tags = json.loads(args.tags)
    except ValueError as exc:
        parser.error(f"--tags must be a JSON object of strings ({exc}): got {args.tags!r}")
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        parser.error(f"--tags must be a JSON object of strings: got {args.tags!r}")

    import dagster as dg

    # what Dagster's own run workers and `dagster job execute` do: a SIGINT is raised inside
    # the steps (where the training launchers end their workers), never in the middle of
    # Dagster writing an event
    from dagster._utils.interrupts import capture_interrupts

    from dm_assets.pipeline import definitions
    from dm_assets.pipeline.runs import open_instance

    jobs = definitions.job_names()
    if args.job not in jobs:
        parser.error(f"no job {args.job!r}; the jobs are: {', '.join(sorted(jobs))}")
    job = dg.build_reconstructable_job(
        definitions.__name__, definitions.job_definition.__name__, reconstructable_args=(args.job,)
    )
    with (
        capture_interrupts(),
        open_instance() as instance,
        dg.execute_job(job, instance=instance, tags=tags, raise_on_error=False) as result,
    ):
        return 0 if result.success else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
