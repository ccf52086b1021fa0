"""Train a block of model indices in worker processes, one per leased device, with retries.

:func:`train_models` is what a partition of the ``model_outputs`` asset runs on one machine: it
skips the indices already completed in the store, splits the rest into contiguous chunks, runs
one seed-compatible worker process per leased device on its chunk::

    python -m dm_assets.worker --worker.indices=<chunk> --worker.logdir=<store>
        --worker.main_import=<module> --worker.report=<json> --worker.commit_every=<s>
        [--worker.job_timeout=<s>] <script arguments>

and then runs the indices that failed (an exception, a timeout, or a worker that died without
its report) again in new processes, up to ``retries`` more rounds. Every worker runs in its own
process group, and when :func:`train_models` is interrupted every group is ended before the
exception goes on: nothing keeps training behind it.

Files written besides the store's rows: one log per worker process (a header line with the
command, then its stdout and stderr; appended to when the same chunk runs again) in ``log_dir``,
default ``<store>/launcher_logs/``, named ``<first index>-<last index>.round<r>.<slot>.log``
with the device slot's name without its colon (``0-99.round1.cuda3.log``). Each worker's
``--worker.report`` JSON goes to a temporary directory, removed on return.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from dm_assets.cli import EXIT_USAGE
from dm_assets.store.store import Store, StoreError
from dm_assets.training.devices import Device, DeviceLease
from dm_assets.training.runner import IndexOutcome, read_report

logger = logging.getLogger(__name__)

# After SIGTERM a worker's process group gets this long to end before SIGKILL.
KILL_GRACE_SECONDS = 5.0
# How often running workers are checked for having ended (a cheap waitpid each).
_POLL_SECONDS = 0.02
_LOG_TAIL_LINES = 20


@dataclass
class TrainingReport:
    """What :func:`train_models` did with a block of model indices.

    ``trained``: indices completed by this call, increasing. ``skipped``: indices found
    already completed (before or while it ran), increasing. ``failed``: every index left
    incomplete after the last round, with why (the worker's message for that index, or how its
    worker process ended and the last lines of its log). ``seconds_per_model``: the worker's
    wall time of ``main`` for each trained index whose worker wrote its report (an index
    stored by a worker that later crashed has none). ``wall_seconds``: the whole call.
    ``rounds``: rounds of worker processes run (1 + retries used). ``processes``: worker
    processes started in all.
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

    def summary(self, max_failures: int = 10) -> str:
        """One line of counts, then one line per failed index (at most ``max_failures``)."""
        total = len(self.trained) + len(self.skipped) + len(self.failed)
        text = (
            f"{total} model(s): {len(self.trained)} trained, {len(self.skipped)} skipped "
            f"(already completed), {len(self.failed)} failed; {self.rounds} round(s), "
            f"{self.processes} worker process(es), {self.wall_seconds:.1f} s"
        )
        if self.seconds_per_model:
            mean = sum(self.seconds_per_model.values()) / len(self.seconds_per_model)
            text += f", {mean:.2f} s per model in main()"
        failed = sorted(self.failed.items())
        for index, reason in failed[:max_failures]:
            first = reason.strip().splitlines()[0] if reason.strip() else "unknown"
            text += f"\n  index {index}: {first}"
        if len(failed) > max_failures:
            text += f"\n  ... and {len(failed) - max_failures} more failed"
        return text

    def finish(self, started: float, what: str) -> TrainingReport:
        """Sort the lists, set ``wall_seconds`` since ``started`` (``time.monotonic``), log
        ``what`` with the summary (an error when some index failed); returns itself."""
        self.trained.sort()
        self.skipped.sort()
        self.failed = dict(sorted(self.failed.items()))
        self.wall_seconds = time.monotonic() - started
        (logger.info if self.ok else logger.error)("%s: %s", what, self.summary())
        return self


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


def split_contiguous(indices: Sequence[int], parts: int) -> list[list[int]]:
    """``indices`` cut into ``min(parts, len(indices))`` consecutive chunks whose sizes differ
    by at most one."""
    n = min(parts, len(indices))
    if n <= 0:
        return []
    size, extra = divmod(len(indices), n)
    chunks, start = [], 0
    for k in range(n):
        stop = start + size + (1 if k < extra else 0)
        chunks.append(list(indices[start:stop]))
        start = stop
    return chunks


@dataclass
class _Worker:
    """One running worker process and where its output goes."""

    device: Device
    indices: list[int]
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int
    report_path: Path
    cleaned: bool = False  # its process group was ended after it exited

    def describe_exit(self) -> str:
        code = self.proc.returncode
        text = f"worker process exited with code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                text += f" (killed by {signal.Signals(-code).name})"
        return text

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                data = f.read()
        except OSError as exc:
            return f"(its log {self.log_path} is unreadable: {exc})"
        tail = data.decode(errors="replace").rstrip().splitlines()[-lines:]
        if not tail:
            return f"(nothing in its log {self.log_path})"
        return f"last lines of {self.log_path}:\n" + "\n".join(f"  | {line}" for line in tail)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _end_after_exit(worker: _Worker) -> None:
    """End whatever the exited worker left running in its process group (a data-loading child,
    say), so it cannot keep the device slot or write after the worker is done."""
    if not worker.cleaned:
        worker.cleaned = True
        _signal_group(worker.proc.pid, signal.SIGKILL)


def _stop(workers: Sequence[_Worker], grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM every worker's process group, SIGKILL what is left after ``grace`` seconds, and
    reap them."""
    live = [w for w in workers if not w.cleaned]
    if not live:
        return
    logger.warning(
        "stopping %d worker process group(s) (pids %s)", len(live), [w.proc.pid for w in live]
    )
    try:
        for w in live:
            _signal_group(w.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(w.proc.poll() is None for w in live) and time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
    finally:  # even if interrupted again while waiting
        for w in live:
            _signal_group(w.proc.pid, signal.SIGKILL)
            w.cleaned = True
        for w in live:
            with contextlib.suppress(Exception):
                w.proc.wait(timeout=grace)


def skip_completed(store: Store, block: Sequence[int], report: TrainingReport) -> list[int]:
    """The block's indices still to train, in order; the completed ones go to
    ``report.skipped``. Raises :class:`~dm_assets.store.store.StoreError` for indices outside the
    store."""
    outside = [i for i in block if i >= store.spec.num_models]
    if outside:
        raise StoreError(
            f"indices {outside[:10]} are outside the store's range "
            f"[0, {store.spec.num_models}) at {store.path}"
        )
    mask = store.completed_mask()
    report.skipped = [i for i in block if mask[i]]
    if report.skipped:
        logger.info(
            "%d of %d model(s) already completed: %s",
            len(report.skipped),
            len(block),
            compact_ranges(sorted(report.skipped)),
        )
    return sorted(i for i in block if not mask[i])


def block_problems(
    indices: Sequence[int],
    main_import: str,
    job_timeout: float | None,
    retries: int,
    commit_every: float,
) -> tuple[list[int], list[str]]:
    """What every launcher checks: the block's indices (repeats dropped) and the problems with
    the arguments all launchers share, each naming the argument, the value and the fix."""
    problems = []
    block: list[int] = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            problems.append(f"indices: every index must be an integer >= 0; got {i!r}")
            break
        block.append(int(i))
    if not main_import:
        problems.append("main_import: name the module whose main(index, logdir) trains a model")
    if job_timeout is not None and not job_timeout > 0:
        problems.append(f"job_timeout: must be > 0 seconds or None; got {job_timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        problems.append(f"retries: must be an integer >= 0 (extra rounds); got {retries!r}")
    if not commit_every >= 0:
        problems.append(f"commit_every: must be >= 0 seconds; got {commit_every!r}")
    return list(dict.fromkeys(block)), problems


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


def _check_arguments(
    indices: Sequence[int],
    main_import: str,
    lease: DeviceLease,
    job_timeout: float | None,
    retries: int,
    commit_every: float,
    threads_per_worker: int | None,
    progress_every: float,
) -> list[int]:
    """The block's indices, repeats dropped; raises ``ValueError`` listing every bad argument."""
    block, problems = block_problems(indices, main_import, job_timeout, retries, commit_every)
    if lease.released:
        problems.append("lease: it was already released; acquire device slots again")
    if threads_per_worker is not None and (
        isinstance(threads_per_worker, bool)
        or not isinstance(threads_per_worker, int)
        or threads_per_worker < 1
    ):
        problems.append(
            f"threads_per_worker: must be a positive integer or None; got {threads_per_worker!r}"
        )
    if not progress_every > 0:
        problems.append(f"progress_every: must be > 0 seconds; got {progress_every!r}")
    if problems:
        raise ValueError("train_models: " + "; ".join(problems))
    return block


def train_models(
    store_dir: str | os.PathLike[str],
    indices: Sequence[int],
    *,
    main_import: str,
    script_args: Sequence[str] = (),
    lease: DeviceLease,
    job_timeout: float | None = None,
    retries: int = 1,
    commit_every: float = 1.0,
    threads_per_worker: int | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress_every: float = 5.0,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
) -> TrainingReport:
    """Train the models ``indices`` of the store at ``store_dir`` in worker processes, one per
    device of ``lease``, and say what happened.

    Indices already completed are skipped without starting anything. The others are split into
    contiguous chunks, one per device, each trained by ``python -m dm_assets.worker`` in its
    own process group, with ``main_import``, ``script_args`` (passed to the script),
    ``job_timeout`` (seconds per index) and ``commit_every`` (seconds a trained row may wait to
    be stored with the next). A worker's environment is ``os.environ``, then ``env``, then its
    device's (:meth:`Device.env` with ``threads_per_worker``), and it inherits its device's
    locked slot descriptor, so the slot stays taken while it runs.

    Indices left incomplete by a round (failed, timed out, or lost with a worker that died) run
    again in a new round of processes, spread over the devices, up to ``retries`` more rounds;
    a worker that ends with a usage error (exit 2) is not retried. ``on_progress(done, total)``
    is called at the start, every ``progress_every`` seconds while workers run and at the end,
    ``done`` counting the block's indices completed in the store (``total`` of them).

    Raises ``ValueError`` for bad arguments and :class:`~dm_assets.store.store.StoreError` for a
    missing store or indices outside it. On any exception (an interrupt, SIGTERM turned into an
    exception by the caller, an exception from ``on_progress``) every worker process group is
    sent SIGTERM, then SIGKILL after :data:`KILL_GRACE_SECONDS`, before it goes on.
    """
    start = time.monotonic()
    block = _check_arguments(
        indices,
        main_import,
        lease,
        job_timeout,
        retries,
        commit_every,
        threads_per_worker,
        progress_every,
    )
    store_dir = Path(store_dir).absolute()
    logs = Path(log_dir).absolute() if log_dir is not None else store_dir / "launcher_logs"
    report = TrainingReport()
    with Store.open(store_dir) as store:
        todo = skip_completed(store, block, report)
        progress = Progress(on_progress, progress_every, store, block)
        progress.report()
        launcher = _Launcher(
            python=python,
            store_dir=store_dir,
            main_import=main_import,
            script_args=tuple(script_args),
            job_timeout=job_timeout,
            commit_every=commit_every,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            threads=threads_per_worker,
            logs=logs,
        )
        workers: list[_Worker] = []
        try:
            with tempfile.TemporaryDirectory(prefix="dm-train-") as tmp:
                while todo and report.rounds <= retries:
                    report.rounds += 1
                    chunks = split_contiguous(todo, len(lease.devices))
                    round_workers: list[_Worker] = []
                    for k, (device, chunk) in enumerate(zip(lease.devices, chunks, strict=False)):
                        worker = launcher.start(
                            chunk,
                            device,
                            lease.fd_for(device),
                            round_number=report.rounds,
                            report_path=Path(tmp) / f"round{report.rounds}-{k}.json",
                        )
                        round_workers.append(worker)
                        workers.append(worker)  # at once: an interrupt must find every one
                    report.processes += len(round_workers)
                    _wait(round_workers, progress)
                    todo = _collect_round(store, round_workers, report, retries)
        except BaseException:
            _stop(workers)
            raise
        progress.report()
    return report.finish(start, "training done")


@dataclass(frozen=True)
class _Launcher:
    """Starts worker processes: what every worker of a :func:`train_models` call shares."""

    python: str
    store_dir: Path
    main_import: str
    script_args: tuple[str, ...]
    job_timeout: float | None
    commit_every: float
    env: Mapping[str, str]
    threads: int | None
    logs: Path

    def command(self, chunk: Sequence[int], report_path: Path) -> list[str]:
        return [
            self.python,
            "-m",
            "dm_assets.worker",
            f"--worker.indices={compact_ranges(chunk)}",
            f"--worker.logdir={self.store_dir}",
            f"--worker.main_import={self.main_import}",
            f"--worker.report={report_path}",
            f"--worker.commit_every={float(self.commit_every)!r}",
            *(
                [f"--worker.job_timeout={float(self.job_timeout)!r}"]
                if self.job_timeout is not None
                else []
            ),
            *self.script_args,
        ]

    def start(
        self,
        chunk: list[int],
        device: Device,
        slot_fd: int,
        *,
        round_number: int,
        report_path: Path,
    ) -> _Worker:
        """Start the worker for ``chunk`` on ``device``, holding its slot through ``slot_fd``,
        in a new process group, its output appended to its log."""
        command = self.command(chunk, report_path)
        slot = "".join(c if c.isalnum() or c in "-_" else "" for c in device.name)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{chunk[0]}-{chunk[-1]}.round{round_number}.{slot}.log"
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        with open(log_path, "ab") as log:  # the child writes through its own descriptor
            log.write(
                f"=== {stamp} round {round_number} on {device.name}: {len(chunk)} index(es)\n"
                f"$ {' '.join(command)}\n".encode()
            )
            log.flush()
            offset = log.tell()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **device.env(self.threads)},
                pass_fds=(slot_fd,),
                start_new_session=True,
            )
        logger.info(
            "round %d: worker pid %d on %s for %d index(es) %s; log %s",
            round_number,
            proc.pid,
            device.name,
            len(chunk),
            compact_ranges(chunk),
            log_path,
        )
        return _Worker(device, chunk, proc, log_path, offset, report_path)


class Progress:
    """Calls ``callback(done, total)`` at most every ``every`` seconds (or when forced)."""

    def __init__(
        self,
        callback: Callable[[int, int], None] | None,
        every: float,
        store: Store,
        block: Sequence[int],
    ) -> None:
        self.callback, self.every, self.store = callback, every, store
        self.block = np.asarray(block, dtype=np.int64)
        self.due = 0.0

    def report(self, *, force: bool = True) -> None:
        now = time.monotonic()
        if self.callback is None or (not force and now < self.due):
            return
        self.due = now + self.every
        self.callback(int(self.store.completed_mask()[self.block].sum()), len(self.block))


def _wait(workers: Sequence[_Worker], progress: Progress) -> None:
    """Until every worker has exited, reporting progress as due."""
    while True:
        running = False
        for w in workers:
            if w.proc.poll() is None:
                running = True
            else:
                _end_after_exit(w)
        if not running:
            return
        progress.report(force=False)
        time.sleep(_POLL_SECONDS)


def _collect_round(
    store: Store, workers: Sequence[_Worker], report: TrainingReport, retries: int
) -> list[int]:
    """Record the round's outcomes in ``report`` (what it says of the round's indices replaces
    what earlier rounds said); the indices to run again."""
    mask = store.completed_mask()
    again: list[int] = []
    for w in workers:
        for i in w.indices:
            report.failed.pop(i, None)  # this round's word replaces the previous one's
        outcomes: dict[int, IndexOutcome] = {}
        error = None
        if w.report_path.exists():
            try:
                worker_report, _, error = read_report(w.report_path)
                outcomes = {o.index: o for o in worker_report.outcomes}
            except ValueError as exc:
                logger.warning("%s", exc)
        usage_error = w.proc.returncode == EXIT_USAGE
        for i in w.indices:
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
                report.failed[i] = outcome.message or outcome.status
            else:
                reason = w.describe_exit()
                if error:
                    reason += f": {error}"
                report.failed[i] = f"{reason}\n{w.log_tail()}"
            if not usage_error:
                again.append(i)
        if w.proc.returncode != 0:
            logger.warning(
                "round %d worker pid %d on %s: %s",
                report.rounds,
                w.proc.pid,
                w.device.name,
                w.describe_exit(),
            )
    log_retry(again, report, retries, "running")
    return sorted(again)


__all__ = [
    "KILL_GRACE_SECONDS",
    "Progress",
    "TrainingReport",
    "block_problems",
    "compact_ranges",
    "log_retry",
    "skip_completed",
    "split_contiguous",
    "train_models",
]
