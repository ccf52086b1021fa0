"""The store's completed rows as an FFCV dataset (``.beton``), and reading it back in batches.

Every row of the dataset is one trained model. The fields, in this order:

===========  ===========================  =================================================
field        FFCV type, per-row shape     content
===========  ===========================  =================================================
``mask``     ``NDArrayField``,            the model's training-set mask (the store's ``x``
             ``(n_features,)``            key), in that key's dtype (bool, or 0/1 integers)
``targets``  ``NDArrayField`` float32,    the model's outputs (the store's ``y`` key, cast to
             ``(n_targets,)``             float32); one column, shape ``(1,)``, with
                                          ``y_slice``; a scalar ``y`` is one target
``idx``      ``IntField`` (int64)         the model's index in the store
===========  ===========================  =================================================

Rows are the completed models in increasing model index (every model with
``ignore_completed``), so ``idx`` increases strictly down the file. These are the seed's field
names and types: the seed's ``regression_data.beton`` reads here.

Reading (:class:`BetonSource`) keeps one FFCV ``Loader`` per batch size, so its numba-compiled
pipeline (about a second to compile) serves every later call, and hands FFCV the exact row order
of each pass: the positions asked for, or their permutation by
``numpy.random.default_rng(seed)``, which is the order of FFCV's own
``Loader(order=OrderOption.RANDOM, seed=seed, indices=rows)``. So the positions of every batch
are known, and checked against the decoded ``idx`` field. FFCV reuses its batch buffers, so
every batch is copied out before it is yielded. This drives FFCV 1.0.2's ``EpochIterator``
directly (``ffcv`` is pinned).

FFCV is imported on first use: importing it takes seconds (it compiles its JPEG decoders with
numba at import), and checking inputs does not need it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from dm_assets.errors import DmError
from dm_assets.regression.data import Batch
from dm_assets.store.spec import COMPLETED_KEY
from dm_assets.store.store import Store, StoreError, fsync_path

logger = logging.getLogger(__name__)

MASK_FIELD = "mask"
TARGETS_FIELD = "targets"
IDX_FIELD = "idx"
SEED_BETON_NAME = "regression_data.beton"
"""The file name the seed's ``write_dataset`` gives its dataset (inside the store)."""

TARGET_DTYPE = np.dtype(np.float32)
# The checks read the store in blocks of about this many bytes: a 21 GB store is never loaded.
_CHECK_BLOCK_BYTES = 64 << 20
# At most this many model indices are named in one error message.
_MAX_NAMED = 10
# Rows per unit of work handed to one writer process (FFCV's default).
_WRITE_CHUNK_ROWS = 100
_MIN_PAGE_SIZE = 1 << 23  # FFCV's default page size, 8 MiB; a row must fit in one page
_MAX_PAGE_SIZE = 1 << 31  # FFCV refuses pages of 4 GiB or more
_WRITE_HINT = (
    "write one with `python -m dm_assets.regression.write_dataset --cfg.data_dir=STORE "
    "--cfg.out_path=OUT.beton`"
)


class BetonError(DmError, ValueError):
    """A dataset cannot be written or read as asked; the message says what and how to fix it."""


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


@dataclass(frozen=True)
class BetonInfo:
    """What a dataset file holds: ``n_rows`` rows of ``mask`` ``(n_features,)`` in
    ``mask_dtype`` and ``targets`` ``(n_targets,)`` in ``targets_dtype``; ``model_indices``
    is the ``idx`` field of every row, int64 ``(n_rows,)``."""

    path: Path
    n_rows: int
    n_features: int
    n_targets: int
    mask_dtype: np.dtype
    targets_dtype: np.dtype
    model_indices: np.ndarray


# ------------------------------------------------------------------------------- FFCV glue
def _ffcv() -> SimpleNamespace:
    """FFCV's classes and our three subclasses of them, imported and defined on first use."""
    with _KeepThreadCounts():  # importing ffcv sets torch's threads to 1, process-wide
        return _import_ffcv()


@functools.cache
def _import_ffcv() -> SimpleNamespace:
    import ctypes
    from multiprocessing import Process, Queue, Value

    from ffcv.fields import IntField, NDArrayField
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader
    from ffcv.transforms import Squeeze, ToTensor
    from ffcv.types import HeaderType
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class RowDecoder(NDArrayDecoder):
        """FFCV's NDArrayDecoder, copying with numba instead of FFCV's ctypes ``memcpy``.

        Every NDArrayDecoder compiles its own numba wrapper of that ``memcpy``; with numba 0.68
        a freed Loader then prints ``Exception ignored in: <finalize ...> KeyError`` from
        numba's finalizers while a later Loader lives (and sharing one wrapper instead kills
        the later Loader's thread). A plain numba copy has no such wrapper.
        """

        def generate_code(self) -> Any:
            my_range = Compiler.get_iterator()
            mem_read = self.memory_read

            def decoder(indices, destination, metadata, storage_state):
                for ix in my_range(indices.shape[0]):
                    data = mem_read(metadata[indices[ix]], storage_state)
                    row = destination[ix].view(np.uint8)
                    # a plain loop: numba compiles it faster than a slice assignment
                    for k in range(data.shape[0]):
                        row[k] = data[k]
                return destination

            return decoder

    class GuardedEpochIterator(EpochIterator):
        """FFCV's per-pass thread, ending the pass instead of hanging when a batch fails.

        FFCV's thread catches StopIteration only: any other exception ends it while the reader
        waits forever for the next batch. Here the exception is kept in ``error`` and the pass
        ends; :meth:`BetonSource.batches` raises it.
        """

        error: BaseException | None = None

        def run(self) -> None:
            try:
                super().run()
            except BaseException as exc:
                self.error = exc
                self.output_queue.put(None)

    class GuardedWriter(DatasetWriter):
        """FFCV's DatasetWriter, failing instead of hanging when a writer process dies.

        FFCV's loop waits until every row is counted, so a worker that dies (an exception, a
        full disk, the out-of-memory killer) makes it wait forever, and its shared memory is
        never released. This is FFCV 1.0.2's ``_write_common`` with the workers watched, the
        shared memory always released and the progress bar shown on a terminal only.
        """

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args) -> None:
            self.num_samples = num_samples
            self.prepare()
            try:
                work: Any = Queue()
                for todo in queue_content:
                    work.put(todo)
                for _ in range(self.num_workers):
                    work.put(None)  # one stop token per worker
                allocations: Any = Queue()
                done: Any = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (
                    work,
                    self.metadata_sm,
                    self.metadata_type,
                    self.fields,
                    allocator,
                    done,
                    allocations,
                    *extra_worker_args,
                )
                processes = [
                    Process(target=work_fn, args=args, daemon=True) for _ in range(self.num_workers)
                ]
                allocation_list: list[Any] = []
                try:
                    for p in processes:
                        p.start()
                    with tqdm(total=num_samples, disable=None, desc="rows written") as bar:
                        counted = 0
                        while counted != num_samples:
                            _check_writers(processes, done, num_samples)
                            now = int(done.value)
                            bar.update(now - counted)
                            counted = now
                            time.sleep(0.02)
                    for _ in processes:
                        while True:
                            try:
                                allocation_list.extend(allocations.get(timeout=0.2))
                                break
                            except queue.Empty:
                                _check_writers(processes, done, num_samples)
                    for p in processes:
                        p.join()
                finally:
                    for p in processes:
                        if p.is_alive():
                            p.terminate()
                            p.join()
                self.finalize(allocation_list)
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return SimpleNamespace(
        IntField=IntField,
        NDArrayField=NDArrayField,
        IntDecoder=IntDecoder,
        RowDecoder=RowDecoder,
        Loader=Loader,
        OrderOption=OrderOption,
        GuardedEpochIterator=GuardedEpochIterator,
        GuardedWriter=GuardedWriter,
        Reader=Reader,
        Squeeze=Squeeze,
        ToTensor=ToTensor,
        HeaderType=HeaderType,
    )


def _check_writers(processes: Sequence[Any], done: Any, num_samples: int) -> None:
    """Raise when a writer process died, or when all finished with rows left uncounted."""
    failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
    if failed:
        raise BetonError(
            f"a writer process exited with code {failed[0]} before every row was written (its "
            "traceback, if any, is above; a negative code is the signal that ended it, -9 "
            "often the out-of-memory killer); nothing was written under the final name. Fix "
            "the cause (disk space, memory) and rerun, or pass fewer num_workers"
        )
    # Workers count their rows before they exit, so once all have exited the count is final.
    if all(p.exitcode == 0 for p in processes) and int(done.value) != num_samples:
        raise BetonError(
            f"every writer process finished but only {int(done.value)} of {num_samples} rows "
            "were counted; nothing was written under the final name. Rerun"
        )


class _KeepThreadCounts:
    """Restores torch's and numba's thread counts in this thread on exit. FFCV sets both to
    its ``num_workers`` (to 1 on import), and torch's count is process-wide."""

    def __enter__(self) -> None:
        import numba

        self.torch_threads = torch.get_num_threads()
        self.numba_threads = numba.get_num_threads()

    def __exit__(self, *exc: object) -> None:
        _restore_thread_counts(self.torch_threads, self.numba_threads)


def _restore_thread_counts(torch_threads: int, numba_threads: int) -> None:
    import numba

    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if numba.get_num_threads() != numba_threads:
        numba.set_num_threads(numba_threads)


# ------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class _ArrayRef:
    """Where a store array lives, so that writer processes map it themselves (small pickle)."""

    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, array: np.memmap) -> _ArrayRef:
        return cls(str(array.filename), int(array.offset), array.dtype, tuple(array.shape))

    def open(self) -> np.memmap:
        return np.memmap(
            self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape
        )


class _StoreRows:
    """The rows to write, as FFCV's writer asks for them: item ``i`` is model
    ``indices[i]``'s ``(mask (n_features,), float32 targets (n_targets,), model index)``."""

    def __init__(self, x: _ArrayRef, y: _ArrayRef, indices: np.ndarray, y_cols: slice) -> None:
        self.x_ref, self.y_ref, self.indices, self.y_cols = x, y, indices, y_cols
        self._x: np.memmap | None = None
        self._y: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        # a spawned writer process maps the files itself rather than receiving their contents
        return {**self.__dict__, "_x": None, "_y": None}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        if self._x is None or self._y is None:
            self._x, self._y = self.x_ref.open(), self.y_ref.open()
        model = int(self.indices[i])
        x = np.ascontiguousarray(self._x[model])
        y = np.asarray(self._y[model]).reshape(-1)[self.y_cols].astype(TARGET_DTYPE)
        return x, y, model


@dataclass(frozen=True)
class _WritePlan:
    rows: _StoreRows
    x_key: str
    y_key: str
    n_features: int
    n_targets: int
    mask_dtype: np.dtype


def _open_store(store_dir: Path) -> Store:
    try:
        return Store.open(store_dir)
    except StoreError as exc:
        raise BetonError(
            f"cannot read the store at {store_dir}: {exc}\nPass the store directory (the one "
            "holding _completed.npy and the key files) as store_dir / --cfg.data_dir"
        ) from exc


def _completed_flags(store: Store, completed_name: str) -> np.ndarray:
    """The completion flags as bool ``(num_models,)``: the store's own, or ``<name>.npy``."""
    if completed_name == COMPLETED_KEY:
        return store.completed_mask()
    path = store.path / f"{completed_name}.npy"
    if not path.is_file():
        raise BetonError(
            f"completed_name={completed_name!r}: there is no {path}; pass the name of the "
            f"store's completion flags ({COMPLETED_KEY!r}, the default), or ignore_completed "
            "to write every row"
        )
    try:
        flags = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise BetonError(f"completed_name={completed_name!r}: {path} is unreadable: {exc}") from exc
    if flags.shape != (store.spec.num_models,) or flags.dtype.kind not in "biu":
        raise BetonError(
            f"completed_name={completed_name!r}: {path} has shape {list(flags.shape)} dtype "
            f"{flags.dtype.name}; completion flags are bool or integer, shape "
            f"[{store.spec.num_models}] (one per model)"
        )
    return np.asarray(flags) != 0


def _plan(
    store: Store,
    out_path: Path,
    *,
    x_name: str,
    y_name: str,
    y_slice: int | None,
    completed_name: str,
    ignore_completed: bool,
) -> _WritePlan:
    """Check everything that needs no row data, reporting every problem at once."""
    schema = store.spec.schema
    problems: list[str] = []
    keys = list(schema)
    for param, key in (("x_name", x_name), ("y_name", y_name)):
        if key not in schema:
            problems.append(
                f"{param}={key!r} is not a key of the store at {store.path}; its keys are {keys}"
            )
    n_features = n_targets = 0
    if x_name in schema:
        x = schema[x_name]
        if len(x.shape) != 1 or x.shape[0] == 0:
            problems.append(
                f"x key {x_name!r} has shape {list(x.shape)} per model; a mask is one "
                "non-empty vector per model, shape [n_features]: pass the mask key as x_name"
            )
        else:
            n_features = x.shape[0]
        if x.dtype.kind not in "biu":
            problems.append(
                f"x key {x_name!r} has dtype {x.dtype.name}; masks must be bool_ or integers "
                "holding 0/1: store masks as bool_ (or uint8) in the training script's spec"
            )
    y_cols = slice(None)
    if y_name in schema:
        y = schema[y_name]
        if len(y.shape) > 1:
            problems.append(
                f"y key {y_name!r} has shape {list(y.shape)} per model; targets must be one "
                "vector per model, shape [n_targets] (or a scalar, one target): return them "
                "flattened from the training script"
            )
        elif y.shape == (0,):
            problems.append(f"y key {y_name!r} has no values (shape [0]); it has no targets")
        else:
            n_targets = y.shape[0] if y.shape else 1
        if y.dtype.kind not in "biuf":
            problems.append(
                f"y key {y_name!r} has dtype {y.dtype.name}; targets must be real numbers "
                "(they are written as float32)"
            )
    if y_slice is not None:
        if isinstance(y_slice, bool) or not isinstance(y_slice, (int, np.integer)):
            problems.append(f"y_slice={y_slice!r} must be an integer column index, or None")
        elif n_targets and not 0 <= y_slice < n_targets:
            problems.append(
                f"y_slice={y_slice} is out of range: y key {y_name!r} has {n_targets} "
                f"target(s), so y_slice must be in [0, {n_targets - 1}]"
            )
        elif n_targets:
            y_cols = slice(int(y_slice), int(y_slice) + 1)
            n_targets = 1
    parent = out_path.parent
    if not parent.is_dir():
        problems.append(
            f"out_path={str(out_path)!r}: its directory {parent} does not exist; create it first"
        )
    elif out_path.is_dir():
        problems.append(
            f"out_path={str(out_path)!r} is a directory; pass a file name, e.g. "
            f"{out_path / SEED_BETON_NAME}"
        )
    elif not os.access(parent, os.W_OK | os.X_OK):
        problems.append(
            f"out_path={str(out_path)!r}: its directory {parent} is not writable; choose "
            "another out_path"
        )
    if problems:
        raise _problems(problems)

    if ignore_completed:
        indices = np.arange(store.spec.num_models, dtype=np.int64)
    else:
        indices = np.flatnonzero(_completed_flags(store, completed_name)).astype(np.int64)
        if indices.size == 0:
            raise BetonError(
                f"no model of the store at {store.path} is completed ({completed_name}.npy "
                "has no flag set), so there are no rows to write: train models first "
                "(`python -m dm_assets.worker ...`), or pass ignore_completed "
                "(--cfg.ignore_completed) to write every row as it is"
            )
    rows = _StoreRows(
        _ArrayRef.of(store.read(x_name)), _ArrayRef.of(store.read(y_name)), indices, y_cols
    )
    return _WritePlan(rows, x_name, y_name, n_features, n_targets, schema[x_name].dtype)


def _problems(problems: list[str]) -> BetonError:
    if len(problems) == 1:
        return BetonError(problems[0])
    lines = "\n".join(f"  - {p}" for p in problems)
    return BetonError(f"cannot write the dataset ({len(problems)} problems):\n{lines}")


def _named(indices: Sequence[int] | np.ndarray, total: int) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:_MAX_NAMED])
    more = f" and {total - _MAX_NAMED} more" if total > _MAX_NAMED else ""
    return f"{shown}{more}"


def _check_values(plan: _WritePlan) -> None:
    """Read the rows to be written, block by block: masks must be 0/1, targets finite."""
    rows = plan.rows
    x, y = rows.x_ref.open(), rows.y_ref.open()
    check_x = x.dtype.kind in "iu"
    check_y = y.dtype.kind == "f"
    if not (check_x or check_y):
        return
    row_bytes = x.dtype.itemsize * plan.n_features + y.dtype.itemsize * max(1, y[0].size)
    block = max(1, _CHECK_BLOCK_BYTES // row_bytes)
    bad_x: list[int] = []
    bad_x_count = 0
    bad_value: int | None = None
    bad_y: list[int] = []
    bad_y_count = 0
    for start in range(0, len(rows.indices), block):
        part = rows.indices[start : start + block]
        if check_x:
            xb = np.asarray(x[part])
            bad = ((xb != 0) & (xb != 1)).any(axis=1)
            if bad.any():
                bad_x_count += int(bad.sum())
                bad_x.extend(part[bad][: _MAX_NAMED - len(bad_x)].tolist())
                if bad_value is None:
                    first = xb[bad][0]
                    bad_value = int(first[(first != 0) & (first != 1)][0])
        if check_y:
            yb = np.asarray(y[part]).reshape(len(part), -1)[:, rows.y_cols]
            with np.errstate(over="ignore"):
                bad = ~np.isfinite(yb.astype(TARGET_DTYPE)).all(axis=1)
            if bad.any():
                bad_y_count += int(bad.sum())
                bad_y.extend(part[bad][: _MAX_NAMED - len(bad_y)].tolist())
    problems = []
    if bad_x_count:
        problems.append(
            f"x key {plan.x_key!r} ({x.dtype.name}) must hold only 0 and 1, but model(s) "
            f"{_named(bad_x, bad_x_count)} hold other values (e.g. {bad_value}): fix the "
            "training script's masks and retrain those models (--worker.do_if_complete)"
        )
    if bad_y_count:
        beyond = " or beyond float32's range" if y.dtype.itemsize > 4 else ""
        problems.append(
            f"y key {plan.y_key!r} has NaN or infinite values{beyond} in model(s) "
            f"{_named(bad_y, bad_y_count)}: retrain those models (--worker.do_if_complete); "
            "targets must be finite"
        )
    if problems:
        raise _problems(problems)


def _writer_count(num_workers: int | None, n_rows: int) -> int:
    if num_workers is None:
        num_workers = min(os.cpu_count() or 1, 8)
    elif isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise BetonError(f"num_workers={num_workers!r} must be a positive integer, or None")
    # a process per chunk of rows at most: more would only start and stop
    return max(1, min(num_workers, math.ceil(n_rows / _WRITE_CHUNK_ROWS)))


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
    store_dir : the store directory (holding ``_completed.npy`` and ``<key>.npy`` files).
    out_path : the ``.beton`` to write; its directory must exist. An existing file is replaced
        only once the new one is complete: the data goes to a temporary file beside it first,
        so a failure at any point leaves ``out_path`` as it was and no temporary file.
    x_name : the mask key, one vector per model ``(n_features,)``: bool, or integers that are
        all 0 or 1 (checked on every row written). Written in its own dtype as ``mask``.
    y_name : the targets key, one vector per model ``(n_targets,)``, or a scalar per model
        (then one target). Real numbers, written as float32 ``targets`` ``(n_targets,)``; every
        written value must be finite once cast (checked).
    y_slice : write only target column ``y_slice`` (``targets`` then has shape ``(1,)``).
    completed_name : the completion flags, ``<completed_name>.npy`` in the store, bool
        ``(num_models,)``; rows with a flag set are written, in increasing model index.
    ignore_completed : write every model's row, completed or not.
    num_workers : writer processes (default: the CPU count, at most 8).

    Returns the :class:`BetonSummary`. Raises :class:`BetonError`, naming the parameter, the
    value and the fix, before anything is written when the inputs do not fit.
    """
    started = time.perf_counter()
    store_dir, out_path = Path(store_dir), Path(out_path)
    with _open_store(store_dir) as store:
        plan = _plan(
            store,
            out_path,
            x_name=x_name,
            y_name=y_name,
            y_slice=y_slice,
            completed_name=completed_name,
            ignore_completed=ignore_completed,
        )
    _check_values(plan)
    indices = plan.rows.indices
    workers = _writer_count(num_workers, len(indices))
    row_bytes = plan.mask_dtype.itemsize * plan.n_features + TARGET_DTYPE.itemsize * plan.n_targets
    page_size = max(_MIN_PAGE_SIZE, 1 << max(0, row_bytes - 1).bit_length())
    if page_size > _MAX_PAGE_SIZE:
        raise BetonError(
            f"one row is {row_bytes} bytes, more than FFCV can hold in a page (2 GiB): pass "
            "y_slice to write fewer targets per dataset"
        )
    # rows are packed into pages (a row never spans two), after the header, the per-row
    # metadata and the allocation table: an estimate within a page or two of the truth
    needed = len(indices) * (row_bytes + 64) + 2 * page_size
    free = shutil.disk_usage(out_path.parent).free
    if free < needed:
        raise BetonError(
            f"out_path={str(out_path)!r}: the dataset needs about {needed / 2**30:.2f} GiB but "
            f"{out_path.parent} has {free / 2**30:.2f} GiB free; free space or choose another "
            "out_path"
        )
    ffcv = _ffcv()
    fields = {
        MASK_FIELD: ffcv.NDArrayField(dtype=plan.mask_dtype, shape=(plan.n_features,)),
        TARGETS_FIELD: ffcv.NDArrayField(dtype=TARGET_DTYPE, shape=(plan.n_targets,)),
        IDX_FIELD: ffcv.IntField(),
    }
    logger.info(
        "writing %d rows (%d mask values, %d targets) from %s to %s with %d process(es)",
        len(indices),
        plan.n_features,
        plan.n_targets,
        store_dir,
        out_path,
        workers,
    )
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        writer = ffcv.GuardedWriter(str(tmp), fields, page_size=page_size, num_workers=workers)
        writer.from_indexed_dataset(plan.rows, chunksize=_WRITE_CHUNK_ROWS)
        fsync_path(tmp)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(out_path.parent)
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


# ------------------------------------------------------------------------------- reading
def _unreadable(path: Path, why: str) -> BetonError:
    return BetonError(
        f"{path} is not a readable FFCV dataset: {why}; write it again with `python -m "
        "dm_assets.regression.write_dataset --cfg.data_dir=STORE --cfg.out_path=OUT.beton`"
    )


def _open_reader(path: Path) -> Any:
    """FFCV's Reader of ``path``, after checking the file is whole and has our fields."""
    if not path.exists():
        raise BetonError(f"no dataset at {path}: {_WRITE_HINT}")
    if not path.is_file():
        raise BetonError(f"{path} is not a file; pass the .beton file, not its directory")
    ffcv = _ffcv()
    size = path.stat().st_size
    header = np.fromfile(path, dtype=ffcv.HeaderType, count=1)
    if len(header) == 1 and int(header[0]["alloc_table_ptr"]) > size:
        raise _unreadable(path, f"it is truncated ({size} bytes)")
    try:
        reader = ffcv.Reader(str(path))
    except Exception as exc:  # FFCV raises anything from IndexError to AssertionError
        raise _unreadable(path, f"{type(exc).__name__}: {exc}") from exc
    if int(reader.header["alloc_table_ptr"]) > size or len(reader.metadata) != reader.num_samples:
        raise _unreadable(path, f"it is truncated ({size} bytes)")
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > size:
        raise _unreadable(path, f"it is truncated ({size} bytes)")
    handlers = reader.handlers
    wanted = {MASK_FIELD: ffcv.NDArrayField, TARGETS_FIELD: ffcv.NDArrayField}
    wanted[IDX_FIELD] = ffcv.IntField
    for name, kind in wanted.items():
        handler = handlers.get(name)
        if not isinstance(handler, kind) or (
            kind is ffcv.NDArrayField and (len(handler.shape) != 1 or handler.shape[0] == 0)
        ):
            fields = {k: type(v).__name__ for k, v in handlers.items()}
            raise _unreadable(
                path,
                f"it needs fields mask and targets (1-D NDArrayField) and idx (IntField); "
                f"it has {fields}",
            )
    return reader


def beton_info(path: str | Path) -> BetonInfo:
    """What the dataset at ``path`` holds (reads its header and per-row metadata only)."""
    path = Path(path)
    reader = _open_reader(path)
    mask, targets = reader.handlers[MASK_FIELD], reader.handlers[TARGETS_FIELD]
    idx_column = reader.metadata.dtype.names[reader.field_names.index(IDX_FIELD)]
    return BetonInfo(
        path=path,
        n_rows=int(reader.num_samples),
        n_features=int(mask.shape[0]),
        n_targets=int(targets.shape[0]),
        mask_dtype=np.dtype(mask.dtype),
        targets_dtype=np.dtype(targets.dtype),
        model_indices=np.array(reader.metadata[idx_column], dtype=np.int64),
    )


class BetonSource:
    """The rows of a dataset written by :func:`write_beton` (or the seed), for the solvers.

    Implements :class:`~dm_assets.regression.data.RowSource`: row ``r`` (a position
    ``0 .. n_rows - 1`` in the file) is ``x`` = its ``mask`` as float32 ``(n_features,)`` and
    ``y`` = its ``targets`` columns ``[target_start, target_end)`` as float32
    ``(n_targets,)``. ``target_end=-1`` means to the last column (the seed's
    ``target_start_ind`` / ``target_end_ind``).

    ``num_workers`` is FFCV's: the threads that decode one batch (at most numba's thread
    count, the CPU count by default). ``batches_ahead`` batches are decoded ahead of the one
    being used. Raises :class:`BetonError` when the file is missing, unreadable or lacks the
    ``mask``, ``targets`` and ``idx`` fields, or when the target range does not fit.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        target_start: int = 0,
        target_end: int = -1,
        num_workers: int = 2,
        batches_ahead: int = 3,
    ) -> None:
        self.path = Path(path)
        self.info = beton_info(self.path)
        total = self.info.n_targets
        end = total if target_end == -1 else target_end
        if not 0 <= target_start < end <= total:
            raise BetonError(
                f"target_start={target_start}, target_end={target_end}: {self.path} has "
                f"{total} targets, so 0 <= target_start < target_end <= {total} (or "
                "target_end=-1 for all the rest)"
            )
        for name, value in (("num_workers", num_workers), ("batches_ahead", batches_ahead)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BetonError(f"{name}={value!r} must be a positive integer")
        import numba

        # numba refuses more threads than it started with (NUMBA_NUM_THREADS)
        self.num_workers = min(num_workers, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        self.batches_ahead = batches_ahead
        self.target_start, self.target_end = target_start, end
        self._loaders: dict[int, Any] = {}

    @property
    def n_rows(self) -> int:
        return self.info.n_rows

    @property
    def n_features(self) -> int:
        return self.info.n_features

    @property
    def n_targets(self) -> int:
        return self.target_end - self.target_start

    def model_indices(self) -> np.ndarray:
        """The ``idx`` field of every row: each row's model index in the store, int64
        ``(n_rows,)`` (increasing, as :func:`write_beton` writes)."""
        return self.info.model_indices.copy()

    def _loader(self, batch_size: int) -> Any:
        loader = self._loaders.get(batch_size)
        if loader is None:
            ffcv = _ffcv()
            pipelines = {
                MASK_FIELD: [ffcv.RowDecoder(), ffcv.ToTensor()],
                TARGETS_FIELD: [ffcv.RowDecoder(), ffcv.ToTensor()],
                IDX_FIELD: [ffcv.IntDecoder(), ffcv.ToTensor(), ffcv.Squeeze(1)],
            }
            with _KeepThreadCounts():
                loader = ffcv.Loader(
                    str(self.path),
                    batch_size=batch_size,
                    num_workers=self.num_workers,
                    order=ffcv.OrderOption.SEQUENTIAL,  # unused: each pass gets its own order
                    seed=0,
                    pipelines=pipelines,
                    drop_last=False,
                    batches_ahead=self.batches_ahead,
                )
            self._loaders[batch_size] = loader
        return loader

    def _positions(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        positions = np.asarray(rows)
        if positions.size == 0:
            return np.zeros(0, dtype=np.int64)
        if positions.ndim != 1 or positions.dtype.kind not in "iu":
            raise BetonError(
                f"rows must be a 1-D sequence of integer row positions; got shape "
                f"{list(positions.shape)} dtype {positions.dtype.name}"
            )
        positions = positions.astype(np.int64)
        outside = (positions < 0) | (positions >= self.n_rows)
        if outside.any():
            raise BetonError(
                f"rows holds positions outside [0, {self.n_rows}) (e.g. "
                f"{_named(positions[outside], int(outside.sum()))}); {self.path} has "
                f"{self.n_rows} rows"
            )
        return positions

    def batches(
        self,
        rows: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        device: torch.device,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[Batch]:
        """The row positions ``rows`` as ``(x, y, rows)`` batches of at most ``batch_size``
        (the last may be smaller): x float32 ``(b, n_features)``, y float32
        ``(b, n_targets)``, rows int64 ``(b,)``, all on ``device`` and owned by the caller.
        In the given order, or with ``shuffle`` permuted by ``default_rng(seed)`` (FFCV's own
        ``OrderOption.RANDOM`` order for ``seed``): the same seed gives the same order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BetonError(f"batch_size={batch_size!r} must be a positive integer")
        positions = self._positions(rows)
        if positions.size == 0:
            return
        order = np.random.default_rng(seed).permutation(positions) if shuffle else positions
        loader = self._loader(batch_size)
        model_indices = self.info.model_indices
        threads = _KeepThreadCounts()
        with threads:
            epoch = _ffcv().GuardedEpochIterator(loader, order)
        try:
            for start in range(0, len(order), batch_size):
                part = order[start : start + batch_size]
                batch = next(epoch, None)
                # FFCV's thread sets torch's (process-wide) thread count as it starts
                _restore_thread_counts(threads.torch_threads, threads.numba_threads)
                if batch is None:
                    raise BetonError(
                        f"reading {self.path} failed at rows {_named(part, len(part))}: "
                        f"{epoch.error!r}"
                    ) from epoch.error
                mask, targets, idx = batch
                # FFCV reuses its buffers a few batches later: copy before the caller sees them
                x = mask.to(device=device, dtype=torch.float32, copy=True)
                y = targets[:, self.target_start : self.target_end].to(
                    device=device, dtype=torch.float32, copy=True
                )
                if not np.array_equal(idx.numpy().reshape(-1), model_indices[part]):
                    raise RuntimeError(
                        f"FFCV returned rows other than those asked for from {self.path}; "
                        "is the installed ffcv the pinned 1.0.2?"
                    )
                yield x, y, torch.from_numpy(part.copy()).to(device)
        finally:
            epoch.close()
