"""Reading an FFCV dataset (``.beton``) back: its description, and its rows in batches.

The format is described in :mod:`dm_assets.regression.beton`. :class:`BetonSource` keeps one
FFCV ``Loader`` per batch size, so its numba-compiled pipeline (about a second to compile)
serves every later call, and hands FFCV the exact row order of each pass: the positions asked
for, or their permutation by ``numpy.random.default_rng(seed)``, which is the order of FFCV's
own ``Loader(order=OrderOption.RANDOM, seed=seed, indices=rows)``. So the positions of every
batch are known, and checked against the decoded ``idx`` field. FFCV reuses its batch buffers,
so every batch is copied out before it is yielded. This drives FFCV 1.0.2's ``EpochIterator``
directly (``ffcv`` is pinned).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dm_assets.regression.beton import (
    IDX_FIELD,
    MASK_FIELD,
    TARGETS_FIELD,
    BetonError,
    named_indices,
)
from dm_assets.regression.data import Batch
from dm_assets.regression.ffcv_glue import KeepThreadCounts, ffcv_classes, restore_thread_counts

_WRITE_HINT = (
    "write one with `python -m dm_assets.regression.write_dataset --cfg.data_dir=STORE "
    "--cfg.out_path=OUT.beton`"
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
    ffcv = ffcv_classes()
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
    """The rows of a dataset, for the solvers (as written by
    :func:`~dm_assets.regression.beton_writer.write_beton`, or the seed).

    Implements :class:`~dm_assets.regression.data.RowSource`: row ``r`` (a position
    ``0 .. n_rows - 1`` in the file) is ``x`` = its ``mask`` as float32 ``(n_features,)`` and
    ``y`` = its ``targets`` columns ``[target_start, target_end)`` as float32
    ``(n_targets,)``. ``target_end=-1`` means to the last column (the seed's
    ``target_start_ind`` / ``target_end_ind``).

    Parameters
    ----------
    path : str or Path
        The dataset file.
    target_start, target_end : int
        The target columns ``[target_start, target_end)`` read (default: all).
    num_workers : int
        FFCV's: the threads that decode one batch (at most numba's thread count, the CPU
        count by default).
    batches_ahead : int
        Batches decoded ahead of the one being used.

    Raises
    ------
    BetonError
        When the file is missing, unreadable or lacks the ``mask``, ``targets`` and ``idx``
        fields, or when the target range does not fit.
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
        ``(n_rows,)`` (increasing, as
        :func:`~dm_assets.regression.beton_writer.write_beton` writes them)."""
        return self.info.model_indices.copy()

    def _loader(self, batch_size: int) -> Any:
        loader = self._loaders.get(batch_size)
        if loader is None:
            ffcv = ffcv_classes()
            pipelines = {
                MASK_FIELD: [ffcv.RowDecoder(), ffcv.ToTensor()],
                TARGETS_FIELD: [ffcv.RowDecoder(), ffcv.ToTensor()],
                IDX_FIELD: [ffcv.IntDecoder(), ffcv.ToTensor(), ffcv.Squeeze(1)],
            }
            with KeepThreadCounts():
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
                f"{named_indices(positions[outside], int(outside.sum()))}); {self.path} has "
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
        """The row positions ``rows`` in batches, in order or shuffled.

        As :meth:`~dm_assets.regression.data.RowSource.batches`: ``(x, y, rows)`` batches of
        at most ``batch_size`` (the last may be smaller), x float32 ``(b, n_features)``, y
        float32 ``(b, n_targets)``, rows int64 ``(b,)``, all on ``device`` and owned by the
        caller. With ``shuffle`` the rows are permuted by ``default_rng(seed)`` (FFCV's own
        ``OrderOption.RANDOM`` order for ``seed``): the same seed gives the same order.
        Raises :class:`BetonError` for a bad ``batch_size`` or positions outside the file.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BetonError(f"batch_size={batch_size!r} must be a positive integer")
        positions = self._positions(rows)
        if positions.size == 0:
            return
        order = np.random.default_rng(seed).permutation(positions) if shuffle else positions
        loader = self._loader(batch_size)
        model_indices = self.info.model_indices
        threads = KeepThreadCounts()
        with threads:
            epoch = ffcv_classes().GuardedEpochIterator(loader, order)
        try:
            for start in range(0, len(order), batch_size):
                part = order[start : start + batch_size]
                batch = next(epoch, None)
                # FFCV's thread sets torch's (process-wide) thread count as it starts
                restore_thread_counts(threads.torch_threads, threads.numba_threads)
                if batch is None:
                    raise BetonError(
                        f"reading {self.path} failed at rows {named_indices(part, len(part))}: "
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
