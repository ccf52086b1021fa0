"""The launcher core: what training a block of model indices means, whatever runs the workers.

A launcher trains the indices of a block that the store does not yet hold, in rounds: a round
starts seed-compatible workers on groups of the indices left to train (the same command line,
:class:`WorkerCommand`, for every transport)::

    python -m dm_assets.worker --worker.indices=<group> --worker.logdir=<store>
        --worker.main_import=<module> --worker.report=<json> --worker.commit_every=<s>
        [--worker.job_timeout=<s>] [--worker.version=<v>] [--worker.on_change=<what>]
        <script arguments>

waits for them to end, reads what they reported (each worker's ``--worker.report`` JSON, the
store's completion flags and how the transport saw the worker end: :class:`Finished`) into a
:class:`TrainingReport`, and runs the indices still incomplete in a new round, up to
``retries`` more rounds (:func:`run_rounds`). An index counts as done when its completion flag
is set and its row was not written under one of the configurations being replaced
(``on_change: retrain``, :func:`done_mask`). The transports only start, wait for and stop
workers: :mod:`dm_assets.training.local` (worker processes on this machine's device slots) and
:mod:`dm_assets.training.slurm` (SLURM job arrays).

Nothing here starts a process or imports dagster; everything but :func:`run_rounds` and
:func:`skip_completed` (which open the store) works on plain values.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import statistics
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from dm_assets.cli import EXIT_USAGE
from dm_assets.store.store import Store, StoreError
from dm_assets.training.runner import IndexOutcome, read_report

logger = logging.getLogger(__name__)

# Lines of a worker's log quoted in the reason of each index it left incomplete.
LOG_TAIL_LINES = 20
# What a worker does when the store holds completed rows of another training configuration.
ON_CHANGE = ("refuse", "retrain", "mix")

K = TypeVar("K")


@dataclass
class TrainingReport:
    """What a launcher did with a block of model indices.

    ``trained``: indices completed by this call, increasing. ``skipped``: indices found
    already completed (before or while it ran), increasing. ``failed``: every index left
    incomplete after the last round, with why (the worker's message for that index, or how its
    worker process ended and the last lines of its log). ``seconds_per_model``: the worker's
    wall time of ``main`` for each trained index whose worker wrote its report (an index
    stored by a worker that later crashed has none). ``wall_seconds``: the whole call.
    ``rounds``: rounds of workers run (1 + retries used). ``processes``: workers started in
    all (worker processes, or SLURM array tasks).
    """

    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    seconds_per_model: dict[int, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    rounds: int = 0
    processes: int = 0

    @property
    def ok(self) -> bool:
        """Whether every index of the block is now completed."""
        return not self.failed

    @property
    def mean_seconds_per_model(self) -> float:
        """The mean of ``seconds_per_model`` (0.0 when it is empty)."""
        seconds = list(self.seconds_per_model.values())
        return statistics.fmean(seconds) if seconds else 0.0

    def summary(self, max_failures: int = 10) -> str:
        """One line of counts, then one line per failed index (at most ``max_failures``)."""
        total = len(self.trained) + len(self.skipped) + len(self.failed)
        text = (
            f"{total} model(s): {len(self.trained)} trained, {len(self.skipped)} skipped "
            f"(already completed), {len(self.failed)} failed; {self.rounds} round(s), "
            f"{self.processes} worker process(es), {self.wall_seconds:.1f} s"
        )
        if self.seconds_per_model:
            text += f", {self.mean_seconds_per_model:.2f} s per model in main()"
        failed = sorted(self.failed.items())
        for index, reason in failed[:max_failures]:
            first = reason.strip().splitlines()[0] if reason.strip() else "unknown"
            text += f"\n  index {index}: {first}"
        if len(failed) > max_failures:
            text += f"\n  ... and {len(failed) - max_failures} more failed"
        return text

    def failure_text(self, retries: int) -> str:
        """Every failed index with its whole reason, under a line counting them (``retries``:
        the retry rounds the launcher was allowed)."""
        detail = "\n".join(f"  model {i}: {why}" for i, why in sorted(self.failed.items()))
        return (
            f"{len(self.failed)} model(s) still failing after {retries} retry round(s): "
            f"{sorted(self.failed)}; every other model of this run is stored.\n{detail}"
        )

    def finish(self, started: float, what: str) -> TrainingReport:
        """Sort the lists, set ``wall_seconds`` since ``started`` (``time.monotonic``), log
        ``what`` with the summary (an error when some index failed); returns itself."""
        self.trained.sort()
        self.skipped.sort()
        self.failed = dict(sorted(self.failed.items()))
        self.wall_seconds = time.monotonic() - started
        (logger.info if self.ok else logger.error)("%s: %s", what, self.summary())
        return self


def completed_blocks(report: TrainingReport, blocks: Mapping[K, Sequence[int]]) -> list[K]:
    """The keys of ``blocks`` (a key per block of model indices, e.g. a partition's) none of
    whose indices ``report`` lists as failed: after a call over all of them, every model of
    such a block is stored. In ``blocks``' order."""
    failed = set(report.failed)
    return [key for key, indices in blocks.items() if not failed.intersection(indices)]


def compact_ranges(indices: Iterable[int]) -> str:
    """Indices as ``"0-4,7,9-10"``: runs of consecutive increasing values as inclusive ranges,
    in the given order, repeats dropped; what ``--worker.indices`` (and SLURM's ``--array``)
    read, so ``parse_indices(compact_ranges(x))`` is ``x`` without its repeats."""
    parts: list[str] = []
    seen: set[int] = set()
    first = last = -2
    for raw in indices:
        i = int(raw)
        if i < 0:
            raise ValueError(f"indices must be >= 0; got {i}")
        if i in seen:
            continue
        seen.add(i)
        if i == last + 1 and first >= 0:
            last = i
            continue
        if first >= 0:
            parts.append(str(first) if first == last else f"{first}-{last}")
        first = last = i
    if first >= 0:
        parts.append(str(first) if first == last else f"{first}-{last}")
    return ",".join(parts)


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class WorkerCommand:
    """The seed-compatible worker's command line: what every worker of a launcher call shares.

    ``python`` runs ``-m dm_assets.worker`` on the store at ``store_dir`` with the training
    script ``main_import`` (its ``main(index, logdir)``), ``commit_every`` (seconds a trained
    row may wait to be stored with the next), ``job_timeout`` (seconds per index, or none) and
    ``script_args`` (passed to the script). ``version``: the trainer's declared version
    (``--worker.version``, part of the training configuration; none: the script's source is
    hashed); ``on_change``: what the worker does when the store holds rows of another
    configuration (``--worker.on_change``: refuse, retrain or mix; none: the worker's default,
    refuse).
    """

    python: str
    store_dir: Path
    main_import: str
    script_args: Sequence[str] = ()
    job_timeout: float | None = None
    commit_every: float = 1.0
    version: str | None = None
    on_change: str | None = None

    def argv(
        self, indices: str, report: str, *, quote: Callable[[str], str] = lambda word: word
    ) -> list[str]:
        """The command's words for a worker training ``indices`` (as ``"0-9,12"``) that writes
        its report to ``report``. ``quote`` is applied to every word but those two (a shell
        script passes ``shlex.quote`` and shell expressions for them)."""
        return [
            quote(self.python),
            "-m",
            "dm_assets.worker",
            f"--worker.indices={indices}",
            quote(f"--worker.logdir={self.store_dir}"),
            quote(f"--worker.main_import={self.main_import}"),
            f"--worker.report={report}",
            quote(f"--worker.commit_every={float(self.commit_every)!r}"),
            *(
                [quote(f"--worker.job_timeout={float(self.job_timeout)!r}")]
                if self.job_timeout is not None
                else []
            ),
            *([quote(f"--worker.version={self.version}")] if self.version is not None else []),
            *(
                [quote(f"--worker.on_change={self.on_change}")]
                if self.on_change is not None
                else []
            ),
            *(quote(a) for a in self.script_args),
        ]


def check_arguments(
    launcher: str,
    indices: Sequence[int],
    command: WorkerCommand,
    *,
    retries: int,
    problems: Sequence[str] = (),
) -> list[int]:
    """The block's indices, repeats dropped, after checking what every launcher takes.

    Parameters
    ----------
    launcher : str
        The launcher's function name, which starts the error message.
    indices : sequence of int
        The block's model indices (each an integer >= 0).
    command : WorkerCommand
        The workers' command line: its ``main_import``, ``job_timeout`` and ``commit_every``
        are checked.
    retries : int
        Rounds after the first (an integer >= 0).
    problems : sequence of str
        The launcher's own problems with its other arguments, listed after these.

    Raises ``ValueError`` listing every problem, each naming the argument, the value and the fix.
    """
    main_import, job_timeout = command.main_import, command.job_timeout
    commit_every = command.commit_every
    found = []
    block: list[int] = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            found.append(f"indices: every index must be an integer >= 0; got {i!r}")
            break
        block.append(int(i))
    if not main_import:
        found.append("main_import: name the module whose main(index, logdir) trains a model")
    if job_timeout is not None and not job_timeout > 0:
        found.append(f"job_timeout: must be > 0 seconds or None; got {job_timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        found.append(f"retries: must be an integer >= 0 (extra rounds); got {retries!r}")
    if not commit_every >= 0:
        found.append(f"commit_every: must be >= 0 seconds; got {commit_every!r}")
    if command.on_change not in (None, *ON_CHANGE):
        found.append(
            f"on_change: must be one of {', '.join(ON_CHANGE)} or None; got {command.on_change!r}"
        )
    found.extend(problems)
    if found:
        raise ValueError(f"{launcher}: " + "; ".join(found))
    return list(dict.fromkeys(block))


def signal_name(number: int) -> str | None:
    """The name of signal ``number`` (``SIGTERM`` for 15), None when it names none."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def exit_code_words(code: int) -> str:
    """A process's exit code with the signal it names, if any: ``-9 (killed by SIGKILL)``
    (Python's code for a process a signal killed), ``143 (stopped by SIGTERM)`` (128 + the
    signal's number: what a shell reports, and what the worker exits with after it stops on
    SIGTERM or SIGINT), else just the code (``1``)."""
    if code < 0 and (name := signal_name(-code)):
        return f"{code} (killed by {name})"
    if code > 128 and (name := signal_name(code - 128)):
        return f"{code} (stopped by {name})"
    return str(code)


def launcher_logs(store_dir: Path, log_dir: str | os.PathLike[str] | None) -> Path:
    """The folder of a launcher's logs: ``log_dir``, default ``<store_dir>/launcher_logs``."""
    return Path(log_dir).absolute() if log_dir is not None else store_dir / "launcher_logs"


def log_tail(
    path: Path, *, offset: int = 0, lines: int = LOG_TAIL_LINES, missing: str | None = None
) -> str:
    """The last ``lines`` lines of the log at ``path`` from byte ``offset`` on, under a line
    naming the file, each as ``"  | <line>"``; else one line in parentheses saying why there
    are none (``missing``, when given, is that line for a log that does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError as exc:
        return missing if missing is not None else f"(its log {path} is unreadable: {exc})"
    except OSError as exc:
        return f"(its log {path} is unreadable: {exc})"
    tail = data.decode(errors="replace").rstrip().splitlines()[-lines:]
    if not tail:
        return f"(nothing in its log {path})"
    return f"last lines of {path}:\n" + "\n".join(f"  | {line}" for line in tail)


@dataclass(frozen=True)
class Finished:
    """A worker (a process, an array task) that ended a round, as its transport saw it.

    ``indices``: what it was given to train. ``report_path``: where it was told to write its
    report (absent when it died first). ``log_path``: its output, from byte ``log_offset`` on
    (a log is appended to when the same group runs again); ``missing_log``: what to say when
    that file does not exist (default: that it is unreadable). ``ended``: how it ended, in
    words (``"worker process exited with code -9 (killed by SIGKILL)"``). ``final``: the
    transport knows its failures would repeat (a usage error, a task SLURM never starts): its
    indices are not retried. ``note``: appended in brackets to the worker's own failure
    messages (SLURM names the task).
    """

    indices: Sequence[int]
    report_path: Path
    log_path: Path
    ended: str
    log_offset: int = 0
    missing_log: str | None = None
    final: bool = False
    note: str = ""

    def log_tail(self) -> str:
        return log_tail(self.log_path, offset=self.log_offset, missing=self.missing_log)


def read_outcomes(path: Path) -> tuple[dict[int, IndexOutcome], int | None, str | None]:
    """``(outcomes by index, exit code, error)`` from the worker report at ``path``;
    ``({}, None, None)`` when there is none or it is not a report (logged)."""
    if path.exists():
        try:
            worker_report, exit_code, error = read_report(path)
            return {o.index: o for o in worker_report.outcomes}, exit_code, error
        except ValueError as exc:
            logger.warning("%s", exc)
    return {}, None, None


def collect_round(
    completed: np.ndarray, finished: Sequence[Finished], report: TrainingReport
) -> list[int]:
    """Record a round's outcomes in ``report``, replacing what earlier rounds said of its
    indices; the indices to run again, increasing.

    ``completed``: which rows are done after the round (bool, ``(num_models,)``: the store's
    completion flags, or :func:`done_mask`). An index is trained (or skipped, when its worker
    found it completed by someone else) if its row is done; else failed, with its worker's
    message when the worker reported one, or how the worker ended and the last lines of its
    log. It runs again unless its worker's failures would repeat (:attr:`Finished.final`, or a
    report with a usage error's exit code).
    """
    again: list[int] = []
    for worker in finished:
        outcomes, exit_code, error = read_outcomes(worker.report_path)
        final = worker.final or exit_code == EXIT_USAGE
        for i in worker.indices:
            report.failed.pop(i, None)  # this round's word replaces the previous one's
            outcome = outcomes.get(i)
            if completed[i]:
                if outcome is not None and outcome.status == "skipped":
                    report.skipped.append(i)  # completed meanwhile by someone else
                else:
                    report.trained.append(i)
                    if outcome is not None and outcome.status == "trained":
                        report.seconds_per_model[i] = outcome.seconds
                continue
            if outcome is not None and outcome.status in ("failed", "timeout"):
                reason = outcome.message or outcome.status
                report.failed[i] = f"{reason} [{worker.note}]" if worker.note else reason
            else:
                reason = worker.ended + (f": {error}" if error else "")
                report.failed[i] = f"{reason}\n{worker.log_tail()}"
            if not final:
                again.append(i)
    return sorted(again)


def done_mask(store: Store, replace: Collection[int] = ()) -> np.ndarray:
    """Which rows of ``store`` are done: bool ``(num_models,)``, its completion flags, except
    rows written under a configuration id in ``replace`` (the configurations an
    ``on_change: retrain`` launch replaces: such a row stays readable, and completed, until its
    worker replaces it)."""
    mask = store.completed_mask()
    if replace:
        mask = mask & ~np.isin(store.configuration_ids(), np.fromiter(replace, dtype=np.int64))
    return mask


def plan_text(store: Store, indices: Sequence[int], replace: Collection[int] = ()) -> str:
    """What training ``indices`` of ``store`` will do, said before it starts: how many are
    selected, how many will be trained (and how many of those replace rows of a configuration
    in ``replace``) and how many are skipped because :func:`done_mask` says they are done, e.g.
    ``"300 model(s) selected: 0 to train, 300 skipped (already completed: 0-299)"``."""
    selected = np.asarray(indices, dtype=np.int64)
    done = done_mask(store, replace)[selected]
    skipped = np.sort(selected[done])
    to_train = len(selected) - len(skipped)
    text = f"{len(selected)} model(s) selected: {to_train} to train"
    if replace:
        again = int((store.completed_mask()[selected] & ~done).sum())
        if again:
            text += f" ({again} of them again, to replace their configuration)"
    text += f", {len(skipped)} skipped"
    if len(skipped):
        text += f" (already completed: {compact_ranges(skipped.tolist())})"
    return text


def skip_completed(
    store: Store, block: Sequence[int], report: TrainingReport, replace: Collection[int] = ()
) -> list[int]:
    """The block's indices still to train, in order; the done ones (:func:`done_mask` with
    ``replace``) go to ``report.skipped``. Raises :class:`~dm_assets.store.store.StoreError` for
    indices outside the store."""
    outside = [i for i in block if i >= store.spec.num_models]
    if outside:
        raise StoreError(
            f"indices {outside[:10]} are outside the store's range "
            f"[0, {store.spec.num_models}) at {store.path}"
        )
    mask = done_mask(store, replace)
    report.skipped = [i for i in block if mask[i]]
    if report.skipped:
        logger.info(
            "%d of %d model(s) already completed: %s",
            len(report.skipped),
            len(block),
            compact_ranges(sorted(report.skipped)),
        )
    return sorted(i for i in block if not mask[i])


def log_retry(again: Sequence[int], report: TrainingReport, retries: int, doing: str) -> None:
    """Say that ``again`` failed in this round and is ``doing`` (running, submitting) again."""
    if again and report.rounds <= retries:
        logger.warning(
            "%d index(es) failed in round %d (%s); %s them again (%d retry round(s) left)",
            len(again),
            report.rounds,
            compact_ranges(sorted(again)),
            doing,
            retries - report.rounds + 1,
        )


class Progress:
    """Calls ``callback(done, total)``, ``done`` counting the indices of ``block`` done in
    ``store`` (:func:`done_mask` with ``replace``), at most every ``every`` seconds (or whenever
    forced)."""

    def __init__(
        self,
        callback: Callable[[int, int], None] | None,
        every: float,
        store: Store,
        block: Sequence[int],
        replace: Collection[int] = (),
    ) -> None:
        self.callback, self.every, self.store = callback, every, store
        self.block = np.asarray(block, dtype=np.int64)
        self.replace = frozenset(replace)
        self.due = 0.0

    def report(self, *, force: bool = True) -> None:
        now = time.monotonic()
        if self.callback is None or (not force and now < self.due):
            return
        self.due = now + self.every
        self.callback(int(done_mask(self.store, self.replace)[self.block].sum()), len(self.block))


def progress_lines(
    say: Callable[..., object], what: str, every: float
) -> Callable[[int, int], None]:
    """An ``on_progress(done, total)`` that says ``"<what>: <done> / <total> models done (<s>
    s)"`` through ``say(format, *args)`` (a logger's ``info``), at most every ``every``
    seconds and whenever all are done; ``s`` counts from this call."""
    started = time.perf_counter()
    last = -math.inf  # the first call is always said

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every or done == total:
            last = now
            say("%s: %d / %d models done (%.0f s)", what, done, total, now - started)

    return progress


class Transport(Protocol):
    """How a launcher runs its workers: the part that differs between local processes and
    SLURM job arrays. ``doing``: the word for running indices again in the retry log line
    (``running``, ``submitting``); ``what``: the final log line's word for the call."""

    doing: str
    what: str

    def run_round(self, todo: list[int], round_number: int, progress: Progress) -> list[Finished]:
        """Start workers on groups of ``todo`` (increasing), wait until every one has ended
        (calling ``progress.report(force=False)`` meanwhile), and say how each ended. Every
        worker started must be known to :meth:`stop` as soon as it starts."""
        ...

    def stop(self) -> None:
        """End every worker started so far by any round, and wait for them to be gone."""
        ...


def run_rounds(
    store_dir: Path,
    block: Sequence[int],
    transport: Transport,
    retries: int,
    on_progress: Callable[[int, int], None] | None,
    progress_every: float,
    replace: Collection[int] = (),
) -> TrainingReport:
    """Train ``block`` (checked indices of the store at ``store_dir``) in rounds of
    ``transport``'s workers and say what happened.

    Parameters
    ----------
    store_dir : Path
        The store.
    block : sequence of int
        The indices to train; those already completed are skipped without starting anything.
    transport : Transport
        Starts, waits for and stops the workers.
    retries : int
        Rounds after the first for indices left incomplete.
    on_progress : callable, optional
        ``on_progress(done, total)``: at the start, as the transport waits (at most every
        ``progress_every`` seconds) and at the end.
    progress_every : float
        Seconds between progress calls while workers run.
    replace : collection of int
        Configuration ids whose completed rows in ``block`` are trained again (the workers'
        ``--worker.on_change=retrain`` replaces them); see :func:`done_mask`.

    On any exception (an interrupt, an exception from ``on_progress``) every worker is stopped
    (:meth:`Transport.stop`) before it goes on.
    """
    started = time.monotonic()
    report = TrainingReport()
    with Store.open(store_dir) as store:
        todo = skip_completed(store, block, report, replace)
        progress = Progress(on_progress, progress_every, store, block, replace)
        progress.report()
        try:
            while todo and report.rounds <= retries:
                report.rounds += 1
                finished = transport.run_round(todo, report.rounds, progress)
                report.processes += len(finished)
                todo = collect_round(done_mask(store, replace), finished, report)
                log_retry(todo, report, retries, transport.doing)
        except BaseException:
            transport.stop()
            raise
        progress.report()
    return report.finish(started, transport.what)


__all__ = [
    "LOG_TAIL_LINES",
    "ON_CHANGE",
    "Finished",
    "Progress",
    "TrainingReport",
    "Transport",
    "WorkerCommand",
    "check_arguments",
    "collect_round",
    "compact_ranges",
    "completed_blocks",
    "done_mask",
    "is_positive_int",
    "launcher_logs",
    "log_retry",
    "log_tail",
    "progress_lines",
    "read_outcomes",
    "run_rounds",
    "skip_completed",
]
