"""Train a block of model indices in worker processes, one per leased device, with retries.

:func:`train_models` is what a partition of the ``model_outputs`` asset runs on one machine: it
skips the indices already completed in the store, splits the rest into contiguous chunks, runs
one seed-compatible worker process per leased device on its chunk::

    python -m dm_assets.worker --worker.indices=<chunk> --worker.logdir=<store>
        --worker.main_import=<module> --worker.report=<json> --worker.commit_every=<s>
        [--worker.job_timeout=<s>] [--worker.version=<v>] [--worker.on_change=<what>]
        <script arguments>

and then runs the indices that failed (an exception, a timeout, or a worker that died without
its report) again in new processes, up to ``retries`` more rounds. Every worker runs in its own
process group, and when :func:`train_models` is interrupted every group is ended before the
exception goes on: nothing keeps training behind it.

This module is the local transport only: starting, watching and ending worker processes. The
rounds, the command line, the reading of the workers' reports and the
:class:`~dm_assets.training.launcher.TrainingReport` are the launcher core's
(:mod:`dm_assets.training.launcher`), shared with :mod:`dm_assets.training.slurm`.

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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from dm_assets.cli import EXIT_USAGE
from dm_assets.training.devices import Device, DeviceLease
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
)

logger = logging.getLogger(__name__)

# After SIGTERM a worker's process group gets this long to end before SIGKILL.
KILL_GRACE_SECONDS = 5.0
# How often running workers are checked for having ended (a cheap waitpid each).
_POLL_SECONDS = 0.02


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
        return f"worker process exited with code {code if code is None else exit_code_words(code)}"

    def finished(self) -> Finished:
        return Finished(
            indices=self.indices,
            report_path=self.report_path,
            log_path=self.log_path,
            log_offset=self.log_offset,
            ended=self.describe_exit(),
            final=self.proc.returncode == EXIT_USAGE,
        )


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


@dataclass
class _Processes:
    """The local transport: each round, one worker process per leased device on a contiguous
    chunk of the indices left, in its own process group, holding its device's slot."""

    command: WorkerCommand
    lease: DeviceLease
    env: Mapping[str, str]
    threads: int | None
    logs: Path
    reports: Path  # a temporary folder for the workers' reports
    workers: list[_Worker] = field(default_factory=list)  # every one started, in all rounds
    doing = "running"
    what = "training done"

    def run_round(self, todo: list[int], round_number: int, progress: Progress) -> list[Finished]:
        chunks = split_contiguous(todo, len(self.lease.devices))
        round_workers: list[_Worker] = []
        for k, (device, chunk) in enumerate(zip(self.lease.devices, chunks, strict=False)):
            worker = self._start(
                chunk, device, round_number, self.reports / f"round{round_number}-{k}.json"
            )
            round_workers.append(worker)
            self.workers.append(worker)  # at once: an interrupt must find every one
        _wait(round_workers, progress)
        for w in round_workers:
            if w.proc.returncode != 0:
                logger.warning(
                    "round %d worker pid %d on %s: %s",
                    round_number,
                    w.proc.pid,
                    w.device.name,
                    w.describe_exit(),
                )
        return [w.finished() for w in round_workers]

    def stop(self) -> None:
        _stop(self.workers)

    def _start(
        self, chunk: list[int], device: Device, round_number: int, report_path: Path
    ) -> _Worker:
        """Start the worker for ``chunk`` on ``device``, holding its slot, in a new process
        group, its output appended to its log."""
        command = self.command.argv(compact_ranges(chunk), str(report_path))
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
                pass_fds=(self.lease.fd_for(device),),
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
    version: str | None = None,
    on_change: str | None = None,
    replace_configurations: Collection[int] = (),
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

    ``version`` and ``on_change`` go to the workers as ``--worker.version`` (the trainer's
    declared version) and ``--worker.on_change`` (refuse, retrain or mix: what a worker does
    when the store holds rows of another training configuration). Completed rows written under
    a configuration id in ``replace_configurations`` are not skipped but trained again (with
    ``on_change="retrain"`` the workers replace them; see
    :func:`~dm_assets.training.launcher.done_mask`).

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
    problems = []
    if lease.released:
        problems.append("lease: it was already released; acquire device slots again")
    if threads_per_worker is not None and not is_positive_int(threads_per_worker):
        problems.append(
            f"threads_per_worker: must be a positive integer or None; got {threads_per_worker!r}"
        )
    if not progress_every > 0:
        problems.append(f"progress_every: must be > 0 seconds; got {progress_every!r}")
    store = Path(store_dir).absolute()
    command = WorkerCommand(
        python, store, main_import, script_args, job_timeout, commit_every, version, on_change
    )
    block = check_arguments("train_models", indices, command, retries=retries, problems=problems)
    with tempfile.TemporaryDirectory(prefix="dm-train-") as tmp:
        transport = _Processes(
            command=command,
            lease=lease,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            threads=threads_per_worker,
            logs=launcher_logs(store, log_dir),
            reports=Path(tmp),
        )
        return run_rounds(
            store, block, transport, retries, on_progress, progress_every, replace_configurations
        )


__all__ = ["KILL_GRACE_SECONDS", "split_contiguous", "train_models"]
