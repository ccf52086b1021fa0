"""What SLURM's commands print, read by the pure parsers of dm_assets.training.slurm, on text
recorded from the single-node test cluster (scripts/slurm_cluster.sh, slurm-wlm 22.05): job 1
is an array 0-6%2 whose task 0 exits 0, task 1 exits 3, task 2 SIGKILLs itself, the others
sleep (two at a time); job 2 an array 0-1 asking partition "short" (1 minute) for 5 minutes;
job 8 a plain job. No cluster is needed here; test_slurm.py runs the launcher on a real one."""

from __future__ import annotations

import pytest

from dm_assets.training.slurm import (
    QueueLine,
    SlurmError,
    TaskRecord,
    describe_exit_code,
    never_starts,
    parse_sbatch_job_id,
    parse_scontrol_tasks,
    parse_squeue,
    parse_task_ids,
)

# squeue --noheader --states=all --jobs=1,2 --format="%i %T %r", 4 s after submitting
SQUEUE_RUNNING = """\
1_0 COMPLETED None
1_2 FAILED JobLaunchFailure
1_1 FAILED NonZeroExitCode
1_[5-6%2] PENDING JobArrayTaskLimit
1_4 RUNNING None
1_3 RUNNING None
2_[0-1] PENDING PartitionTimeLimit
"""

# the same after `scancel 2`, `scancel 1`, with plain job 8 running (--jobs=1,8 and --jobs=2)
SQUEUE_CANCELLED = """\
1_[5-6%2] CANCELLED JobArrayTaskLimit
1_4 CANCELLED None
1_3 CANCELLED None
1_0 COMPLETED None
1_2 FAILED JobLaunchFailure
1_1 FAILED NonZeroExitCode
8 RUNNING None
2_[0-1] CANCELLED PartitionTimeLimit
"""

# stderr of squeue --jobs=999 (exit 1) for an id the controller does not know (or forgot)
SQUEUE_INVALID_STDERR = "slurm_load_jobs error: Invalid job id specified\n"


def _scontrol_line(job: int, task: str, state: str, reason: str, exit_code: str) -> str:
    """A line of `scontrol --oneliner show job 1` as recorded, fields outside the parser's cut
    to their neighbours (the recorded lines run to 1,500 characters)."""
    return (
        f"JobId={job} ArrayJobId=1 ArrayTaskId={task} ArrayTaskThrottle=2 JobName=rec "
        "UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 Nice=0 "
        f"Account=(null) QOS=(null) JobState={state} Reason={reason} Dependency=(null) "
        f"Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode={exit_code} RunTime=00:00:00 "
        "TimeLimit=UNLIMITED TimeMin=N/A SubmitTime=2026-12-01T04:36:14 Partition=debug "
        "NodeList=vm BatchHost=vm NumNodes=1 NumCPUs=1 Command=/tmp/h13rec/sleep.sh "
        f"StdOut=/tmp/h13rec/t_{task}.log Power= "
    )


# scontrol --oneliner show job 1, while tasks 3 and 4 ran (the first line: tasks not started)
SCONTROL_RUNNING = "\n".join(
    [
        _scontrol_line(1, "5-6%2", "PENDING", "JobArrayTaskLimit", "0:0"),
        _scontrol_line(7, "4", "RUNNING", "None", "0:0"),
        _scontrol_line(6, "3", "RUNNING", "None", "0:0"),
        _scontrol_line(5, "2", "FAILED", "JobLaunchFailure", "0:9"),
        _scontrol_line(4, "1", "FAILED", "NonZeroExitCode", "3:0"),
        _scontrol_line(3, "0", "COMPLETED", "None", "0:0"),
    ]
)

# the same job after scancel: running tasks got SIGTERM (signal 15)
SCONTROL_CANCELLED = "\n".join(
    [
        _scontrol_line(1, "5-6%2", "CANCELLED", "JobArrayTaskLimit", "0:0"),
        _scontrol_line(7, "4", "CANCELLED", "None", "0:15"),
        _scontrol_line(6, "3", "CANCELLED", "None", "0:15"),
        _scontrol_line(5, "2", "FAILED", "JobLaunchFailure", "0:9"),
    ]
)

# scontrol --oneliner show job 2: an array none of whose tasks started (cut as above)
SCONTROL_NEVER_STARTS = (
    "JobId=2 ArrayJobId=2 ArrayTaskId=0-1 JobName=rec UserId=root(0) GroupId=root(0) "
    "MCS_label=N/A Priority=4294901758 Nice=0 Account=(null) QOS=(null) JobState=PENDING "
    "Reason=PartitionTimeLimit Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 "
    "ExitCode=0:0 RunTime=00:00:00 TimeLimit=00:05:00 TimeMin=N/A Partition=short "
    "StdOut=/tmp/h13rec/s_4294967294.log Power= "
)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("7", [7]),
        ("[3-5,9%2]", [3, 4, 5, 9]),
        ("[4-7%2]", [4, 5, 6, 7]),
        ("[5-6%2]", [5, 6]),
        ("[0-1]", [0, 1]),
        ("[0,2,4]", [0, 2, 4]),
        ("[1000]", [1000]),
    ],
)
def test_parse_task_ids(text: str, ids: list[int]) -> None:
    assert parse_task_ids(text) == ids


def test_parse_squeue_running_arrays() -> None:
    assert parse_squeue(SQUEUE_RUNNING) == [
        QueueLine("1", [0], "COMPLETED", "None"),
        QueueLine("1", [2], "FAILED", "JobLaunchFailure"),
        QueueLine("1", [1], "FAILED", "NonZeroExitCode"),
        QueueLine("1", [5, 6], "PENDING", "JobArrayTaskLimit"),
        QueueLine("1", [4], "RUNNING", "None"),
        QueueLine("1", [3], "RUNNING", "None"),
        QueueLine("2", [0, 1], "PENDING", "PartitionTimeLimit"),
    ]


def test_parse_squeue_cancelled_and_plain_jobs() -> None:
    lines = parse_squeue(SQUEUE_CANCELLED)
    assert lines[0] == QueueLine("1", [5, 6], "CANCELLED", "JobArrayTaskLimit")
    assert QueueLine("8", None, "RUNNING", "None") in lines  # a job's own record: no task part
    assert {line.state for line in lines} == {"CANCELLED", "COMPLETED", "FAILED", "RUNNING"}


def test_parse_squeue_passes_over_what_is_not_a_job_line() -> None:
    text = (
        "\n"  # blank
        "JOBID STATE REASON\n"  # a header (without --noheader)
        "123_[4-7%2] PENDING\n"  # no reason: None
        "123_5 PENDING QOSMaxJobsPerUserLimit\n"
        "124 PENDING Reason with words\n"  # %r is the rest of the line
        "lonely\n"
    )
    assert parse_squeue(text) == [
        QueueLine("123", [4, 5, 6, 7], "PENDING", "None"),
        QueueLine("123", [5], "PENDING", "QOSMaxJobsPerUserLimit"),
        QueueLine("124", None, "PENDING", "Reason with words"),
    ]
    assert parse_squeue("") == [] and parse_squeue(SQUEUE_INVALID_STDERR) == []


def test_parse_scontrol_tasks() -> None:
    assert parse_scontrol_tasks(SCONTROL_RUNNING) == [
        TaskRecord(4, "RUNNING", "None", "0:0"),
        TaskRecord(3, "RUNNING", "None", "0:0"),
        TaskRecord(2, "FAILED", "JobLaunchFailure", "0:9"),
        TaskRecord(1, "FAILED", "NonZeroExitCode", "3:0"),
        TaskRecord(0, "COMPLETED", "None", "0:0"),
    ]  # the first line (ArrayTaskId=5-6%2, tasks not started) is not a task of its own
    assert parse_scontrol_tasks(SCONTROL_CANCELLED)[:2] == [
        TaskRecord(4, "CANCELLED", "None", "0:15"),
        TaskRecord(3, "CANCELLED", "None", "0:15"),
    ]
    assert parse_scontrol_tasks(SCONTROL_NEVER_STARTS) == []
    # a field the line lacks: None (state, reason) or "" (exit code); a forgotten job: nothing
    assert parse_scontrol_tasks("JobId=9 ArrayTaskId=3 Reason=None") == [
        TaskRecord(3, None, "None", "")
    ]
    assert parse_scontrol_tasks("slurm_load_jobs error: Invalid job id specified") == []
    # a field name that only ends like one is not that field
    assert parse_scontrol_tasks("ArrayTaskId=1 OldJobState=X JobState=RUNNING")[0].state == (
        "RUNNING"
    )


def test_parse_sbatch_job_id() -> None:
    assert parse_sbatch_job_id("1\n") == "1"
    assert parse_sbatch_job_id("8;cluster\n") == "8"
    with pytest.raises(SlurmError, match=r"sbatch answered 'Submitted batch job 3', not a job"):
        parse_sbatch_job_id("Submitted batch job 3\n")
    with pytest.raises(SlurmError, match="sbatch answered '', not a job id"):
        parse_sbatch_job_id("")


def test_never_starts_reasons() -> None:
    for reason in (
        "PartitionTimeLimit",
        "InvalidAccount",
        "InvalidQOS",
        "BadConstraints",
        "PartitionNodeLimit",
        "DependencyNeverSatisfied",
        "QOSMaxWallDurationPerJobLimit",
        "AssocMaxCpuPerJobLimit",
        "QOSMaxGRESPerNode",
    ):
        assert never_starts("PENDING", reason), reason
    for reason in ("JobArrayTaskLimit", "Resources", "Priority", "None", "QOSMaxJobsPerUserLimit"):
        assert not never_starts("PENDING", reason), reason
    assert not never_starts("CANCELLED", "PartitionTimeLimit")  # already out of the queue


def test_describe_exit_code() -> None:
    assert describe_exit_code("3:0") == "exit code 3"
    assert describe_exit_code("0:0") == "exit code 0"
    assert describe_exit_code("0:9") == "killed by signal 9 (SIGKILL)"
    assert describe_exit_code("0:15") == "killed by signal 15 (SIGTERM)"
    # the worker's own exit after SLURM's SIGTERM (scancel, a time limit) or a Ctrl-C
    assert describe_exit_code("143:0") == "exit code 143 (stopped by SIGTERM)"
    assert describe_exit_code("130:0") == "exit code 130 (stopped by SIGINT)"
    assert describe_exit_code("2") == "exit code 2"
