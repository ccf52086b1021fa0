"""Column-sliced arithmetic shared by the scores (:mod:`~dm_assets.evaluation.metrics`) and the
noise ceiling (:mod:`~dm_assets.evaluation.ceiling`): both work on ``(n_models, n_targets)``
matrices one slice of target columns at a time."""

from __future__ import annotations

from typing import Any

import numpy as np

# Columns are scored in slices of about this many values (float64), bounding the temporaries
# at a few tens of MB whatever t is; ranking a cache-sized slice is also faster than the whole.
CHUNK_VALUES = 2**20


def as_matrix(value: Any, name: str) -> np.ndarray:
    """``value`` as an ``(n_models, n_targets)`` array of numbers; the error names ``name``."""
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be (n_models, n_targets); got shape {array.shape} "
            "(one target: reshape(-1, 1))"
        )
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold numbers; got dtype {array.dtype}")
    return array


def column_slices(n: int, t: int) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` covering the ``t`` columns of an ``(n, t)`` matrix, each slice about
    :data:`CHUNK_VALUES` values."""
    width = max(1, CHUNK_VALUES // max(n, 1))
    return [(lo, min(lo + width, t)) for lo in range(0, t, width)]


def nanmean(values: np.ndarray) -> float:
    """The mean of the non-NaN entries of ``values``; NaN when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
