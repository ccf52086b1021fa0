"""Train models and store their outputs: the seed's ``worker`` command, plus many indices per
process.

    python -m dm_assets.worker --worker.index=I --worker.main_import=MODULE --worker.logdir=DIR
        [--worker.do_if_complete] [--worker.job_timeout=SECONDS] [--worker.kill_grace=SECONDS]
        [--worker.commit_every=SECONDS] [--worker.report=PATH] [--worker.version=V]
        [--worker.on_change=refuse|retrain|mix] [SCRIPT ARGUMENTS ...]
    python -m dm_assets.worker --worker.indices=0-99,120 ...   # one process, imported once

For each index the worker calls ``MODULE.main(index=I, logdir="DIR/workers/I")``, checks the
returned ``{key: value}`` against the store's spec, and writes the row (see
:mod:`dm_assets.store.store` for the write protocol). Every argument that is not a ``--worker.*``
option reaches the script untouched: it is left in ``sys.argv``, and when the script declares
fastargs sections they are filled from it as the seed's worker does.

Every row is written with the id of the worker's training configuration
(:mod:`dm_assets.training.configuration`: the store's schema, the module, the pass-through
arguments, the module's source hash or ``--worker.version``, the library versions), registered
in the store's ``configurations.json``. When the store already records configurations and
holds completed rows of another known one, ``--worker.on_change`` decides, before anything is
trained: ``refuse`` (the default) exits 2 naming what changed (``digits.lr: 0.1 -> 2.0``) and
the remedies; ``retrain`` trains the completed rows among its indices whose configuration
differs (unknown included) again and replaces each atomically (the old row stays readable
until then); ``mix`` trains only what is missing. A store that records no configuration (the
seed's) is used as before.

Exit status: 0 when every index was trained or skipped as already completed; 1 when any index
failed (an exception, or values that do not fit the spec); 124 when every failure was a
timeout; 2 for a usage error or a refused configuration change; 128 + the signal's number
(143, 130) when SIGTERM or SIGINT stopped it (``scancel``, a SLURM time limit, the local
launcher's stop, Ctrl-C). A failed index is never marked completed.

A trained row is stored at most ``--worker.commit_every`` seconds after its model returned
(a background thread commits the waiting group while the next model trains). On SIGTERM or
SIGINT the model being trained is interrupted and left incomplete, the finished rows are
stored, and the worker exits as above.

With ``--worker.report=PATH`` the worker also writes what happened as JSON, replacing ``PATH``
atomically (a temporary file renamed), once, when it ends; only a process that dies (SIGKILL, a
crash, the hard timeout kill) leaves none::

    {"outcomes": [{"index": 3, "status": "trained", "seconds": 0.41, "message": ""}, ...],
     "exit_code": 1,
     "error": "StoreError: ..."}      # only when the worker itself failed, not an index

``outcomes`` lists the indices that ran, in order (``status``: trained, skipped, failed or
timeout; ``seconds``: wall time of ``main`` for that index); ``exit_code`` is the process's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

import numpy as np

from dm_assets.cli import EXIT_FAILED, EXIT_USAGE, add_flag, configure_logging, make_parser, run
from dm_assets.errors import DmError
from dm_assets.store.rows import RowError, coerce_row
from dm_assets.store.store import Store, StoreError
from dm_assets.training.configuration import (
    UNKNOWN_CONFIGURATION,
    ConfigurationChangedError,
    ConfigurationError,
    TrainingConfiguration,
    configuration_for,
    find_configuration_conflicts,
    rows_to_retrain,
)

logger = logging.getLogger(__name__)

EXIT_TIMEOUT = 124
# After a timeout the script gets this long to unwind before the process is ended outright
# (a script blocked inside C code never sees the timeout exception).
HARD_KILL_GRACE_SECONDS = 30.0

Routine = Callable[..., Mapping[str, object]]
Status = Literal["trained", "skipped", "failed", "timeout"]
ON_CHANGE_CHOICES = ("refuse", "retrain", "mix")
WORKER_REMEDIES = (
    "--worker.on_change=retrain: train those rows among this worker's indices again under the "
    "new configuration, replacing each row atomically",
    "--worker.on_change=mix: keep them and train only what is missing (every row records its "
    "configuration; fits report the mix)",
    "or go back to the stored configuration (the old values above), or use a new store",
)


class JobTimeout(BaseException):
    """Raised inside the training script when its index exceeds the job timeout."""


@dataclass(frozen=True)
class IndexOutcome:
    """What happened to one model index."""

    index: int
    status: Status
    seconds: float
    message: str = ""


@dataclass
class WorkerReport:
    """Outcomes of a run over many indices, in the order they ran."""

    outcomes: list[IndexOutcome] = field(default_factory=list)

    def _with(self, *statuses: Status) -> list[int]:
        return [o.index for o in self.outcomes if o.status in statuses]

    @property
    def trained(self) -> list[int]:
        return self._with("trained")

    @property
    def skipped(self) -> list[int]:
        return self._with("skipped")

    @property
    def failed(self) -> list[int]:
        """Indices that failed for any reason, timeouts included."""
        return self._with("failed", "timeout")

    @property
    def exit_code(self) -> int:
        failures = [o for o in self.outcomes if o.status in ("failed", "timeout")]
        if not failures:
            return 0
        if all(o.status == "timeout" for o in failures):
            return EXIT_TIMEOUT
        return EXIT_FAILED

    def summary(self) -> str:
        parts = [
            f"{len(self.trained)} trained",
            f"{len(self.skipped)} skipped (completed)",
            f"{len(self.failed)} failed",
        ]
        text = ", ".join(parts)
        if self.failed:
            text += f": indices {self.failed}"
        return text


def parse_indices(text: str) -> list[int]:
    """``"0-9,12,20-22"`` (inclusive ranges, as SLURM's --array) as a list of indices.

    Order is kept and repeats are dropped. Raises ``ValueError`` naming the bad part.
    """
    indices: list[int] = []
    seen: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\s*-\s*(\d+))?\s*", part)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"bad index list part {part!r} in {text!r}: use e.g. 0-99,120,130-139")
        first = int(match[1])
        last = first if match[2] is None else int(match[2])
        span = range(first, last + 1)
        for i in span:
            if i not in seen:
                seen.add(i)
                indices.append(i)
    return indices


def _make_cwd_importable() -> None:
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_routine(main_import: str) -> Routine:
    """``MODULE.main`` for ``main_import``; the current directory is importable, as in the seed."""
    _make_cwd_importable()
    module = importlib.import_module(main_import)
    routine = getattr(module, "main", None)
    if not callable(routine):
        raise StoreError(
            f"module {main_import!r} has no callable main(index, logdir); define one that "
            "returns {key: value} for the spec's keys"
        )
    return routine


class ScriptArgumentsError(DmError, ValueError):
    """The script's own (fastargs) arguments are missing or invalid."""


def collect_fastargs_arguments() -> None:
    """Fill the script's fastargs sections from ``sys.argv``, as the seed's worker does.

    Raises :class:`ScriptArgumentsError` naming every missing or invalid parameter (fastargs'
    own ``validate(mode="stderr")`` would exit 0, making a failed job look successful).
    """
    if "fastargs" not in sys.modules:
        return
    from argparse import ArgumentParser

    from fastargs import get_current_config

    config = get_current_config()
    parser = ArgumentParser(allow_abbrev=False)
    config.augment_argparse(parser)
    args, _ = parser.parse_known_args()
    for fname in getattr(args, "config_file", None) or []:
        config.collect_config_file(fname)
    config.collect(vars(args))
    config.collect_env_variables()
    errors = config.validate(mode="errordict") or {}
    if errors:
        lines = [
            f"--{'.'.join(path)}: {type(err).__name__} {err}".rstrip()
            for path, err in errors.items()
        ]
        raise ScriptArgumentsError(
            "the training script's arguments are missing or invalid; pass them after the "
            "--worker.* options:\n" + "\n".join(f"  - {line}" for line in lines)
        )


class _Deadline:
    """SIGALRM-based timeout for one call, with a watchdog that ends the process if ignored."""

    def __init__(self, seconds: float | None, index: int, grace: float) -> None:
        self.seconds, self.index, self.grace = seconds, index, grace
        self._previous: Callable[[int, FrameType | None], object] | int | None = None
        self._watchdog: threading.Timer | None = None

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        raise JobTimeout(f"model index {self.index} exceeded the job timeout of {self.seconds} s")

    def _hard_exit(self) -> None:
        sys.stderr.write(
            f"worker: model index {self.index} ignored its timeout of {self.seconds} s for "
            f"{self.grace} s more; ending the process (exit {EXIT_TIMEOUT}), index incomplete\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_TIMEOUT)

    def __enter__(self) -> _Deadline:
        if self.seconds is None:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("job_timeout needs the main thread (it uses SIGALRM)")
        self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        self._watchdog = threading.Timer(self.seconds + self.grace, self._hard_exit)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.seconds is None:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous or signal.SIG_DFL)
        if self._watchdog is not None:
            self._watchdog.cancel()


def _train(
    store: Store,
    routine: Routine,
    index: int,
    *,
    do_if_complete: bool,
    job_timeout: float | None,
    hard_kill_grace: float,
    retrain: bool = False,
    store_lock: AbstractContextManager[object] | None = None,
) -> tuple[IndexOutcome, dict[str, np.ndarray] | None]:
    """Run ``routine`` for ``index`` and check its values; the row to store, or why not
    (``retrain``: a completed row of another configuration, trained again; ``store_lock``:
    held while the store is read)."""
    start = time.perf_counter()

    def outcome(status: Status, message: str = "") -> IndexOutcome:
        return IndexOutcome(index, status, time.perf_counter() - start, message)

    with store_lock if store_lock is not None else nullcontext():
        skip = not do_if_complete and not retrain and store.is_completed(index)
        logdir = None if skip else store.worker_dir(index)
    if logdir is None:
        logger.info(
            "index %d already completed, skipping (use --worker.do_if_complete to redo)", index
        )
        return outcome("skipped", "already completed"), None
    try:
        with _Deadline(job_timeout, index, hard_kill_grace):
            values = routine(index=index, logdir=str(logdir))
    except JobTimeout as exc:
        logger.error("index %d: %s; not stored", index, exc)
        return outcome("timeout", str(exc)), None
    except Exception as exc:  # the script's failure is this index's failure, not the worker's
        logger.exception("index %d: main() raised %s; not stored", index, type(exc).__name__)
        return outcome("failed", f"main() raised {type(exc).__name__}: {exc}"), None
    except SystemExit as exc:  # e.g. fastargs' validate(mode="stderr") exits 0 on bad arguments
        logger.error(
            "index %d: main() called sys.exit(%r) instead of returning; not stored", index, exc.code
        )
        return outcome("failed", f"main() called sys.exit({exc.code!r})"), None
    try:
        row = coerce_row(values, store.spec.schema, index=index)
    except RowError as exc:
        logger.error("index %d: %s", index, exc)
        return outcome("failed", str(exc)), None
    return outcome("trained"), row


class Terminated(BaseException):
    """Raised in the worker's main thread by SIGTERM or SIGINT while a model trains (a
    ``BaseException``, so that a script catching ``Exception`` does not swallow it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _Termination:
    """SIGTERM and SIGINT handlers for the worker process (``scancel``, a SLURM time limit, the
    local launcher's stop, Ctrl-C).

    A signal arriving while a model trains (inside :meth:`interruptible`) raises
    :class:`Terminated` there; one arriving while rows are being stored is recorded and
    :meth:`check` raises it once that is done, so a commit is never cut in the middle. The
    handlers are installed only when ``install`` and on the main thread (Python runs signal
    handlers there), and the previous ones are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, install: bool) -> None:
        self.install = install and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._interruptible = False
        self._previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            logger.warning(
                "%s received: storing the finished rows, then exiting %d",
                signal.Signals(signum).name,
                128 + signum,
            )
        if self._interruptible:
            self._interruptible = False
            raise Terminated(signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def check(self) -> None:
        """Raise :class:`Terminated` when a signal was received."""
        if self.signum is not None:
            raise Terminated(self.signum)

    def __enter__(self) -> _Termination:
        if self.install:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


class _GroupCommit:
    """Rows trained but not yet stored, committed together (one fsync per file per group)
    once the oldest has waited ``every`` seconds or they hold ``max_bytes``.

    With ``every > 0`` a background thread commits the group when its oldest row has waited
    ``every`` seconds, even while the next model trains. Every use of the store by the worker
    goes through :attr:`lock`. A commit that fails in the thread is raised by the next
    :meth:`add` or by :meth:`close`, which stops the thread and commits what is left."""

    def __init__(
        self,
        store: Store,
        *,
        every: float,
        overwrite: bool,
        command: str | None,
        configuration: TrainingConfiguration | None = None,
        max_bytes: int = 256 * 2**20,
    ) -> None:
        self.store, self.every, self.overwrite, self.command = store, every, overwrite, command
        self.configuration = configuration
        self.configuration_id: int | None = None
        self.max_bytes = max_bytes
        self.rows: list[tuple[int, dict[str, np.ndarray]]] = []
        self.nbytes = 0
        self.since = 0.0
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        if self._thread is None and self.every > 0:
            self._thread = threading.Thread(
                target=self._commit_when_due, name="group-commit", daemon=True
            )
            self._thread.start()

    def _commit_when_due(self) -> None:
        with self._wake:
            while not self._closed:
                if not self.rows:
                    self._wake.wait()
                    continue
                left = self.since + self.every - time.perf_counter()
                if left > 0:
                    self._wake.wait(left)
                    continue
                try:
                    self.commit()
                except BaseException as exc:  # raised in the main thread by add() or close()
                    logger.error("storing index(es) failed: %s", exc)
                    self._error = exc
                    return

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def add(self, index: int, row: dict[str, np.ndarray]) -> None:
        with self.lock:
            self._raise_error()
            if not self.rows:
                self.since = time.perf_counter()
            self.rows.append((index, row))
            self.nbytes += sum(a.nbytes for a in row.values())
            if time.perf_counter() - self.since >= self.every or self.nbytes >= self.max_bytes:
                self.commit()
            else:
                self._start()
                self._wake.notify()

    def close(self) -> None:
        """Stop the background thread and commit the rows left (raising a failed commit)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        with self.lock:
            self._error = None  # logged; the rows it left are tried again here
            self._commit()

    def commit(self) -> None:
        with self.lock:
            self._commit()

    def _commit(self) -> None:
        if not self.rows:
            return
        if self.configuration is not None and self.configuration_id is None:
            # registered with the first row, so a worker that stores nothing leaves no trace
            self.configuration_id = self.store.register_configuration(self.configuration)
            logger.info(
                "training configuration %d (%s) registered in the store at %s",
                self.configuration_id,
                self.configuration.fingerprint()[:12],
                self.store.path,
            )
        self.store.write_rows(
            self.rows, overwrite=self.overwrite, configuration_id=self.configuration_id
        )
        if self.command is not None:
            for _ in self.rows:
                self.store.log_command(self.command)
        logger.info("stored index(es) %s", ",".join(str(i) for i, _ in self.rows))
        self.rows, self.nbytes = [], 0


def train_index(
    store: Store,
    routine: Routine,
    index: int,
    *,
    do_if_complete: bool = False,
    job_timeout: float | None = None,
    hard_kill_grace: float = HARD_KILL_GRACE_SECONDS,
    command: str | None = None,
    configuration: TrainingConfiguration | None = None,
    retrain: Collection[int] = (),
) -> IndexOutcome:
    """Train model ``index`` with ``routine`` and store its row; never raises for its failures
    (an index that fails is reported in the outcome and left incomplete). See
    :func:`run_indices` for the parameters."""
    return run_indices(
        store,
        routine,
        [index],
        do_if_complete=do_if_complete,
        job_timeout=job_timeout,
        hard_kill_grace=hard_kill_grace,
        command=command,
        configuration=configuration,
        retrain=retrain,
    ).outcomes[0]


def run_indices(
    store: Store,
    routine: Routine,
    indices: Iterable[int],
    *,
    do_if_complete: bool = False,
    job_timeout: float | None = None,
    hard_kill_grace: float = HARD_KILL_GRACE_SECONDS,
    command: str | None = None,
    commit_every: float = 0.0,
    report: WorkerReport | None = None,
    configuration: TrainingConfiguration | None = None,
    retrain: Collection[int] = (),
    handle_signals: bool = False,
) -> WorkerReport:
    """Train every index in turn in this process; a failed index does not stop the others.

    Trained rows are stored in groups: a group is committed once its oldest row has waited
    ``commit_every`` seconds (0: every row at once; a background thread commits it while the
    next model trains), and always before returning or raising. A crash (SIGKILL) loses at
    most the uncommitted group, whose indices stay incomplete.

    With ``handle_signals`` (the worker command; only on the main thread), SIGTERM and SIGINT
    stop the training: the model being trained is interrupted (its outcome ``failed``, its
    index left incomplete), the finished rows are committed, and :class:`Terminated` is raised
    (the command exits ``128 + signal``).

    ``configuration`` is registered in the store with the first commit and every row is
    written with its id (None: the rows' configuration is unknown). Completed indices are
    skipped unless ``do_if_complete``, or unless they are in ``retrain`` (rows of another
    configuration, replaced).

    Outcomes are appended to ``report`` when given (so a caller still holds those of the
    indices that ran when something raises) and it is returned; else to a new report.
    """
    report = WorkerReport() if report is None else report
    retrain = set(retrain)
    group = _GroupCommit(
        store,
        every=commit_every,
        overwrite=do_if_complete or bool(retrain),
        command=command,
        configuration=configuration,
    )
    with _Termination(handle_signals) as termination:
        try:
            for index in indices:
                termination.check()  # received while the previous row was being stored
                start = time.perf_counter()
                try:
                    with termination.interruptible():
                        outcome, row = _train(
                            store,
                            routine,
                            index,
                            do_if_complete=do_if_complete,
                            job_timeout=job_timeout,
                            hard_kill_grace=hard_kill_grace,
                            retrain=index in retrain,
                            store_lock=group.lock,
                        )
                except Terminated as exc:
                    seconds = time.perf_counter() - start
                    report.outcomes.append(
                        IndexOutcome(index, "failed", seconds, f"{exc}; not stored")
                    )
                    raise
                report.outcomes.append(outcome)
                if row is not None:
                    logger.info("index %d: trained in %.2f s", index, outcome.seconds)
                    group.add(index, row)
        finally:
            group.close()
        termination.check()  # a signal received while rows were being stored
    return report


def write_report(
    path: str | os.PathLike[str], report: WorkerReport, exit_code: int, error: str | None = None
) -> None:
    """Write ``report`` and the process's ``exit_code`` as JSON to ``path``, atomically: readers
    see the previous file or the whole new one, never a part (not fsynced: it is for the
    process that launched this one, not a record that must survive a power loss)."""
    path = Path(path)
    data: dict[str, object] = {
        "outcomes": [asdict(o) for o in report.outcomes],
        "exit_code": exit_code,
    }
    if error:
        data["error"] = error
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_report(path: str | os.PathLike[str]) -> tuple[WorkerReport, int, str | None]:
    """``(report, exit_code, error)`` from a file written by :func:`write_report`.

    Raises ``ValueError`` naming the file when its content is not such a report.
    """
    try:
        data = json.loads(Path(path).read_text())
        outcomes = [
            IndexOutcome(int(o["index"]), o["status"], float(o["seconds"]), str(o["message"]))
            for o in data["outcomes"]
        ]
        return WorkerReport(outcomes), int(data["exit_code"]), data.get("error")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a worker report ({type(exc).__name__}: {exc})") from exc


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(
        "python -m dm_assets.worker",
        "Train models with a script's main(index, logdir) and store their outputs. "
        "Arguments other than --worker.* are passed to the script.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--worker.index", dest="index", type=int, help="model index to train")
    which.add_argument(
        "--worker.indices",
        dest="indices",
        help="indices to train in this one process, e.g. 0-99,120,130-139",
    )
    parser.add_argument(
        "--worker.main_import",
        dest="main_import",
        required=True,
        help="module whose main(index=, logdir=) trains one model",
    )
    parser.add_argument("--worker.logdir", dest="logdir", required=True, help="store directory")
    add_flag(parser, "--worker.do_if_complete", "train and overwrite even completed indices")
    parser.add_argument(
        "--worker.job_timeout",
        dest="job_timeout",
        type=_positive_float,
        default=None,
        help="seconds allowed per index (default: no limit)",
    )
    parser.add_argument(
        "--worker.commit_every",
        dest="commit_every",
        type=float,
        default=1.0,
        help="seconds a trained row may wait to be stored with the next ones (one fsync per "
        "file per group; default 1.0; 0: store each row at once)",
    )
    parser.add_argument(
        "--worker.kill_grace",
        dest="kill_grace",
        type=_positive_float,
        default=HARD_KILL_GRACE_SECONDS,
        help="seconds a timed-out script gets to unwind before the process is "
        f"ended with exit {EXIT_TIMEOUT} (default {HARD_KILL_GRACE_SECONDS:g})",
    )
    parser.add_argument(
        "--worker.report",
        dest="report",
        default=None,
        help="write the outcomes and exit status as JSON to this file when the worker ends "
        "(replaced atomically; see the module's documentation)",
    )
    parser.add_argument(
        "--worker.version",
        dest="version",
        default=None,
        help="the training code's version, part of the training configuration (default: the "
        "sha256 of the --worker.main_import module's source file)",
    )
    parser.add_argument(
        "--worker.on_change",
        dest="on_change",
        choices=ON_CHANGE_CHOICES,
        default="refuse",
        help="when the store holds completed rows of another training configuration: refuse "
        "(exit 2 naming what changed; the default), retrain (replace those among the indices) "
        "or mix (train only what is missing)",
    )
    args, passthrough = parser.parse_known_args(argv)
    ours = [a for a in passthrough if a.startswith("--worker.")]
    if ours:
        parser.error(f"unknown worker option(s) {ours}; see --help")
    try:
        indices = [args.index] if args.index is not None else parse_indices(args.indices)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging()
    report = WorkerReport()
    error: str | None = None
    try:
        code = _run_worker(parser, args, indices, passthrough, argv, report)
    except (ScriptArgumentsError, ConfigurationError, ConfigurationChangedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code, error = EXIT_USAGE, str(exc)
    except Terminated as exc:
        code = 128 + exc.signum
        error = f"{exc}: the finished rows were stored, the others left incomplete"
        logger.error("%s (exit %d); %s", error, code, report.summary())
    except SystemExit as exc:  # parser.error once the store is open: a bad index
        if args.report is not None:
            code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
            write_report(args.report, report, code, error="usage error; see the worker's log")
        raise
    except Exception as exc:  # reported, then left to run() (a message) or Python (a traceback)
        if args.report is not None:
            write_report(args.report, report, EXIT_FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    if args.report is not None:
        write_report(args.report, report, code, error=error)
    return code


def _run_worker(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    indices: list[int],
    passthrough: list[str],
    argv: list[str],
    report: WorkerReport,
) -> int:
    """Open the store, import the script, check and register the training configuration and
    train ``indices``; outcomes go into ``report``.

    Raises :class:`ScriptArgumentsError` when the script's own arguments are invalid,
    :class:`ConfigurationError` when the configuration cannot be computed, and
    :class:`ConfigurationChangedError` when ``--worker.on_change=refuse`` refuses.
    """
    store = Store.open(args.logdir)
    bad = [i for i in indices if not 0 <= i < store.spec.num_models]
    if bad:
        parser.error(
            f"indices {bad[:10]} are outside the store's range [0, {store.spec.num_models})"
        )
    command = " ".join(["python -m dm_assets.worker", *argv])
    # The script sees its own arguments only, as if it had been run directly with them.
    sys.argv = [args.main_import, *passthrough]
    routine = load_routine(args.main_import)
    collect_fastargs_arguments()
    with store:
        config, retrain = _check_configuration(store, args, indices, passthrough)
        run_indices(
            store,
            routine,
            indices,
            do_if_complete=args.do_if_complete,
            job_timeout=args.job_timeout,
            hard_kill_grace=args.kill_grace,
            command=command,
            commit_every=args.commit_every,
            report=report,
            configuration=config,
            retrain=retrain,
            handle_signals=True,
        )
    logger.info("worker done: %s", report.summary())
    if report.exit_code and len(indices) > 1:
        for o in report.outcomes:
            if o.status in ("failed", "timeout"):
                logger.error("index %d %s: %s", o.index, o.status, o.message.splitlines()[0])
    return report.exit_code


def _check_configuration(
    store: Store, args: argparse.Namespace, indices: list[int], passthrough: list[str]
) -> tuple[TrainingConfiguration, list[int]]:
    """This worker's configuration (registered with its first row) and the indices to
    retrain, after the ``--worker.on_change`` check (:class:`ConfigurationChangedError` to
    refuse)."""
    config = configuration_for(
        store.spec.to_dict()["schema"], args.main_import, passthrough, version=args.version
    )
    conflicts = find_configuration_conflicts(store, config)
    if conflicts and args.on_change == "refuse":
        raise ConfigurationChangedError(store.path, conflicts, WORKER_REMEDIES)
    recorded = bool(store.configurations())
    retrain: list[int] = []
    if recorded and args.on_change == "retrain":
        retrain = rows_to_retrain(store, indices, config)
        if retrain:
            logger.warning(
                "retraining %d completed row(s) of other configurations: %s",
                len(retrain),
                ",".join(map(str, retrain[:20])),
            )
    elif conflicts:  # mix
        logger.warning(
            "mixing configurations in the store at %s (--worker.on_change=mix):\n%s",
            store.path,
            "\n".join(c.describe() for c in conflicts),
        )
    return config, retrain


if __name__ == "__main__":
    run(main)

__all__ = [
    "EXIT_USAGE",
    "ON_CHANGE_CHOICES",
    "UNKNOWN_CONFIGURATION",
    "IndexOutcome",
    "Terminated",
    "WorkerReport",
    "main",
    "parse_indices",
    "read_report",
    "run_indices",
    "train_index",
    "write_report",
]
