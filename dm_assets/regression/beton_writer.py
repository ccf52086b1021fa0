"""Writing the store's completed rows as an FFCV dataset (``.beton``).

The format (fields ``mask``, ``targets``, ``idx``; rows in increasing model index) is
described in :mod:`dm_assets.regression.beton`. :func:`write_beton` checks everything before it
writes (:mod:`dm_assets.regression.beton_plan`: the keys' shapes and dtypes, the output
directory, then every row to be written), reporting every problem at once; it then writes
through FFCV's writer processes to a temporary file beside ``out_path`` and renames it into
place, so a failure never leaves a partial dataset under the final name.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dm_assets.regression.beton import (
    IDX_FIELD,
    MASK_FIELD,
    TARGET_DTYPE,
    TARGETS_FIELD,
    BetonError,
)
from dm_assets.regression.beton_plan import WritePlan, check_values, open_store, plan_write
from dm_assets.regression.ffcv_glue import ffcv_classes
from dm_assets.store.spec import COMPLETED_KEY
from dm_assets.store.store import fsync_path

logger = logging.getLogger(__name__)

# Rows per unit of work handed to one writer process (FFCV's default).
_WRITE_CHUNK_ROWS = 100
_MIN_PAGE_SIZE = 1 << 23  # FFCV's default page size, 8 MiB; a row must fit in one page
_MAX_PAGE_SIZE = 1 << 31  # FFCV refuses pages of 4 GiB or more


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
        Writer processes (default: the CPU count, at most 8).

    Returns
    -------
    BetonSummary
        What was written.

    Raises
    ------
    BetonError
        Naming the parameter, the value and the fix, before anything is written when the
        inputs do not fit.
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
    check_values(plan)
    indices = plan.rows.indices
    workers = _writer_count(num_workers, len(indices))
    row_bytes = plan.mask_dtype.itemsize * plan.n_features + TARGET_DTYPE.itemsize * plan.n_targets
    page_size = _page_size(row_bytes)
    _check_free_space(out_path, len(indices), row_bytes, page_size)
    logger.info(
        "writing %d rows (%d mask values, %d targets) from %s to %s with %d process(es)",
        len(indices),
        plan.n_features,
        plan.n_targets,
        store_dir,
        out_path,
        workers,
    )
    _write_file(plan, out_path, page_size=page_size, workers=workers)
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


def _page_size(row_bytes: int) -> int:
    """FFCV's page size for rows of ``row_bytes`` bytes: a power of two of at least 8 MiB
    that holds one row (a row never spans two pages)."""
    page_size = max(_MIN_PAGE_SIZE, 1 << max(0, row_bytes - 1).bit_length())
    if page_size > _MAX_PAGE_SIZE:
        raise BetonError(
            f"one row is {row_bytes} bytes, more than FFCV can hold in a page (2 GiB): pass "
            "y_slice to write fewer targets per dataset"
        )
    return page_size


def _check_free_space(out_path: Path, n_rows: int, row_bytes: int, page_size: int) -> None:
    """Raise when ``out_path``'s file system has too little room for the dataset."""
    # rows are packed into pages (a row never spans two), after the header, the per-row
    # metadata and the allocation table: an estimate within a page or two of the truth
    needed = n_rows * (row_bytes + 64) + 2 * page_size
    free = shutil.disk_usage(out_path.parent).free
    if free < needed:
        raise BetonError(
            f"out_path={str(out_path)!r}: the dataset needs about {needed / 2**30:.2f} GiB but "
            f"{out_path.parent} has {free / 2**30:.2f} GiB free; free space or choose another "
            "out_path"
        )


def _write_file(plan: WritePlan, out_path: Path, *, page_size: int, workers: int) -> None:
    """Write ``plan``'s rows with FFCV's writer to a temporary file beside ``out_path``, then
    rename it into place (durably); on failure the temporary file is removed."""
    ffcv = ffcv_classes()
    fields = {
        MASK_FIELD: ffcv.NDArrayField(dtype=plan.mask_dtype, shape=(plan.n_features,)),
        TARGETS_FIELD: ffcv.NDArrayField(dtype=TARGET_DTYPE, shape=(plan.n_targets,)),
        IDX_FIELD: ffcv.IntField(),
    }
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        writer = ffcv.GuardedWriter(str(tmp), fields, page_size=page_size, num_workers=workers)
        writer.from_indexed_dataset(plan.rows, chunksize=_WRITE_CHUNK_ROWS)
        fsync_path(tmp)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(out_path.parent)
