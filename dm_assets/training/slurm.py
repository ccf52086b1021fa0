"""Train a block of model indices as SLURM job arrays, with retries: the cluster twin of
:func:`dm_assets.training.local.train_models`.

:func:`train_models_slurm` skips the indices already completed in the store, cuts the rest into
groups of ``indices_per_task`` consecutive indices (one Python start-up and one import of the
training script per group, not per model) and submits one job array whose task ``k`` runs the
seed-compatible worker on group ``k``::

    python -m dm_assets.worker --worker.indices=<group k> --worker.logdir=<store>
        --worker.main_import=<module> --worker.report=<dir>/task_<k>.json
        --worker.commit_every=<s> [--worker.job_timeout=<s>] <script arguments>

It then polls ``squeue`` until every task has left the queue, reporting progress from the
store's completion flags, and learns each task's outcome from its worker report, the store and
what SLURM says of it (``squeue``'s state and reason, ``scontrol show job``'s exit code while
the controller still knows the job: accounting is not needed). A job the controller has
forgotten (``squeue``: ``Invalid job id``) counts as finished only once ``scontrol`` and, where
accounting is kept, ``sacct`` say so; the other jobs are then asked about one by one. Indices
left incomplete (an exception in ``main``, a timeout, a task killed, cancelled, out of memory
or past its time limit) go into a new job array, up to ``retries`` more rounds; a task SLURM
will never start (pending with reason ``PartitionTimeLimit``, ``InvalidAccount``, ...) is
cancelled and its indices failed with that reason. Interrupted (``KeyboardInterrupt``,
Dagster terminating the run, an exception from ``on_progress``, ``cancel_event`` set), it
``scancel``\\ s every job it submitted and waits for them to leave the queue before going on.

**Shared filesystem.** The tasks run on other machines: the store, ``log_dir``, the interpreter
``python`` (a virtual environment) and the training script must be on a filesystem every node
mounts at the same path (as with the seed's SLURM scripts). Rows are written with ``pwrite`` at
their own byte range and fsynced before their completion flag (see :mod:`dm_assets.store.store`), so
tasks on different nodes may write the same store at once.

Files written, besides the store's rows, under ``log_dir`` (default ``<store>/launcher_logs``):
one folder per submitted array, ``slurm/<YYYYmmdd-HHMMSS>-<pid>-r<round>-a<array>/``, holding

- ``groups.txt``: line ``k + 1`` is task ``k``'s indices, as ``0-9,12`` (text);
- ``job.sh``: the batch script (bash) that maps ``$SLURM_ARRAY_TASK_ID`` to its group;
- ``job_id``: the array's SLURM job id (text), written as soon as ``sbatch`` answers;
- ``task_<k>.log``: the task's stdout and stderr (SLURM's ``--output``);
- ``task_<k>.json``: the worker's report (:func:`dm_assets.training.runner.write_report`),
  absent when the task was killed or never started.

What SLURM's commands print is read by pure functions (:func:`parse_squeue`,
:func:`parse_scontrol_tasks`, :func:`parse_sbatch_job_id`, :func:`parse_task_ids`), tested on
recorded output. This module is the SLURM transport only: the rounds, the worker's command line
and the reading of the workers' reports are the launcher core's
(:mod:`dm_assets.training.launcher`), shared with :mod:`dm_assets.training.local`.

Nothing here imports dagster; :class:`dm_assets.pipeline.resources.trainers.SlurmTrainer`
wraps it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from dm_assets.cli import EXIT_USAGE
from dm_assets.errors import DmError
from dm_assets.training.launcher import (
    Finished,
    Progress,
    TrainingReport,
    WorkerCommand,
    check_arguments,
    compact_ranges,
    exit_code_words,
    is_positive_int,
    launcher_logs,
    run_rounds,
    signal_name,
)

logger = logging.getLogger(__name__)

# SLURM's default MaxArraySize is 1001: task ids 0..1000. Larger blocks are split into arrays.
MAX_ARRAY_TASKS = 1000
# After scancel, how long to wait for the jobs to leave squeue before giving up (SLURM sends
# SIGTERM, then SIGKILL after the cluster's KillWait, 30 s by default).
CANCEL_WAIT_SECONDS = 60.0
# Per SLURM command: a busy controller answers slowly, a dead one never.
COMMAND_TIMEOUT_SECONDS = 60.0
# Job states after which a task never runs again (squeue's %T).
_FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)


# Reasons a pending task gives when no wait will start it (it asks for more than its partition,
# account or QOS allows, or for something no node has): such tasks are cancelled and their
# indices failed with the reason, not retried.
NEVER_STARTS_REASONS = re.compile(
    r"BadConstraints|DependencyNeverSatisfied|InvalidAccount|InvalidQOS|PartitionNodeLimit"
    r"|PartitionTimeLimit|(QOS|Assoc)Max\w*Per(Job|Node)\w*"
)


class SlurmError(DmError, RuntimeError):
    """A SLURM command failed (``sbatch`` refused the job, the controller did not answer)."""


class SlurmCancelledError(Exception):
    """Raised by :func:`train_models_slurm` when its ``cancel_event`` was set; the jobs it had
    submitted were cancelled."""


@dataclass(frozen=True)
class SbatchOptions:
    """What each array task asks SLURM for; ``None`` or empty leaves the cluster's default.

    ``partition`` (``--partition``), ``account`` (``--account``), ``time_limit`` per task
    (``--time``: ``minutes``, ``HH:MM:SS`` or ``D-HH:MM:SS``; a task past it is killed and its
    unfinished indices retried), ``cpus_per_task`` (``--cpus-per-task``), ``gpus_per_task``
    (``--gpus-per-task``), ``mem`` per task (``--mem``, e.g. ``"8G"``), ``max_concurrent``
    (tasks of one array running at once: ``--array=...%N``), ``job_name`` (``--job-name``) and
    ``extra`` (more ``sbatch`` arguments, verbatim, e.g. ``("--qos=low", "--constraint=a100")``).
    """

    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    mem: str | None = None
    max_concurrent: int | None = None
    job_name: str = "dm_assets"
    extra: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        """Every invalid field, each naming the value and the fix."""
        out = []
        for name in ("cpus_per_task", "gpus_per_task", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and not is_positive_int(value):
                out.append(f"sbatch.{name}: must be a positive integer or None; got {value!r}")
        if self.time_limit is not None and not re.fullmatch(
            r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE", self.time_limit
        ):
            out.append(
                f"sbatch.time_limit: {self.time_limit!r} is not a SLURM time; use minutes, "
                "HH:MM:SS or D-HH:MM:SS"
            )
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            out.append(f"sbatch.mem: {self.mem!r} is not a SLURM size; use e.g. 8G or 4000M")
        if not re.fullmatch(r"[\w.+-]+", self.job_name):
            out.append(f"sbatch.job_name: {self.job_name!r}: use letters, digits and ._+-")
        if isinstance(self.extra, str) or not all(isinstance(a, str) for a in self.extra):
            out.append(f"sbatch.extra: must be a sequence of strings; got {self.extra!r}")
        return out

    def args(self) -> list[str]:
        """The ``sbatch`` arguments for these options (without ``--array``)."""
        out = [f"--job-name={self.job_name}"]
        if self.partition:
            out.append(f"--partition={self.partition}")
        if self.account:
            out.append(f"--account={self.account}")
        if self.time_limit:
            out.append(f"--time={self.time_limit}")
        if self.cpus_per_task is not None:
            out.append(f"--cpus-per-task={self.cpus_per_task}")
        if self.gpus_per_task is not None:
            out.append(f"--gpus-per-task={self.gpus_per_task}")
        if self.mem:
            out.append(f"--mem={self.mem}")
        return [*out, *self.extra]


# ---------------------------------------------------------------------------------------------
# What SLURM's commands print, read by pure functions


@dataclass(frozen=True)
class QueueLine:
    """One line of ``squeue --noheader --format='%i %T %r'``.

    ``job_id``: the job (an array's id: ``"123"`` of ``"123_4"``). ``task_ids``: the array
    tasks the line speaks of (``[4]`` for ``123_4``, ``[4, 5, 6, 7]`` for ``123_[4-7%2]``,
    tasks not yet started), ``None`` for a line of the job's own record (``123``). ``state``:
    the job state (``PENDING``, ``RUNNING``, ``COMPLETED``, ...). ``reason``: why it is in that
    state (``None``, ``JobArrayTaskLimit``, ``PartitionTimeLimit``, ``NonZeroExitCode``, ...).
    """

    job_id: str
    task_ids: list[int] | None
    state: str
    reason: str


@dataclass(frozen=True)
class TaskRecord:
    """What ``scontrol --oneliner show job`` says of one array task that has a task of its own
    (a started one: the tasks not yet started share one line, ``ArrayTaskId=5-6%2``).

    ``task_id``: its index in the array. ``state``, ``reason``: its ``JobState`` and ``Reason``
    (``None`` where the line has none). ``exit_code``: ``"<exit status>:<signal>"``, e.g.
    ``"3:0"`` or ``"0:9"`` (killed by SIGKILL); ``""`` where the line has none.
    """

    task_id: int
    state: str | None
    reason: str | None
    exit_code: str


def parse_task_ids(text: str) -> list[int]:
    """The task ids of squeue's task part: ``"3"``, ``"[3-5,7%2]"`` (``%2``: at most two at
    once) as ``[3]``, ``[3, 4, 5, 7]``."""
    body = text.strip("[]").split("%")[0]
    ids: list[int] = []
    for part in filter(None, body.split(",")):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def parse_squeue(text: str) -> list[QueueLine]:
    """The lines of ``squeue --noheader --format='%i %T %r'`` output (lines that are not such,
    an id that is not ``<job>`` or ``<job>_<tasks>``, are passed over; a missing reason reads
    ``None``)."""
    lines = []
    for line in text.splitlines():
        words = line.split(maxsplit=2)
        match = re.fullmatch(r"(\d+)(?:_(\S+))?", words[0]) if len(words) >= 2 else None
        if match is None:
            continue
        task_ids = None if match[2] is None else parse_task_ids(match[2])
        lines.append(
            QueueLine(match[1], task_ids, words[1], words[2] if len(words) > 2 else "None")
        )
    return lines


def parse_scontrol_tasks(text: str) -> list[TaskRecord]:
    """The started array tasks of ``scontrol --oneliner show job <id>`` output (one line a
    job record; the record of the tasks not yet started, whose ``ArrayTaskId`` is a range,
    is passed over)."""
    records = []
    for line in text.splitlines():
        fields = dict(re.findall(r"(?:^| )(ArrayTaskId|JobState|Reason|ExitCode)=(\S*)", line))
        task_id = fields.get("ArrayTaskId", "")
        if task_id.isdigit():
            records.append(
                TaskRecord(
                    int(task_id),
                    fields.get("JobState"),
                    fields.get("Reason"),
                    fields.get("ExitCode", ""),
                )
            )
    return records


def parse_scontrol_states(text: str) -> list[str]:
    """Every record's ``JobState`` in ``scontrol --oneliner show job <id>`` output, the record
    of an array's tasks not yet started included (``[]`` for a job the controller does not
    know: ``Invalid job id specified``)."""
    return [
        match[1]
        for line in text.splitlines()
        if (match := re.search(r"(?:^| )JobState=(\S+)", line)) is not None
    ]


def parse_sacct_states(text: str) -> list[tuple[str, str]]:
    """``(job id, state)`` for each line of ``sacct --noheader --parsable2 --allocations
    --format=JobID,State`` output (``"9_1|CANCELLED by 0"`` as ``("9_1", "CANCELLED")``);
    lines that are not such (an error message) are passed over."""
    states = []
    for line in text.splitlines():
        job_id, sep, state = line.partition("|")
        if sep and re.fullmatch(r"\d+(_\S+)?", job_id) and state.split():
            states.append((job_id, state.split()[0]))
    return states


def parse_sbatch_job_id(text: str) -> str:
    """The job id from ``sbatch --parsable`` output (``"123"`` or ``"123;cluster"``); raises
    :class:`SlurmError` when it is not one."""
    job_id = text.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {text.strip()!r}, not a job id")
    return job_id


def never_starts(state: str, reason: str) -> bool:
    """Whether a task in ``state`` for ``reason`` waits for something no wait brings
    (:data:`NEVER_STARTS_REASONS`)."""
    return state == "PENDING" and NEVER_STARTS_REASONS.match(reason) is not None


def describe_exit_code(exit_code: str) -> str:
    """scontrol's ``ExitCode`` (``"3:0"``, ``"0:9"``, ``"143:0"``) in words: ``"exit code 3"``,
    ``"killed by signal 9 (SIGKILL)"``, ``"exit code 143 (stopped by SIGTERM)"`` (the worker's
    own exit after ``scancel`` or a time limit)."""
    code, _, sig = exit_code.partition(":")
    if sig not in ("", "0"):
        name = signal_name(int(sig)) if sig.isdigit() else None
        return f"killed by signal {sig}" + (f" ({name})" if name else "")
    return f"exit code {exit_code_words(int(code)) if code.isdigit() else code}"


# ---------------------------------------------------------------------------------------------
# Submitting, polling and cancelling job arrays


@dataclass
class _Task:
    """One array task: its group of indices and what SLURM said of it last."""

    index: int
    indices: list[int]
    state: str = "PENDING"
    reason: str = "None"
    exit_code: str = ""
    never_starts: bool = False  # cancelled while pending for a reason no wait resolves


@dataclass
class _Array:
    """One submitted job array."""

    folder: Path
    tasks: list[_Task]
    job_id: str = ""
    submitted: float = field(default_factory=time.monotonic)
    seen: bool = False  # squeue has listed it (a job it has never listed may not be known yet)
    done: bool = False

    @property
    def name(self) -> str:
        return self.folder.name

    def log_path(self, task: _Task) -> Path:
        return self.folder / f"task_{task.index}.log"

    def report_path(self, task: _Task) -> Path:
        return self.folder / f"task_{task.index}.json"

    def describe(self, task: _Task) -> str:
        if task.never_starts:
            return (
                f"SLURM task {self.job_id}_{task.index} never started: it was pending with "
                f"reason {task.reason}, which no wait resolves (check the sbatch options "
                "against the partition's, account's and QOS's limits); cancelled"
            )
        text = f"SLURM task {self.job_id}_{task.index} ended {task.state}"
        details = []
        if task.reason and task.reason != "None":
            details.append(f"reason {task.reason}")
        if task.exit_code:
            details.append(describe_exit_code(task.exit_code))
        return text + (f" ({', '.join(details)})" if details else "")

    def finished(self, task: _Task) -> Finished:
        ended = self.describe(task)
        log = self.log_path(task)
        return Finished(
            indices=task.indices,
            report_path=self.report_path(task),
            log_path=log,
            missing_log=f"(no log {log}: the task never started)",
            ended=ended,
            # a usage error, or a task SLURM will never start, fails the same way every time
            final=task.exit_code.startswith(f"{EXIT_USAGE}:") or task.never_starts,
            note=ended,
        )


@dataclass(frozen=True)
class _Slurm:
    """Runs SLURM's commands with the launcher's environment."""

    env: Mapping[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(
                list(args),
                env=dict(self.env),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
            )
        except FileNotFoundError as exc:
            raise SlurmError(
                f"{args[0]} not found: run this where SLURM's commands are installed"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise SlurmError(
                f"{shlex.join(args)} did not answer in {COMMAND_TIMEOUT_SECONDS:g} s"
            ) from exc
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{shlex.join(args)} exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc


@dataclass(frozen=True)
class _Submitter:
    """Writes and submits job arrays: what every array of a call shares."""

    slurm: _Slurm
    command: WorkerCommand
    sbatch: SbatchOptions
    env: Mapping[str, str]
    workdir: Path
    logs: Path
    stamp: str = field(
        default_factory=lambda: f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}",
    )

    def batch_script(self, folder: Path) -> str:
        groups = shlex.quote(str(folder / "groups.txt"))
        report = shlex.quote(str(folder)) + '/task_"$task".json'
        command = self.command.argv('"$indices"', report, quote=shlex.quote)
        exports = "".join(
            f"export {key}={shlex.quote(value)}\n"
            for key, value in {"PYTHONUNBUFFERED": "1", **self.env}.items()
        )
        return (
            "#!/bin/bash\n"
            "# Written by dm_assets.training.slurm: array task k trains the indices on line k+1\n"
            f"# of {folder / 'groups.txt'} with the seed-compatible worker.\n"
            "set -eu\n"
            'task=${SLURM_ARRAY_TASK_ID:?"run this as a task of a SLURM job array"}\n'
            f'indices=$(sed -n "$((task + 1))p" {groups})\n'
            'if [ -z "$indices" ]; then\n'
            f'  echo "no group of indices for array task $task in "{groups} >&2\n'
            f"  exit {EXIT_USAGE}\n"
            "fi\n"
            f"{exports}"
            'echo "=== $(date -Iseconds) task ${SLURM_ARRAY_JOB_ID:-?}_$task on $(hostname):'
            ' indices $indices"\n'
            f"exec {' '.join(command)}\n"
        )

    def submit(self, groups: Sequence[list[int]], round_number: int, array_number: int) -> _Array:
        folder = self.logs / "slurm" / f"{self.stamp}-r{round_number}-a{array_number}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "groups.txt").write_text("".join(f"{compact_ranges(g)}\n" for g in groups))
        script = folder / "job.sh"
        script.write_text(self.batch_script(folder))
        script.chmod(0o755)
        array = _Array(folder, [_Task(k, list(g)) for k, g in enumerate(groups)])
        spec = f"0-{len(groups) - 1}"
        if self.sbatch.max_concurrent is not None:
            spec += f"%{self.sbatch.max_concurrent}"
        proc = self.slurm.run(
            "sbatch",
            "--parsable",
            f"--array={spec}",
            f"--output={folder}/task_%a.log",
            f"--chdir={self.workdir}",
            *self.sbatch.args(),
            str(script),
        )
        array.job_id = parse_sbatch_job_id(proc.stdout)
        (folder / "job_id").write_text(array.job_id + "\n")
        logger.info(
            "round %d: SLURM job array %s, %d task(s) for %d index(es) %s; logs in %s",
            round_number,
            array.job_id,
            len(groups),
            sum(len(g) for g in groups),
            compact_ranges(sorted(i for g in groups for i in g)),
            folder,
        )
        return array


def _update_tasks(
    arrays: Sequence[_Array], lines: Sequence[QueueLine]
) -> tuple[set[str], list[str]]:
    """Set the state and reason of the arrays' tasks from squeue's ``lines``; the ids of the
    arrays with a task still pending or running, and the tasks (``<job>_<task>``) that just
    turned out to wait for a reason no wait resolves."""
    by_id = {a.job_id: a for a in arrays}
    active: set[str] = set()
    hopeless: list[str] = []
    for line in lines:
        array = by_id.get(line.job_id)
        if array is None:
            continue
        array.seen = True
        if line.task_ids is None:  # the array's record itself: its tasks that never started
            ids = [t.index for t in array.tasks if t.state == "PENDING"]
        else:
            ids = [k for k in line.task_ids if 0 <= k < len(array.tasks)]
        for k in ids:
            task = array.tasks[k]
            if not task.never_starts:
                task.state, task.reason = line.state, line.reason
            if never_starts(line.state, line.reason):
                task.never_starts = True
                hopeless.append(f"{array.job_id}_{k}")
        if line.state not in _FINAL_STATES:
            active.add(array.job_id)
    return active, hopeless


def _squeue(
    slurm: _Slurm, job_ids: Sequence[str]
) -> tuple[list[QueueLine], set[str], set[str]] | None:
    """What ``squeue`` says of ``job_ids``: its lines, the ids the controller no longer knows
    that are confirmed finished (:func:`_forgotten_job_finished`), and the ids it could not
    say anything of (to be taken as still active); None when ``squeue`` failed for another
    reason than an unknown id (asked again at the next poll).

    ``squeue --jobs=A,B`` fails as a whole with ``Invalid job id specified`` when one of them
    was purged (``MinJobAge`` after it ended), printing nothing of the others: then each job
    is asked about alone."""
    proc = slurm.run(
        "squeue",
        "--noheader",
        "--states=all",
        f"--jobs={','.join(job_ids)}",
        "--format=%i %T %r",
        check=False,
    )
    if proc.returncode == 0:
        return parse_squeue(proc.stdout), set(), set()
    if "Invalid job id" not in proc.stderr:
        logger.warning("squeue failed (%s); trying again", proc.stderr.strip())
        return None
    if len(job_ids) > 1:
        lines: list[QueueLine] = []
        finished: set[str] = set()
        unsure: set[str] = set()
        for job_id in job_ids:
            found = _squeue(slurm, [job_id])
            if found is None:
                unsure.add(job_id)
                continue
            lines.extend(found[0])
            finished |= found[1]
            unsure |= found[2]
        return lines, finished, unsure
    job_id = job_ids[0]
    if _forgotten_job_finished(slurm, job_id):
        return [], {job_id}, set()
    return [], set(), {job_id}


def _forgotten_job_finished(slurm: _Slurm, job_id: str) -> bool:
    """Whether job ``job_id``, which ``squeue`` calls an invalid id, has finished: every
    state ``scontrol show job`` records for it is final; or the controller does not know it
    and accounting (``sacct``) records only final states for it, or nothing (absent from
    both, or no accounting: the controller knows every job that is pending or running)."""
    proc = slurm.run("scontrol", "--oneliner", "show", "job", job_id, check=False)
    states = parse_scontrol_states(proc.stdout) if proc.returncode == 0 else []
    if states:
        return all(state in _FINAL_STATES for state in states)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr + proc.stdout:
        logger.warning(
            "squeue does not know job %s and scontrol failed (%s); asking again",
            job_id,
            (proc.stderr or proc.stdout).strip(),
        )
        return False
    acct = slurm.run(
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        f"--jobs={job_id}",
        "--format=JobID,State",
        check=False,
    )
    recorded = [
        state
        for jid, state in (parse_sacct_states(acct.stdout) if acct.returncode == 0 else [])
        if jid.split("_")[0] == job_id
    ]
    if recorded and not all(state in _FINAL_STATES for state in recorded):
        logger.warning(
            "SLURM job %s: the controller does not know it but accounting records it %s; "
            "taken as still active",
            job_id,
            ", ".join(sorted(set(recorded))),
        )
        return False
    logger.info("SLURM job %s left the controller's memory; finished", job_id)
    return True


def _poll_queue(slurm: _Slurm, arrays: Sequence[_Array]) -> None:
    """Update the tasks of the arrays not yet done from ``squeue``; mark an array done once none
    of its tasks is pending or running (a job the controller forgot: once
    :func:`_forgotten_job_finished` says so)."""
    live = [a for a in arrays if not a.done]
    if not live:
        return
    found = _squeue(slurm, [a.job_id for a in live])
    if found is None:
        return
    lines, finished, unsure = found
    active, hopeless = _update_tasks(live, lines)
    active |= unsure
    if hopeless:
        logger.error(
            "SLURM task(s) %s pending for a reason no wait resolves; cancelling them",
            " ".join(hopeless),
        )
        slurm.run("scancel", *hopeless, check=False)
    for array in live:
        # a job squeue never listed may not have reached it yet; after a minute it is gone
        known = (
            array.seen
            or array.job_id in finished
            or time.monotonic() - array.submitted > COMMAND_TIMEOUT_SECONDS
        )
        array.done = known and array.job_id not in active


def _learn_exit_codes(slurm: _Slurm, array: _Array) -> None:
    """Each task's final state, reason and exit code from ``scontrol show job``, while the
    controller still remembers the job (``MinJobAge``, 300 s by default)."""
    proc = slurm.run("scontrol", "--oneliner", "show", "job", array.job_id, check=False)
    for record in parse_scontrol_tasks(proc.stdout):
        if not 0 <= record.task_id < len(array.tasks):
            continue
        task = array.tasks[record.task_id]
        if not task.never_starts:
            task.state = record.state if record.state is not None else task.state
            task.reason = record.reason if record.reason is not None else task.reason
        task.exit_code = record.exit_code


def _cancel(slurm: _Slurm, arrays: Sequence[_Array]) -> None:
    """``scancel`` the arrays and wait until ``squeue`` lists none of their tasks as pending or
    running (up to :data:`CANCEL_WAIT_SECONDS`)."""
    ids = [a.job_id for a in arrays if a.job_id and not a.done]
    if not ids:
        return
    logger.warning("cancelling SLURM job(s) %s", ", ".join(ids))
    try:
        slurm.run("scancel", *ids, check=False)
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline:
            proc = slurm.run(
                "squeue", "--noheader", f"--jobs={','.join(ids)}", "--format=%i", check=False
            )
            if not proc.stdout.strip() and (proc.returncode == 0 or "Invalid" in proc.stderr):
                return
            time.sleep(0.5)
        logger.error("SLURM job(s) %s still queued %g s after scancel", ids, CANCEL_WAIT_SECONDS)
    except SlurmError as exc:
        logger.error("could not cancel SLURM job(s) %s: %s", ids, exc)


@dataclass
class _JobArrays:
    """The SLURM transport: each round, job arrays of groups of ``indices_per_task`` indices,
    polled every ``poll`` seconds until they leave the queue."""

    slurm: _Slurm
    submitter: _Submitter
    indices_per_task: int
    poll: float
    cancel_event: threading.Event | None
    arrays: list[_Array] = field(default_factory=list)  # every one submitted, in all rounds
    doing = "submitting"
    what = "SLURM training done"

    def run_round(self, todo: list[int], round_number: int, progress: Progress) -> list[Finished]:
        size = self.indices_per_task
        groups = [todo[k : k + size] for k in range(0, len(todo), size)]
        round_arrays = []
        for m, first in enumerate(range(0, len(groups), MAX_ARRAY_TASKS)):
            array = self.submitter.submit(groups[first : first + MAX_ARRAY_TASKS], round_number, m)
            round_arrays.append(array)
            self.arrays.append(array)  # at once: an interrupt must find every one
        while True:
            if self.cancel_event is not None and self.cancel_event.is_set():
                raise SlurmCancelledError("training was cancelled (cancel_event set)")
            _poll_queue(self.slurm, round_arrays)
            if all(a.done for a in round_arrays):
                break
            progress.report(force=False)
            time.sleep(self.poll)
        finished = []
        for array in round_arrays:
            _learn_exit_codes(self.slurm, array)
            for task in array.tasks:
                if task.state != "COMPLETED":
                    logger.warning("%s; log %s", array.describe(task), array.log_path(task))
                finished.append(array.finished(task))
        return finished

    def stop(self) -> None:
        _cancel(self.slurm, self.arrays)


def train_models_slurm(
    store_dir: str | os.PathLike[str],
    indices: Sequence[int],
    *,
    main_import: str,
    script_args: Sequence[str] = (),
    job_timeout: float | None = None,
    retries: int = 1,
    commit_every: float = 1.0,
    indices_per_task: int = 10,
    sbatch: SbatchOptions | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    poll: float = 15.0,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    cancel_event: threading.Event | None = None,
    version: str | None = None,
    on_change: str | None = None,
    replace_configurations: Collection[int] = (),
) -> TrainingReport:
    """Train the models ``indices`` of the store at ``store_dir`` as SLURM job arrays and say
    what happened.

    Indices already completed are skipped without submitting anything. The others, in
    increasing order, are cut into groups of ``indices_per_task`` (the last may be smaller),
    one array task per group (arrays of at most :data:`MAX_ARRAY_TASKS` tasks), each running
    ``python -m dm_assets.worker`` with ``main_import``, ``script_args``, ``job_timeout``
    (seconds per index) and ``commit_every`` (seconds a trained row may wait to be stored with
    the next). Each task asks for ``sbatch`` (:class:`SbatchOptions`), starts in ``workdir``
    (default: the current directory, which the worker puts on ``sys.path``) and runs with the
    submitting environment (SLURM's default ``--export=ALL``) plus ``env``, which the batch
    script exports itself so that clusters exporting nothing still get it. SLURM's commands
    run with ``os.environ`` and ``env`` (so ``env={"SLURM_CONF": ...}`` picks a cluster).

    Every ``poll`` seconds ``squeue`` is asked about the tasks and ``on_progress(done, total)``
    is called, ``done`` counting the block's indices completed in the store (also called at
    the start and the end). Indices left incomplete once an array has left the queue go into a
    new array, up to ``retries`` more rounds; a task that ended with a usage error (exit 2) is
    not retried, nor one pending for a reason no wait resolves (:data:`NEVER_STARTS_REASONS`:
    a time limit above the partition's, an unknown account, ...), which is cancelled at once
    and its indices failed with that reason. ``TrainingReport.processes`` counts array tasks;
    ``seconds_per_model`` has the workers' time in ``main``.

    Raises ``ValueError`` for bad arguments, :class:`~dm_assets.store.store.StoreError` for a
    missing store or indices outside it, :class:`SlurmError` when ``sbatch`` refuses a job, and
    :class:`SlurmCancelledError` when ``cancel_event`` is set. On any exception every job it
    submitted is cancelled (``scancel``) and waited for until it leaves the queue.

    ``version``, ``on_change`` and ``replace_configurations``: as for
    :func:`~dm_assets.training.local.train_models`.
    """
    sbatch = SbatchOptions() if sbatch is None else sbatch
    problems = []
    if not is_positive_int(indices_per_task):
        problems.append(f"indices_per_task: must be a positive integer; got {indices_per_task!r}")
    if not poll > 0:
        problems.append(f"poll: must be > 0 seconds; got {poll!r}")
    problems.extend(sbatch.problems())
    store = Path(store_dir).absolute()
    command = WorkerCommand(
        python, store, main_import, script_args, job_timeout, commit_every, version, on_change
    )
    block = check_arguments(
        "train_models_slurm", indices, command, retries=retries, problems=problems
    )
    slurm = _Slurm({**os.environ, **(env or {})})
    submitter = _Submitter(
        slurm=slurm,
        command=command,
        sbatch=sbatch,
        env=dict(env or {}),
        workdir=Path(workdir if workdir is not None else os.getcwd()).absolute(),
        logs=launcher_logs(store, log_dir),
    )
    transport = _JobArrays(slurm, submitter, indices_per_task, poll, cancel_event)
    # progress on every poll: the poll interval is the progress interval
    return run_rounds(store, block, transport, retries, on_progress, 0.0, replace_configurations)


__all__ = [
    "CANCEL_WAIT_SECONDS",
    "MAX_ARRAY_TASKS",
    "NEVER_STARTS_REASONS",
    "QueueLine",
    "SbatchOptions",
    "SlurmCancelledError",
    "SlurmError",
    "TaskRecord",
    "describe_exit_code",
    "never_starts",
    "parse_sacct_states",
    "parse_sbatch_job_id",
    "parse_scontrol_states",
    "parse_scontrol_tasks",
    "parse_squeue",
    "parse_task_ids",
    "train_models_slurm",
]
