"""Writing the store's completed rows as an FFCV dataset (``.beton``).

The format (fields ``mask``, ``targets``, ``idx``; rows in increasing model index) is
described in :mod:`dm_assets.regression.beton`, the file's layout in
:mod:`dm_assets.regression.beton_format`. :func:`write_beton` checks everything that needs no
row data first (:mod:`dm_assets.regression.beton_plan`: the keys' shapes and dtypes, the output
directory), reporting every problem at once. It then fills the file's pages straight from the
store's ``.npy`` files to a temporary file beside ``out_path``: each thread reads the rows of a
block of about 4 MiB with ``preadv`` (masks directly into their place, targets through a cast
to float32), checks their values, writes the block with one ``pwritev`` at the offset the
layout fixes in advance, and starts the disk writing it at once (``sync_file_range``), so that
the final ``fsync`` waits only for the last blocks. A problem in the values (masks other than
0/1, non-finite targets) stops the writing and is reported, naming the models, once every row
is checked. The file is fsynced and renamed into place, so a failure never leaves a partial
dataset under the final name. Nothing here imports FFCV, numba or torch.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dm_assets.regression.beton import TARGET_DTYPE, BetonError
from dm_assets.regression.beton_format import FormatError, RowLayout, choose_page_size
from dm_assets.regression.beton_plan import (
    ArrayRef,
    ValueChecks,
    WritePlan,
    open_store,
    plan_write,
    value_problems,
)
from dm_assets.store.spec import COMPLETED_KEY
from dm_assets.store.store import fsync_path

logger = logging.getLogger(__name__)

# A thread fills about this many bytes of pages (whole pages, at least one) before writing
# them with one pwrite: large enough that system calls do not count, small enough to stay in
# the CPU caches' reach and to give two threads work on a 20 MB dataset.
_BLOCK_BYTES = 4 << 20
# The most iovecs one preadv takes (IOV_MAX on Linux).
_IOV_MAX = 1024
# sync_file_range's flag: start writing back the range's dirty pages, do not wait.
_SYNC_FILE_RANGE_WRITE = 2


@dataclass(frozen=True)
class BetonSummary:
    """What :func:`write_beton` wrote: ``rows`` models, each ``n_features`` mask values (of
    ``mask_dtype``) and ``n_targets`` float32 targets, model indices ``idx_min .. idx_max``;
    ``nbytes`` bytes at ``path``, in ``seconds``."""

    path: Path
    rows: int
    n_features: int
    n_targets: int
    idx_min: int
    idx_max: int
    nbytes: int
    mask_dtype: str
    seconds: float

    @property
    def idx_range(self) -> tuple[int, int]:
        """``(first, last)`` model index written, inclusive."""
        return self.idx_min, self.idx_max

    def __str__(self) -> str:
        return (
            f"{self.rows} rows (model indices {self.idx_min}-{self.idx_max}) of "
            f"{self.n_features} mask values ({self.mask_dtype}) and {self.n_targets} targets, "
            f"{self.nbytes} bytes, to {self.path} in {self.seconds:.2f} s"
        )


def _thread_count(num_workers: int | None, n_blocks: int) -> int:
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    elif isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise BetonError(f"num_workers={num_workers!r} must be a positive integer, or None")
    # a thread per block of pages at most: more would only start and stop
    return max(1, min(num_workers, n_blocks))


def write_beton(
    store_dir: str | Path,
    out_path: str | Path,
    *,
    x_name: str = "masks",
    y_name: str = "margins",
    y_slice: int | None = None,
    completed_name: str = COMPLETED_KEY,
    ignore_completed: bool = False,
    num_workers: int | None = None,
) -> BetonSummary:
    """Write the store's completed rows to ``out_path`` as an FFCV dataset.

    Parameters
    ----------
    store_dir : str or Path
        The store directory (holding ``_completed.npy`` and ``<key>.npy`` files).
    out_path : str or Path
        The ``.beton`` to write; its directory must exist. An existing file is replaced only
        once the new one is complete: the data goes to a temporary file beside it first, so a
        failure at any point leaves ``out_path`` as it was and no temporary file.
    x_name : str
        The mask key, one vector per model ``(n_features,)``: bool, or integers that are all
        0 or 1 (checked on every row written). Written in its own dtype as ``mask``.
    y_name : str
        The targets key, one vector per model ``(n_targets,)``, or a scalar per model (then
        one target). Real numbers, written as float32 ``targets`` ``(n_targets,)``; every
        written value must be finite once cast (checked).
    y_slice : int, optional
        Write only target column ``y_slice`` (``targets`` then has shape ``(1,)``).
    completed_name : str
        The completion flags, ``<completed_name>.npy`` in the store, bool ``(num_models,)``;
        rows with a flag set are written, in increasing model index.
    ignore_completed : bool
        Write every model's row, completed or not.
    num_workers : int, optional
        Writer threads (default: the CPU count, at most 8; never more than the blocks of
        about 4 MiB of pages to write, so a small dataset is written by one thread).

    Returns
    -------
    BetonSummary
        What was written.

    Raises
    ------
    BetonError
        Naming the parameter, the value and the fix: before anything is written when the
        keys, ``y_slice``, the flags or ``out_path`` do not fit; after every row was read
        when values do not (masks other than 0/1, non-finite targets), with nothing written
        under ``out_path``.
    """
    started = time.perf_counter()
    store_dir, out_path = Path(store_dir), Path(out_path)
    with open_store(store_dir) as store:
        plan = plan_write(
            store,
            out_path,
            x_name=x_name,
            y_name=y_name,
            y_slice=y_slice,
            completed_name=completed_name,
            ignore_completed=ignore_completed,
        )
    indices = plan.rows.indices
    row_bytes = plan.mask_dtype.itemsize * plan.n_features + TARGET_DTYPE.itemsize * plan.n_targets
    try:
        page_size = choose_page_size(row_bytes)
    except FormatError as exc:
        raise BetonError(f"{exc}: pass y_slice to write fewer targets per dataset") from exc
    layout = RowLayout(len(indices), plan.mask_dtype, plan.n_features, plan.n_targets, page_size)
    _check_free_space(out_path, layout.file_size)
    writer = _PageWriter(plan, layout)
    threads = _thread_count(num_workers, writer.n_blocks)
    logger.info(
        "writing %d rows (%d mask values, %d targets) from %s to %s with %d thread(s)",
        len(indices),
        plan.n_features,
        plan.n_targets,
        store_dir,
        out_path,
        threads,
    )
    _write_file(writer, out_path, threads)
    summary = BetonSummary(
        path=out_path,
        rows=len(indices),
        n_features=plan.n_features,
        n_targets=plan.n_targets,
        idx_min=int(indices[0]),
        idx_max=int(indices[-1]),
        nbytes=out_path.stat().st_size,
        mask_dtype=plan.mask_dtype.name,
        seconds=time.perf_counter() - started,
    )
    logger.info("wrote %s", summary)
    return summary


def _check_free_space(out_path: Path, needed: int) -> None:
    """Raise when ``out_path``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(out_path.parent).free
    if free < needed:
        raise BetonError(
            f"out_path={str(out_path)!r}: the dataset needs {_size(needed)} but "
            f"{out_path.parent} has {_size(free)} free; free space or choose another out_path"
        )


def _size(nbytes: int) -> str:
    """``nbytes`` for a message: ``"4,266 bytes"``, ``"12.5 MB"``."""
    return f"{nbytes:,} bytes" if nbytes < 100_000 else f"{nbytes / 1e6:,.1f} MB"


def _write_file(writer: _PageWriter, out_path: Path, threads: int) -> None:
    """Write the dataset to a temporary file beside ``out_path``, fsync it and rename it into
    place (durably); on any failure the temporary file is removed."""
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            writer.write(fd, threads)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(out_path.parent)


class _PageWriter:
    """Fills and writes the data pages of ``layout`` from ``plan``'s store files, in units of
    consecutive rows (about :data:`_BLOCK_BYTES` of them: whole pages, or part of one page of
    large rows), then the head (header, fields, metadata) and the allocation table."""

    def __init__(self, plan: WritePlan, layout: RowLayout) -> None:
        self.plan, self.layout = plan, layout
        rpp = layout.rows_per_page
        per_unit = max(1, _BLOCK_BYTES // layout.row_bytes)
        if per_unit >= rpp:
            per_unit -= per_unit % rpp  # whole pages
        self.unit_rows = per_unit
        self.units = [
            (a, min(a + per_unit, layout.n_rows)) for a in range(0, layout.n_rows, per_unit)
        ]
        self.n_blocks = len(self.units)
        y = plan.rows.y
        # targets stored as the float32 written, every column: read straight into the page
        self.y_direct = (
            y.dtype == TARGET_DTYPE and y.dtype.isnative and y.row_items == plan.n_targets
        )
        self.check_x = plan.mask_dtype.kind in "iu"
        # the end of each page after its last row, up to the next page, is written as zeros
        self.padding = np.zeros(layout.page_size - rpp * layout.row_bytes, dtype=np.uint8)
        self.failed = threading.Event()  # a value problem: check the rest, write no more
        self._local = threading.local()

    def write(self, fd: int, threads: int) -> None:
        """Write the whole file to ``fd`` with ``threads`` threads; raise the value problems
        (a :class:`BetonError`) after checking every row."""
        from tqdm import tqdm

        layout = self.layout
        os.ftruncate(fd, layout.file_size)  # the padding before the first page reads as zeros
        rows = self.plan.rows
        x_fd = os.open(rows.x.path, os.O_RDONLY)
        y_fd = os.open(rows.y.path, os.O_RDONLY)
        checks: list[ValueChecks] = []
        try:
            if hasattr(os, "posix_fadvise"):  # Linux: read ahead more
                for f in (x_fd, y_fd):
                    os.posix_fadvise(f, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            with tqdm(total=layout.n_rows, disable=None, desc="rows written") as bar:
                if threads == 1:
                    for a, b in self.units:
                        checks.append(self._unit(a, b, fd, x_fd, y_fd))
                        bar.update(b - a)
                else:
                    with ThreadPoolExecutor(threads, thread_name_prefix="beton") as pool:
                        futures = [
                            pool.submit(self._unit, a, b, fd, x_fd, y_fd) for a, b in self.units
                        ]
                        try:
                            for (a, b), future in zip(self.units, futures, strict=True):
                                checks.append(future.result())
                                bar.update(b - a)
                        finally:
                            for future in futures:
                                future.cancel()
        finally:
            os.close(x_fd)
            os.close(y_fd)
        error = value_problems(self.plan, checks)
        if error is not None:
            raise error
        _pwritev_all(fd, [layout.head(rows.indices)], 0)
        _pwritev_all(fd, [layout.alloc_table()], layout.data_end)

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """This thread's rows as written, uint8 ``(unit_rows, row_bytes)``, and as stored in
        the targets' file, uint8 ``(unit_rows, the y key's row bytes)``."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            rows = np.empty((self.unit_rows, self.layout.row_bytes), dtype=np.uint8)
            stored = np.empty(
                (0 if self.y_direct else self.unit_rows, self.plan.rows.y.row_bytes), dtype=np.uint8
            )
            buffers = self._local.buffers = (rows, stored)
        return buffers

    def _unit(self, a: int, b: int, fd: int, x_fd: int, y_fd: int) -> ValueChecks:
        """Fill rows ``[a, b)``, check their values and write them with the padding of the
        pages they end (unless a value problem was found anywhere)."""
        layout, rows = self.layout, self.plan.rows
        mb = layout.mask_bytes
        unit_buffer, stored = self._buffers()
        unit = unit_buffer[: b - a]
        models = rows.indices[a:b]
        _read_rows(x_fd, rows.x, models, unit[:, :mb])
        y = unit[:, mb:].view(TARGET_DTYPE)
        if self.y_direct:
            _read_rows(y_fd, rows.y, models, unit[:, mb:])
        else:
            values = stored[: b - a]
            _read_rows(y_fd, rows.y, models, values)
            typed = values.view(rows.y.dtype)[:, rows.y_cols]
            with np.errstate(over="ignore", invalid="ignore"):
                np.copyto(y, typed, casting="unsafe")
        checks = ValueChecks()
        checks.check(models, unit[:, :mb].view(self.plan.mask_dtype) if self.check_x else None, y)
        if checks.failed:
            self.failed.set()
        if self.failed.is_set():
            return checks
        rpp = layout.rows_per_page
        buffers: list[np.ndarray] = []
        start = a
        while start < b:
            stop = min(b, (start // rpp + 1) * rpp)  # the end of start's page, or of the unit
            buffers.append(unit[start - a : stop - a])
            if stop % rpp == 0 and stop < b and len(self.padding):
                buffers.append(self.padding)
            start = stop
        offset = int(layout.row_offsets(np.array([a]))[0])
        _pwritev_all(fd, buffers, offset)
        _start_writeback(fd, offset, sum(int(b.nbytes) for b in buffers))
        return checks


def _read_rows(fd: int, ref: ArrayRef, models: np.ndarray, dest: np.ndarray) -> None:
    """Read rows ``models`` (increasing) of the array ``ref`` from ``fd`` into the rows of
    ``dest`` (uint8 ``(len(models), ref.row_bytes)``, each row contiguous): one ``preadv`` per
    run of consecutive models (at most :data:`_IOV_MAX` rows)."""
    if len(models) == 0:
        return
    breaks = np.flatnonzero(np.diff(models) != 1) + 1
    starts = [0, *breaks.tolist()]
    stops = [*breaks.tolist(), len(models)]
    contiguous = dest.flags.c_contiguous
    for a, b in zip(starts, stops, strict=True):
        for lo in range(a, b, _IOV_MAX):
            hi = min(b, lo + _IOV_MAX)
            offset = ref.offset + int(models[lo]) * ref.row_bytes
            rows = dest[lo:hi]
            buffers = [rows.reshape(-1).data] if contiguous else [row.data for row in rows]
            want = (hi - lo) * ref.row_bytes
            got = os.preadv(fd, buffers, offset)
            if got != want:
                raise BetonError(
                    f"{ref.path}: read {got} of {want} bytes of models {int(models[lo])}-"
                    f"{int(models[hi - 1])}; the store's file is shorter than its header says "
                    "(truncated?): check the store (python -m dm_assets.status)"
                )


@functools.cache
def _sync_file_range() -> Any:
    """Linux's ``sync_file_range`` from the C library, or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing bytes ``[offset, offset + nbytes)`` of ``fd`` to disk, without waiting:
    the disk writes while the next rows are read, and the final ``fsync`` waits only for the
    last ones. A hint: where the system has no ``sync_file_range``, ``fsync`` does it all."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _pwritev_all(fd: int, arrays: list[np.ndarray] | list[bytes], offset: int) -> None:
    """Write ``arrays`` (contiguous) one after the other from ``offset``, however many bytes
    each ``pwritev`` takes (at most :data:`_IOV_MAX` buffers a call)."""
    views = [memoryview(a) if isinstance(a, bytes) else a.data for a in arrays]
    pending = [v.cast("B") for v in views if v.nbytes]
    while pending:
        n = os.pwritev(fd, pending[:_IOV_MAX], offset)
        offset += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]
