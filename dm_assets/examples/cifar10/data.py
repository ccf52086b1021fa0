"""Batches of an image dataset written by :mod:`dm_assets.examples.cifar10.convert`, in any row
order, through one FFCV loader per file and batch size for the whole process.

A training process (one worker trains many models) keeps one :class:`ImageBeton` per file and
batch size (:func:`image_beton`): FFCV compiles its decoding pipeline with numba on the first
pass, about a second per loader, and later passes (other epochs, other models, other masks)
reuse it. Each pass is handed its exact row order (a model's shuffled training indices, or the
test set in order), as ``Loader(indices=..., order=RANDOM)`` would select and shuffle them.

FFCV 1.0.2 details handled here: its loader reuses batch buffers, so every batch is copied
before it is yielded; it sets torch's (process-wide) thread count to its worker count when it
builds a loader and when each pass starts, so the caller's count is restored; and its pass
thread hangs the reader when a batch fails, so a failed pass raises instead.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dm_assets.errors import DmError
from dm_assets.examples.cifar10.convert import IMAGE_FIELD, IMAGE_SHAPE, LABEL_FIELD

logger = logging.getLogger(__name__)

# Loaders kept per process; a worker needs two (training and test set).
_MAX_CACHED = 4
_CACHE: OrderedDict[tuple[object, ...], ImageBeton] = OrderedDict()


class DatasetError(DmError, ValueError):
    """An image dataset that is missing or not one :mod:`convert` writes; says how to fix it."""


def _ffcv() -> Any:
    """FFCV, imported with torch's thread count kept (the repository's FFCV glue)."""
    from dm_assets.regression.ffcv_glue import ffcv_classes as regression_ffcv

    return regression_ffcv()


def _thread_guard() -> Any:
    from dm_assets.regression.ffcv_glue import KeepThreadCounts as _KeepThreadCounts

    return _KeepThreadCounts()


def _restore_threads(guard: Any) -> None:
    from dm_assets.regression.ffcv_glue import restore_thread_counts as _restore_thread_counts

    _restore_thread_counts(guard.torch_threads, guard.numba_threads)


class ImageBeton:
    """An FFCV dataset with fields ``image`` (RGB 32 x 32) and ``label`` (int), read in
    batches of at most ``batch_size`` rows: images uint8 ``(b, 32, 32, 3)`` (height, width,
    RGB) and labels int64 ``(b,)``.

    ``labels`` (int64 ``(n_rows,)``) comes from the file's metadata without decoding images.
    ``num_workers`` threads decode each batch (at most numba's thread count); ``batches_ahead``
    batches are decoded ahead of the one in use. Raises :class:`DatasetError` when the file is
    missing or lacks those fields.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, batch_size: int, num_workers: int = 4
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(
                f"no dataset at {self.path}; write it with `python -m "
                "dm_assets.examples.cifar10.convert --cifar-dir CIFAR_PYTHON_DIR --out-dir DIR` "
                "(see dm_assets/examples/cifar10/README.md) and pass its path"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"batch_size={batch_size!r} must be a positive integer")
        ffcv = _ffcv()
        import numba

        try:
            reader = ffcv.Reader(str(self.path))
        except Exception as exc:  # FFCV raises anything from IndexError to AssertionError
            raise DatasetError(
                f"{self.path} is not a readable FFCV dataset ({type(exc).__name__}: {exc}); "
                "convert CIFAR-10 again"
            ) from exc
        kinds = {name: type(h).__name__ for name, h in reader.handlers.items()}
        if kinds.get(IMAGE_FIELD) != "RGBImageField" or kinds.get(LABEL_FIELD) != "IntField":
            raise DatasetError(
                f"{self.path} has fields {kinds}; the CIFAR-10 example reads image "
                "(RGBImageField) and label (IntField), as convert writes them"
            )
        columns = reader.metadata.dtype.names
        images = reader.metadata[columns[reader.field_names.index(IMAGE_FIELD)]]
        if len(images) and (
            (images["height"] != IMAGE_SHAPE[0]).any() or (images["width"] != IMAGE_SHAPE[1]).any()
        ):
            raise DatasetError(f"{self.path}: the CIFAR-10 example needs 32 x 32 images")
        self.labels = np.array(
            reader.metadata[columns[reader.field_names.index(LABEL_FIELD)]], dtype=np.int64
        )
        self.n_rows = int(reader.num_samples)
        self.batch_size = batch_size
        # numba refuses more threads than it started with (NUMBA_NUM_THREADS)
        self.num_workers = max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        from ffcv.fields.decoders import SimpleRGBImageDecoder

        pipelines = {
            IMAGE_FIELD: [SimpleRGBImageDecoder(), ffcv.ToTensor()],
            LABEL_FIELD: [ffcv.IntDecoder(), ffcv.ToTensor(), ffcv.Squeeze(1)],
        }
        with _thread_guard():
            self._loader = ffcv.Loader(
                str(self.path),
                batch_size=batch_size,
                num_workers=self.num_workers,
                order=ffcv.OrderOption.SEQUENTIAL,  # unused: each pass gets its own order
                seed=0,
                pipelines=pipelines,
                drop_last=False,
                batches_ahead=3,
            )

    def batches(
        self, order: np.ndarray, *, device: torch.device, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rows ``order`` (row positions, in this order) as ``(images, labels)`` batches on
        ``device``, owned by the caller; with ``drop_last`` a last partial batch is skipped."""
        order = np.asarray(order, dtype=np.int64)
        if order.ndim != 1 or (order.size and not 0 <= order.min() <= order.max() < self.n_rows):
            raise DatasetError(
                f"order must be a 1-D array of row positions in [0, {self.n_rows}) of {self.path}"
            )
        if drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        if order.size == 0:
            return
        guard = _thread_guard()
        with guard:
            epoch = _ffcv().GuardedEpochIterator(self._loader, order.astype(np.uint64))
        try:
            for start in range(0, len(order), self.batch_size):
                batch = next(epoch, None)
                _restore_threads(guard)  # the pass's thread set torch's count as it started
                if batch is None:
                    rows = order[start : start + self.batch_size]
                    raise DatasetError(
                        f"reading rows {rows[:5].tolist()}... of {self.path} failed: "
                        f"{epoch.error!r}"
                    ) from epoch.error
                images, labels = batch
                # FFCV reuses the buffers a few batches later: copy before the caller sees them
                yield (
                    images.to(device=device, copy=True),
                    labels.to(device=device, dtype=torch.int64, copy=True),
                )
        finally:
            epoch.close()


def image_beton(
    path: str | os.PathLike[str], *, batch_size: int, num_workers: int = 4
) -> ImageBeton:
    """The process's :class:`ImageBeton` for ``path`` and these settings, made on first use;
    a file replaced since (converted again) gets a new one."""
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
        identity: tuple[object, ...] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        identity = ()
    key = (str(resolved), *identity, batch_size, num_workers)
    cached = _CACHE.get(key)
    if cached is None:
        cached = ImageBeton(resolved, batch_size=batch_size, num_workers=num_workers)
        _CACHE[key] = cached
        while len(_CACHE) > _MAX_CACHED:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return cached
