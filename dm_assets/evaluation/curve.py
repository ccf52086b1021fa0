"""LDS against the number of models the datamodels are fitted on: refits on prefixes of the
training models, each scored on the same held-out models (:func:`lds_curve`).

Imports neither dagster nor mlflow; torch and the solvers only when a curve is fitted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from dm_assets.evaluation.metrics import Evaluation, evaluate, predict

if TYPE_CHECKING:
    from dm_assets.regression.config import RegressionConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class CurvePoint:
    """One refit of the curve: ``n_train`` training rows (the size), ``n_models_used`` models
    the final weights were fitted on (``n_train + num_val`` with ``cfg.refit``, the default,
    which refits at the chosen lambda on training and validation rows; else ``n_train``),
    held-out ``lds``, ``pearson`` and ``r2`` (means over targets), ``seconds`` the fit took
    (wall clock), and the full ``evaluation``."""

    n_train: int
    n_models_used: int
    lds: float
    pearson: float
    r2: float
    seconds: float
    evaluation: Evaluation = field(repr=False)

    def to_dict(self) -> dict[str, int | float]:
        """The point as ``evaluation.json`` lists it: ``n_train``, ``n_models_used`` (int),
        ``lds``, ``pearson``, ``r2`` (float)."""
        return {
            "n_train": self.n_train,
            "n_models_used": self.n_models_used,
            "lds": self.lds,
            "pearson": self.pearson,
            "r2": self.r2,
        }


def _held_out_rows(
    held_out: slice | Sequence[int] | np.ndarray | None, n: int, seen: int
) -> np.ndarray:
    if held_out is None:
        rows = np.arange(seen, n)
    elif isinstance(held_out, slice):
        rows = np.arange(n)[held_out]
    else:
        rows = np.asarray(held_out)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise ValueError(
                f"held_out must be a slice or a 1-D array of row indices; got {rows.dtype} "
                f"shape {rows.shape}"
            )
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(
                f"held_out has rows outside [0, {n}) (x has {n} models): {rows.min()} .. "
                f"{rows.max()}"
            )
    if rows.size < 3:
        raise ValueError(
            f"held_out selects {rows.size} model(s); the scores need at least 3 (x has {n} "
            f"models, the first {seen} of which fit and validate)"
        )
    if rows.min() < seen:
        raise ValueError(
            f"held_out includes rows below num_train + num_val = {seen} (e.g. {rows.min()}), "
            f"models the fit uses: hold out rows from {seen} on"
        )
    return rows


def lds_curve(
    x: np.ndarray,
    y: np.ndarray,
    *,
    config: RegressionConfig,
    sizes: Sequence[int],
    num_train: int | None = None,
    num_val: int | None = None,
    held_out: slice | Sequence[int] | np.ndarray | None = None,
    groups: np.ndarray | None = None,
    config_overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> list[CurvePoint]:
    """Held-out LDS against the number of models the datamodels are fitted on.

    ``x`` ``(n_models, p)`` bool masks and ``y`` ``(n_models, t)`` float outputs (``(n,)`` for
    one target) of completed models in the regression's row order: rows ``[0, num_train)`` fit,
    the next ``num_val`` choose lambda, the held-out rows (default: all rows from
    ``num_train + num_val`` on; or a slice / index array of rows there) are scored. ``y`` holds
    exactly the targets to fit: apply any target slice before the call (the config's is not).

    For each ``n`` in ``sizes`` (increasing, each in ``[2, num_train]``) the datamodels are
    refitted by :func:`~dm_assets.regression.compute_datamodels.compute_datamodels` on rows
    ``[0, n)``, with lambda chosen on the same ``num_val`` validation rows (which follow the
    *full* training block) and scored on the same held-out rows, so only the amount of training
    data changes (with ``cfg.refit``, the default, the final weights are refitted on the
    ``n`` training and the ``num_val`` validation rows: see :class:`CurvePoint`). Settings come
    from ``config`` (its ``cfg`` and ``early_stopping`` sections)
    with ``config_overrides`` (``{"cfg": {"solver": "gram"}}``) on top; ``num_train`` and
    ``num_val`` default to its ``data`` section. ``cfg.batch_size`` is capped at ``n``.
    ``groups`` (per held-out row) adds the noise ceiling to each point's evaluation.
    """
    from dm_assets.regression.compute_datamodels import compute_datamodels
    from dm_assets.regression.config import load_config
    from dm_assets.regression.data import ArraySource

    raw = config.to_dict()
    for section, values in (config_overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    if num_train is not None:
        raw["data"]["num_train"] = num_train
    if num_val is not None:
        raw["data"]["num_val"] = num_val
    base = load_config(None, raw)  # reports bad overrides before any fit
    num_train, num_val = int(base["data"]["num_train"]), int(base["data"]["num_val"])
    seen = num_train + num_val

    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be (n_models, p) masks; got shape {getattr(x, 'shape', None)}")
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must be (n_models, t) with one row per row of x ({x.shape[0]}); got {y.shape}"
        )
    n = int(x.shape[0])
    if n <= seen:
        raise ValueError(
            f"x has {n} models but num_train + num_val = {seen}: no model is left to hold out"
        )
    sizes = [int(s) for s in sizes]
    problems = []
    if not sizes:
        problems.append("sizes is empty: give the numbers of training models to refit on")
    if sizes != sorted(set(sizes)):
        problems.append(f"sizes={sizes} must be increasing, each size once")
    if any(s < 2 for s in sizes):
        problems.append(f"sizes={sizes}: every size must be at least 2 models")
    if any(s > num_train for s in sizes):
        problems.append(
            f"sizes={sizes}: every size must be at most num_train={num_train} (the rows after "
            "them choose lambda): drop the larger sizes or raise num_train"
        )
    if problems:
        raise ValueError("invalid LDS curve:\n" + "\n".join(f"  - {m}" for m in problems))
    held = _held_out_rows(held_out, n, seen)
    if groups is not None and np.shape(groups) != (len(held),):
        raise ValueError(
            f"groups must give one id per held-out row ({len(held)}); got shape {np.shape(groups)}"
        )
    x_held = np.asarray(x[held])
    y_held = np.asarray(y[held], dtype=np.float64)
    val_rows = np.arange(num_train, seen)

    points = []
    for size in sizes:
        raw["data"]["num_train"] = size
        raw["data"]["num_val"] = num_val
        raw["cfg"]["batch_size"] = min(int(base["cfg"]["batch_size"]), size)
        config_n = load_config(None, raw)
        rows = np.concatenate([np.arange(size), val_rows])
        source = ArraySource(np.asarray(x[rows]), np.asarray(y[rows]))
        start = time.perf_counter()
        fit = compute_datamodels(config_n, source=source)
        seconds = time.perf_counter() - start
        evaluation = evaluate(predict(fit.result.seed_dict(), x_held), y_held, groups=groups)
        logger.info(
            "LDS curve: %d training models -> LDS %.4f, Pearson %.4f, R^2 %.4f (fit %.1f s)",
            size,
            evaluation.lds,
            evaluation.pearson,
            evaluation.r2,
            seconds,
        )
        points.append(
            CurvePoint(
                n_train=size,
                n_models_used=size + num_val if fit.result.refit else size,
                lds=evaluation.lds,
                pearson=evaluation.pearson,
                r2=evaluation.r2,
                seconds=seconds,
                evaluation=evaluation,
            )
        )
    return points
