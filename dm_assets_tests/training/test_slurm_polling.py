"""Polling the queue when the controller has purged one of the jobs asked about: squeue then
fails for every id at once ("Invalid job id specified"), and the arrays still running must not
be taken as done (their indices would be submitted again: two writers on one row). A purged
job counts as finished only once scontrol and sacct agree (or neither knows it). SLURM is faked
here with answers in the recorded format of test_slurm_parsing.py; no cluster is needed."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dm_assets.training.slurm import (
    _Array,
    _poll_queue,
    _Slurm,
    _Task,
    parse_sacct_states,
    parse_scontrol_states,
)
from dm_assets_tests.training.test_slurm_parsing import (
    SCONTROL_CANCELLED,
    SCONTROL_RUNNING,
    SQUEUE_INVALID_STDERR,
)

SCONTROL_INVALID = "slurm_load_jobs error: Invalid job id specified\n"
SACCT_DISABLED = "sacct: error: Slurm accounting storage is disabled\n"
# squeue --noheader --states=all --jobs=1 --format="%i %T %r": array 1, two tasks running
SQUEUE_JOB_1 = "1_0 COMPLETED None\n1_1 RUNNING None\n1_[2-3] PENDING JobArrayTaskLimit\n"


@dataclass(frozen=True)
class FakeSlurm(_Slurm):
    """Answers ``(command, job ids)`` from ``answers`` (``(returncode, stdout, stderr)``);
    a question it has no answer for fails the test. ``calls`` records what was asked."""

    answers: dict[tuple[str, str], tuple[int, str, str]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        jobs = next(
            (a.split("=", 1)[1] for a in args if a.startswith("--jobs=")),
            args[-1] if args[0] == "scontrol" else "",
        )
        key = (args[0], jobs)
        self.calls.append(key)
        if key not in self.answers:
            pytest.fail(f"unexpected SLURM command {args}")
        code, out, err = self.answers[key]
        return subprocess.CompletedProcess(list(args), code, out, err)


def array(tmp_path: Path, job_id: str, tasks: int) -> _Array:
    return _Array(
        tmp_path / job_id, [_Task(k, [k]) for k in range(tasks)], job_id=job_id, seen=True
    )


def test_parse_sacct_states() -> None:
    text = "9_0|COMPLETED\n9_1|CANCELLED by 0\n9_[2-3]|PENDING\n\nnot a line\n"
    assert parse_sacct_states(text) == [
        ("9_0", "COMPLETED"),
        ("9_1", "CANCELLED"),
        ("9_[2-3]", "PENDING"),
    ]
    assert parse_sacct_states("") == [] and parse_sacct_states(SACCT_DISABLED) == []


def test_parse_scontrol_states() -> None:
    # every record's state, the one of the tasks not started (ArrayTaskId=5-6%2) included
    assert parse_scontrol_states(SCONTROL_RUNNING) == [
        "PENDING",
        "RUNNING",
        "RUNNING",
        "FAILED",
        "FAILED",
        "COMPLETED",
    ]
    assert set(parse_scontrol_states(SCONTROL_CANCELLED)) == {"CANCELLED", "FAILED"}
    assert parse_scontrol_states(SCONTROL_INVALID) == []


@pytest.mark.parametrize(
    "sacct",
    [
        (0, "9_0|COMPLETED\n9_1|FAILED\n", ""),  # accounting: finished
        (0, "", ""),  # accounting does not know it either: absent from both
        (1, "", SACCT_DISABLED),  # no accounting: the controller forgot it
    ],
)
def test_purged_job_does_not_hide_a_running_array(
    tmp_path: Path, sacct: tuple[int, str, str]
) -> None:
    slurm = FakeSlurm(
        {},
        {
            ("squeue", "1,9"): (1, "", SQUEUE_INVALID_STDERR),  # one purged id fails them all
            ("squeue", "1"): (0, SQUEUE_JOB_1, ""),
            ("squeue", "9"): (1, "", SQUEUE_INVALID_STDERR),
            ("scontrol", "9"): (1, "", SCONTROL_INVALID),
            ("sacct", "9"): sacct,
        },
    )
    running, purged = array(tmp_path, "1", 4), array(tmp_path, "9", 2)
    _poll_queue(slurm, [running, purged])
    assert not running.done  # tasks 1 (running), 2 and 3 (pending) are not finished
    assert [t.state for t in running.tasks] == ["COMPLETED", "RUNNING", "PENDING", "PENDING"]
    assert purged.done
    assert ("squeue", "1,9") in slurm.calls and ("scontrol", "9") in slurm.calls


def test_purged_from_squeue_but_running_in_accounting_is_not_done(tmp_path: Path) -> None:
    slurm = FakeSlurm(
        {},
        {
            ("squeue", "9"): (1, "", SQUEUE_INVALID_STDERR),
            ("scontrol", "9"): (1, "", SCONTROL_INVALID),
            ("sacct", "9"): (0, "9_0|COMPLETED\n9_1|RUNNING\n", ""),
        },
    )
    purged = array(tmp_path, "9", 2)
    _poll_queue(slurm, [purged])
    assert not purged.done


def test_invalid_for_squeue_but_known_to_scontrol(tmp_path: Path) -> None:
    """The controller's answers disagree (a transient failure): scontrol's record decides."""
    slurm = FakeSlurm(
        {},
        {
            ("squeue", "1"): (1, "", SQUEUE_INVALID_STDERR),
            ("scontrol", "1"): (0, SCONTROL_RUNNING, ""),
        },
    )
    known = array(tmp_path, "1", 7)
    _poll_queue(slurm, [known])
    assert not known.done
    slurm.answers[("scontrol", "1")] = (0, SCONTROL_CANCELLED, "")
    _poll_queue(slurm, [known])
    assert known.done


def test_other_squeue_failures_change_nothing(tmp_path: Path) -> None:
    slurm = FakeSlurm(
        {}, {("squeue", "1"): (1, "", "slurm_load_jobs error: Socket timed out on send/recv\n")}
    )
    known = array(tmp_path, "1", 2)
    _poll_queue(slurm, [known])
    assert not known.done and slurm.calls == [("squeue", "1")]
