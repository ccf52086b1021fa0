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
the controller still knows the job: accounting is not needed). Indices left incomplete (an
exception in ``main``, a timeout, a task killed, cancelled, out of memory or past its time
limit) go into a new job array, up to ``retries`` more rounds; a task SLURM will never start
(pending with reason ``PartitionTimeLimit``, ``InvalidAccount``, ...) is cancelled and its
indices failed with that reason. Interrupted (``KeyboardInterrupt``,
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

Nothing here imports dagster; :class:`dm_assets.pipeline.resources.slurm_trainer.SlurmTrainer`
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from dm_assets.cli import EXIT_USAGE
from dm_assets.errors import DmError
from dm_assets.store.store import Store
from dm_assets.training.local import (
    Progress,
    TrainingReport,
    block_problems,
    compact_ranges,
    log_retry,
    skip_completed,
)
from dm_assets.training.runner import IndexOutcome, read_report

logger = logging.getLogger(__name__)

# SLURM's default MaxArraySize is 1001: task ids 0..1000. Larger blocks are split into arrays.
MAX_ARRAY_TASKS = 1000
# After scancel, how long to wait for the jobs to leave squeue before giving up (SLURM sends
# SIGTERM, then SIGKILL after the cluster's KillWait, 30 s by default).
CANCEL_WAIT_SECONDS = 60.0
# Per SLURM command: a busy controller answers slowly, a dead one never.
COMMAND_TIMEOUT_SECONDS = 60.0
_LOG_TAIL_LINES = 20
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
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
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
            code, _, sig = task.exit_code.partition(":")
            details.append(
                f"killed by signal {sig}" if sig not in ("", "0") else f"exit code {code}"
            )
        return text + (f" ({', '.join(details)})" if details else "")

    def log_tail(self, task: _Task, lines: int = _LOG_TAIL_LINES) -> str:
        path = self.log_path(task)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return f"(no log {path}: the task never started)"
        except OSError as exc:
            return f"(its log {path} is unreadable: {exc})"
        tail = data.decode(errors="replace").rstrip().splitlines()[-lines:]
        if not tail:
            return f"(nothing in its log {path})"
        return f"last lines of {path}:\n" + "\n".join(f"  | {line}" for line in tail)


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
    python: str
    store_dir: Path
    main_import: str
    script_args: tuple[str, ...]
    job_timeout: float | None
    commit_every: float
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
        command = [
            shlex.quote(self.python),
            "-m",
            "dm_assets.worker",
            '--worker.indices="$indices"',
            shlex.quote(f"--worker.logdir={self.store_dir}"),
            shlex.quote(f"--worker.main_import={self.main_import}"),
            f"--worker.report={report}",
            f"--worker.commit_every={float(self.commit_every)!r}",
            *(
                [f"--worker.job_timeout={float(self.job_timeout)!r}"]
                if self.job_timeout is not None
                else []
            ),
            *(shlex.quote(a) for a in self.script_args),
        ]
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
        array.job_id = proc.stdout.strip().split(";")[0]
        if not array.job_id.isdigit():
            raise SlurmError(f"sbatch answered {proc.stdout.strip()!r}, not a job id")
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


def _task_ids(text: str) -> list[int]:
    """``"3"``, ``"[3-5,7%2]"`` as task ids."""
    body = text.strip("[]").split("%")[0]
    ids: list[int] = []
    for part in filter(None, body.split(",")):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def _poll_queue(slurm: _Slurm, arrays: Sequence[_Array]) -> None:
    """Update the tasks of the arrays not yet done from ``squeue``; mark an array done once none
    of its tasks is pending or running."""
    live = [a for a in arrays if not a.done]
    if not live:
        return
    proc = slurm.run(
        "squeue",
        "--noheader",
        "--states=all",
        f"--jobs={','.join(a.job_id for a in live)}",
        "--format=%i %T %r",
        check=False,
    )
    if proc.returncode != 0:
        if "Invalid job id" not in proc.stderr:  # a job forgotten by the controller is done
            logger.warning("squeue failed (%s); trying again", proc.stderr.strip())
            return
        proc.stdout = ""
    by_id = {a.job_id: a for a in live}
    active: set[str] = set()
    hopeless: list[str] = []
    for line in proc.stdout.splitlines():
        words = line.split(maxsplit=2)
        match = re.fullmatch(r"(\d+)(?:_(\S+))?", words[0]) if len(words) >= 2 else None
        if match is None or match[1] not in by_id:
            continue
        array = by_id[match[1]]
        array.seen = True
        state, reason = words[1], words[2] if len(words) > 2 else "None"
        if match[2] is None:  # the array's record itself: its tasks that never started
            ids = [t.index for t in array.tasks if t.state == "PENDING"]
        else:
            ids = [k for k in _task_ids(match[2]) if 0 <= k < len(array.tasks)]
        for k in ids:
            task = array.tasks[k]
            if not task.never_starts:
                task.state, task.reason = state, reason
            if state == "PENDING" and NEVER_STARTS_REASONS.match(reason):
                task.never_starts = True
                hopeless.append(f"{array.job_id}_{k}")
        if state not in _FINAL_STATES:
            active.add(array.job_id)
    if hopeless:
        logger.error(
            "SLURM task(s) %s pending for a reason no wait resolves; cancelling them",
            " ".join(hopeless),
        )
        slurm.run("scancel", *hopeless, check=False)
    for array in live:
        # a job squeue never listed may not have reached it yet; after a minute it is gone
        known = array.seen or time.monotonic() - array.submitted > COMMAND_TIMEOUT_SECONDS
        array.done = known and array.job_id not in active


def _learn_exit_codes(slurm: _Slurm, array: _Array) -> None:
    """Each task's final state, reason and exit code from ``scontrol show job``, while the
    controller still remembers the job (``MinJobAge``, 300 s by default)."""
    proc = slurm.run("scontrol", "--oneliner", "show", "job", array.job_id, check=False)
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(?:^| )(ArrayTaskId|JobState|Reason|ExitCode)=(\S*)", line))
        task_id = fields.get("ArrayTaskId", "")
        if not task_id.isdigit() or not 0 <= int(task_id) < len(array.tasks):
            continue
        task = array.tasks[int(task_id)]
        if not task.never_starts:
            task.state = fields.get("JobState", task.state)
            task.reason = fields.get("Reason", task.reason)
        task.exit_code = fields.get("ExitCode", "")


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


def _check_arguments(
    indices: Sequence[int],
    main_import: str,
    job_timeout: float | None,
    retries: int,
    commit_every: float,
    indices_per_task: int,
    sbatch: SbatchOptions,
    poll: float,
) -> list[int]:
    """The block's indices, repeats dropped; raises ``ValueError`` listing every bad argument."""
    block, problems = block_problems(indices, main_import, job_timeout, retries, commit_every)
    if (
        isinstance(indices_per_task, bool)
        or not isinstance(indices_per_task, int)
        or indices_per_task < 1
    ):
        problems.append(f"indices_per_task: must be a positive integer; got {indices_per_task!r}")
    if not poll > 0:
        problems.append(f"poll: must be > 0 seconds; got {poll!r}")
    problems.extend(sbatch.problems())
    if problems:
        raise ValueError("train_models_slurm: " + "; ".join(problems))
    return block


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
    """
    start = time.monotonic()
    sbatch = SbatchOptions() if sbatch is None else sbatch
    block = _check_arguments(
        indices, main_import, job_timeout, retries, commit_every, indices_per_task, sbatch, poll
    )
    store_dir = Path(store_dir).absolute()
    logs = Path(log_dir).absolute() if log_dir is not None else store_dir / "launcher_logs"
    slurm = _Slurm({**os.environ, **(env or {})})
    submitter = _Submitter(
        slurm=slurm,
        python=python,
        store_dir=store_dir,
        main_import=main_import,
        script_args=tuple(script_args),
        job_timeout=job_timeout,
        commit_every=commit_every,
        sbatch=sbatch,
        env=dict(env or {}),
        workdir=Path(workdir if workdir is not None else os.getcwd()).absolute(),
        logs=logs,
    )
    report = TrainingReport()
    with Store.open(store_dir) as store:
        todo = skip_completed(store, block, report)
        # called on every poll: the poll interval is the progress interval
        progress = Progress(on_progress, 0.0, store, block).report
        progress()
        arrays: list[_Array] = []
        try:
            while todo and report.rounds <= retries:
                report.rounds += 1
                groups = [
                    todo[k : k + indices_per_task] for k in range(0, len(todo), indices_per_task)
                ]
                round_arrays = []
                for m, first in enumerate(range(0, len(groups), MAX_ARRAY_TASKS)):
                    array = submitter.submit(
                        groups[first : first + MAX_ARRAY_TASKS], report.rounds, m
                    )
                    round_arrays.append(array)
                    arrays.append(array)  # at once: an interrupt must find every one
                report.processes += len(groups)
                while True:
                    if cancel_event is not None and cancel_event.is_set():
                        raise SlurmCancelledError("training was cancelled (cancel_event set)")
                    _poll_queue(slurm, round_arrays)
                    if all(a.done for a in round_arrays):
                        break
                    progress()
                    time.sleep(poll)
                for array in round_arrays:
                    _learn_exit_codes(slurm, array)
                todo = _collect_round(store, round_arrays, report, retries)
        except BaseException:
            _cancel(slurm, arrays)
            raise
        progress()
    return report.finish(start, "SLURM training done")


def _collect_round(
    store: Store, arrays: Sequence[_Array], report: TrainingReport, retries: int
) -> list[int]:
    """Record the round's outcomes in ``report`` (replacing what earlier rounds said of these
    indices); the indices to run again."""
    mask = store.completed_mask()
    again: list[int] = []
    for array in arrays:
        for task in array.tasks:
            outcomes: dict[int, IndexOutcome] = {}
            error = None
            exit_code = None
            path = array.report_path(task)
            if path.exists():
                try:
                    worker_report, exit_code, error = read_report(path)
                    outcomes = {o.index: o for o in worker_report.outcomes}
                except ValueError as exc:
                    logger.warning("%s", exc)
            # a usage error, or a task SLURM will never start, fails the same way every time
            usage_error = (
                exit_code == EXIT_USAGE
                or task.exit_code.startswith(f"{EXIT_USAGE}:")
                or task.never_starts
            )
            for i in task.indices:
                report.failed.pop(i, None)
                outcome = outcomes.get(i)
                if mask[i]:
                    if outcome is not None and outcome.status == "skipped":
                        report.skipped.append(i)  # completed meanwhile by someone else
                    else:
                        report.trained.append(i)
                        if outcome is not None and outcome.status == "trained":
                            report.seconds_per_model[i] = outcome.seconds
                    continue
                if outcome is not None and outcome.status in ("failed", "timeout"):
                    reason = outcome.message or outcome.status
                    report.failed[i] = f"{reason} [{array.describe(task)}]"
                else:
                    reason = array.describe(task)
                    if error:
                        reason += f": {error}"
                    report.failed[i] = f"{reason}\n{array.log_tail(task)}"
                if not usage_error:
                    again.append(i)
            if task.state != "COMPLETED":
                logger.warning("%s; log %s", array.describe(task), array.log_path(task))
    log_retry(again, report, retries, "submitting")
    return sorted(again)


__all__ = [
    "CANCEL_WAIT_SECONDS",
    "MAX_ARRAY_TASKS",
    "NEVER_STARTS_REASONS",
    "SbatchOptions",
    "SlurmCancelledError",
    "SlurmError",
    "train_models_slurm",
]
