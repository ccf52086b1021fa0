"""Held-out LDS against the number of models trained, budget-honestly (:func:`lds_curve`).

A point ``N`` of the curve uses exactly ``N`` trained models and nothing else: rows ``[0, N)``
of the fit's models choose each target's lambda by K-fold cross-validation inside them
(:func:`~dm_assets.regression.cross_validation.cross_validated_lasso`), the datamodels are
refitted on all ``N`` at those lambdas and scored on the same held-out models as every other
point. So the curve answers "what does training ``N`` models buy?", and its slope per doubling
of ``N`` (with a paired bootstrap interval) answers "is training more models worth it?".

Also here: :func:`grid_end_warning` and :func:`lambda_at_grid_ends`, the fraction of targets
whose chosen lambda sits at an end of the grid (the main fit's too).

Imports neither dagster nor mlflow; torch and the solvers only when a curve is fitted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dm_assets.evaluation.metrics import Evaluation, predict
from dm_assets.evaluation.uncertainty import (
    HeldOutScores,
    basic_interval,
    bootstrap_lds,
    score_held_out,
)

if TYPE_CHECKING:
    from dm_assets.regression.config import RegressionConfig
    from dm_assets.regression.cross_validation import CrossValidatedLasso

logger = logging.getLogger(__name__)

LEVEL = 0.95
"""Coverage of the slope intervals (the held-out scores' intervals use the same)."""
X_LABEL = "models trained (N; lambda chosen by {folds}-fold inside them)"
"""The curve's x axis: every model a point used, for fitting and choosing lambda alike."""


def _json_float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _json_pair(pair: tuple[float, float] | None) -> list[float | None] | None:
    return None if pair is None else [_json_float(pair[0]), _json_float(pair[1])]


@dataclass(frozen=True, eq=False)
class CurvePoint:
    """One point of the curve: datamodels fitted on ``n_models`` trained models (rows
    ``[0, n_models)``; every one of them used, to fit and to choose lambda by K-fold).

    ``lds`` (mean over targets of the held-out Spearman correlation) with ``lds_ci`` its 95%
    bootstrap interval over held-out masks (None without resamples), ``pearson``, ``r2``
    (means over targets), ``seconds`` the wall time of the fit (statistics, K-fold paths and
    refit; not the scoring), ``lambda_at_max`` / ``lambda_at_min`` the fractions of targets
    whose chosen lambda is the grid's largest (``lambda_max``: all weights zero, a constant
    prediction) / smallest (``eps * lambda_max``), ``evaluation`` the point estimates per
    target, ``scores`` the held-out scores with intervals, ``fit`` the refitted datamodels.
    """

    n_models: int
    lds: float
    lds_ci: tuple[float, float] | None
    pearson: float
    r2: float
    seconds: float
    lambda_at_max: float
    lambda_at_min: float
    evaluation: Evaluation = field(repr=False)
    scores: HeldOutScores | None = field(default=None, repr=False)
    fit: CrossValidatedLasso | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``n_models`` int; ``lds``, ``pearson``, ``r2``, ``seconds``,
        ``lambda_at_max``, ``lambda_at_min`` float (null where not finite); ``lds_ci``
        ``[lo, hi]`` or null."""
        return {
            "n_models": self.n_models,
            "lds": _json_float(self.lds),
            "lds_ci": _json_pair(self.lds_ci),
            "pearson": _json_float(self.pearson),
            "r2": _json_float(self.r2),
            "seconds": _json_float(self.seconds),
            "lambda_at_max": _json_float(self.lambda_at_max),
            "lambda_at_min": _json_float(self.lambda_at_min),
        }


@dataclass(frozen=True)
class CurveSlope:
    """The LDS gained per doubling of the models trained between two consecutive points:
    ``gain_per_doubling = (lds(n_to) - lds(n_from)) / log2(n_to / n_from)``, with ``ci`` its
    95% interval from the paired bootstrap (both points scored on the same resamples of
    held-out masks; None without resamples)."""

    n_from: int
    n_to: int
    gain_per_doubling: float
    ci: tuple[float, float] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``n_from``, ``n_to`` int, ``gain_per_doubling`` float, ``ci`` ``[lo,
        hi]`` or null."""
        return {
            "n_from": self.n_from,
            "n_to": self.n_to,
            "gain_per_doubling": _json_float(self.gain_per_doubling),
            "ci": _json_pair(self.ci),
        }


@dataclass(frozen=True, eq=False)
class LdsCurve:
    """The budget-honest LDS curve: ``points`` in increasing ``n_models``, ``slopes`` between
    consecutive points, ``stops_paying_at`` the smallest ``N`` from which doubling the models
    trained is not shown to help (the first slope whose interval includes 0: its ``n_from``;
    None when every interval excludes 0 or there are no intervals). ``folds`` K of the lambda
    choice; ``resamples``, ``seed``, ``level`` of the bootstrap over held-out masks."""

    points: list[CurvePoint]
    slopes: list[CurveSlope]
    stops_paying_at: int | None
    folds: int
    resamples: int
    seed: int
    level: float = LEVEL

    @property
    def x_label(self) -> str:
        """The x axis: ``models trained (N; lambda chosen by K-fold inside them)``."""
        return X_LABEL.format(folds=self.folds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``points`` and ``slopes`` (lists of their ``to_dict``),
        ``stops_paying_at`` int or null, ``folds`` int, ``x_label`` str, ``bootstrap``
        ``{resamples, level, seed, unit: "held-out masks"}``."""
        return {
            "points": [p.to_dict() for p in self.points],
            "slopes": [s.to_dict() for s in self.slopes],
            "stops_paying_at": self.stops_paying_at,
            "folds": self.folds,
            "x_label": self.x_label,
            "bootstrap": {
                "resamples": self.resamples,
                "level": self.level,
                "seed": self.seed,
                "unit": "held-out masks",
            },
        }


# ------------------------------------------------------------------ ends of the lambda grid


def _grid_end_fractions(chosen_index: np.ndarray, k: int) -> tuple[float, float]:
    """``(at_max, at_min)``: fractions of ``chosen_index`` equal to 0 and to ``k - 1`` (both 0
    for ``k == 1``, where nothing was chosen)."""
    chosen = np.asarray(chosen_index).ravel()
    if chosen.size == 0 or k < 2:
        return 0.0, 0.0
    return float(np.mean(chosen == 0)), float(np.mean(chosen == k - 1))


def _grid_end_message(at_max: float, at_min: float, t: int, where: str) -> str | None:
    parts = []
    if at_max > 0:
        parts.append(
            f"{100 * at_max:.1f}% of targets ({round(at_max * t)} of {t}) chose the grid's "
            f"largest lambda (lambda_max) {where}: all their weights are zero, so they predict "
            "a constant (their LDS counts as 0); no smaller lambda predicted the models that "
            "chose it better (more models, or a less noisy output, may help)"
        )
    if at_min > 0:
        parts.append(
            f"{100 * at_min:.1f}% of targets ({round(at_min * t)} of {t}) chose the grid's "
            f"smallest lambda (eps * lambda_max) {where}: their best lambda may lie below the "
            "grid; extend the grid down (lower cfg.eps)"
        )
    return "; ".join(parts) or None


def grid_end_warning(chosen_index: np.ndarray | Sequence[int], k: int, where: str) -> str | None:
    """The warning for targets whose chosen lambda is at an end of the grid, or None.

    Parameters
    ----------
    chosen_index : int array-like, shape (t,)
        Each target's chosen position on its grid (0: ``lambda_max``, ``k - 1``: ``eps *
        lambda_max``), e.g. ``CrossValidatedLasso.chosen_index`` or
        ``LassoPathResult.best_step``.
    k : int
        Lambdas on each grid (``cfg.k``; with ``k == 1`` nothing was chosen: None).
    where : str
        Where the choice was made, inserted in the message: ``"at N=250"``, ``"in the main
        fit"``.

    Returns
    -------
    str or None
        One sentence per end that some target chose, with the fraction and count of targets
        and what it means (``lambda_max``: all-zero weights, a constant prediction; the
        smallest lambda: extend the grid down by lowering ``cfg.eps``); None when no target
        chose an end.
    """
    chosen = np.asarray(chosen_index).ravel()
    at_max, at_min = _grid_end_fractions(chosen, k)
    return _grid_end_message(at_max, at_min, int(chosen.size), where)


def lambda_at_grid_ends(
    weights_or_result: Mapping[str, Any] | Any, *, eps: float | None = None
) -> tuple[float, float] | None:
    """``(at_max, at_min)``: the fractions of targets whose chosen lambda is the grid's largest
    (``lambda_max``) and smallest (``eps * lambda_max``), for a fit in any of its forms.

    ``weights_or_result`` is one of:

    * a :class:`~dm_assets.regression.cross_validation.CrossValidatedLasso` (its
      ``chosen_index`` and grid),
    * a :class:`~dm_assets.regression.path.LassoPathResult` (its ``best_step`` on its ``k``
      lambdas; a target stopped early never reached the smallest),
    * the dict saved as ``datamodels.pt`` (``lam``, ``lam_max`` per target; ``eps`` is then
      required, the fit's ``cfg.eps``): ``lam == lam_max`` is the top, ``lam == eps *
      lam_max`` (relative tolerance ``1e-4``, the values are float32) the bottom; a target with
      ``lam_max == 0`` (constant output) counts at the top.

    Returns None for a mapping without ``lam`` and ``lam_max`` (files written before either
    existed): the choice is then not recorded.
    """
    if hasattr(weights_or_result, "chosen_index") and hasattr(weights_or_result, "lambdas"):
        return _grid_end_fractions(
            _numpy(weights_or_result.chosen_index), int(weights_or_result.lambdas.shape[1])
        )
    if hasattr(weights_or_result, "best_step") and hasattr(weights_or_result, "lambdas"):
        return _grid_end_fractions(
            _numpy(weights_or_result.best_step), int(weights_or_result.lambdas.shape[1])
        )
    if not isinstance(weights_or_result, Mapping):
        raise TypeError(
            "lambda_at_grid_ends takes a CrossValidatedLasso, a LassoPathResult or the "
            f"datamodels.pt dict; got {type(weights_or_result).__name__}"
        )
    if "lam" not in weights_or_result or "lam_max" not in weights_or_result:
        return None
    if eps is None or not 0 < eps <= 1:
        raise ValueError(
            f"eps={eps!r}: pass the fit's cfg.eps (in (0, 1]) to find the grid's smallest "
            "lambda from the datamodels.pt dict"
        )
    lam = _numpy(weights_or_result["lam"]).astype(np.float64).ravel()
    lam_max = _numpy(weights_or_result["lam_max"]).astype(np.float64).ravel()
    if lam.size == 0:
        return 0.0, 0.0
    zero = lam_max <= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(zero, 1.0, lam / np.where(zero, 1.0, lam_max))
    at_max = np.isclose(ratio, 1.0, rtol=1e-4, atol=0.0)
    at_min = np.isclose(ratio, eps, rtol=1e-4, atol=0.0) & ~at_max
    return float(at_max.mean()), float(at_min.mean())


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


# ------------------------------------------------------------------------------- the curve


def _held_out_rows(held_out: slice | Sequence[int] | np.ndarray, n: int, fitted: int) -> np.ndarray:
    """The held-out row positions as int64 ``(h,)``; ValueError naming what is wrong."""
    if isinstance(held_out, slice):
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
            f"models, the first {fitted} of which are the fit's)"
        )
    if rows.min() < fitted:
        raise ValueError(
            f"held_out includes rows below the {fitted} fitted models (e.g. {rows.min()}), "
            f"models the curve fits on: hold out rows from {fitted} on"
        )
    return rows


def _check_sizes(sizes: Sequence[int], folds: int, fitted: int) -> list[str]:
    problems = []
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        problems.append(f"folds={folds!r}: choosing lambda by K-fold needs an integer K >= 2")
        folds = 2
    if not sizes:
        problems.append("sizes is empty: give the numbers of trained models N per point")
    if list(sizes) != sorted(set(sizes)):
        problems.append(f"sizes={list(sizes)} must be increasing, each size once")
    small = [s for s in sizes if s < 2 * folds]
    if small:
        problems.append(
            f"sizes {small} are below 2 * folds = {2 * folds}: every fold needs at least 2 "
            "models; drop them or use fewer folds"
        )
    large = [s for s in sizes if s > fitted]
    if large:
        problems.append(
            f"sizes {large} exceed the {fitted} fitted models (num_train + num_val): drop them "
            "or train and fit more models"
        )
    return problems


def lds_curve(
    x: np.ndarray,
    y: np.ndarray,
    *,
    config: RegressionConfig,
    sizes: Sequence[int],
    folds: int = 5,
    held_out: slice | Sequence[int] | np.ndarray,
    groups: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
    fitted: int | None = None,
) -> LdsCurve:
    """Held-out LDS against ``N``, the number of models trained, each point using exactly
    rows ``[0, N)``.

    For each ``N`` in ``sizes``: each target's lambda is chosen by ``folds``-fold
    cross-validation inside rows ``[0, N)`` (a permutation seeded by ``data.seed`` cuts them
    into folds; grid ``cfg.k``, ``cfg.eps`` from those rows' ``lambda_max``), the datamodels
    are refitted on all ``N`` at the chosen lambdas
    (:func:`~dm_assets.regression.cross_validation.cross_validated_lasso`), predict the
    held-out rows (:func:`~dm_assets.evaluation.metrics.predict`) and are scored with
    intervals (:func:`~dm_assets.evaluation.uncertainty.score_held_out`). Consecutive points
    give the gain per doubling ``(lds_to - lds_from) / log2(n_to / n_from)``, with the
    interval of its paired bootstrap (:func:`~dm_assets.evaluation.uncertainty.bootstrap_lds`
    over all points' predictions on the same resamples of held-out masks; the basic bootstrap
    interval ``[2 g - q_hi, 2 g - q_lo]``, as the held-out scores use). A WARNING is logged
    per point where some targets chose an end of the grid (:func:`grid_end_warning`).

    Parameters
    ----------
    x : array, shape (n_models, p)
        Bool or 0/1 masks: the fit's models in the fit's row order (training then
        validation rows: rows ``[0, fitted)``), then models the fit never used, among them the
        held-out ones. A memory map is read in batches.
    y : array, shape (n_models, t) or (n_models,)
        The models' outputs on the targets fitted (apply any target slice first).
    config : RegressionConfig
        ``cfg`` (``k``, ``eps``, ``use_bias``, ``batch_size``, ``tol``, ``max_iter``,
        ``device``) and ``data.seed`` of the fits (:func:`~dm_assets.regression.
        cross_validation.lasso_cv_options`); ``data.num_train + data.num_val`` is the default
        ``fitted``. Cross-validation always runs on sufficient statistics (``cfg.solver`` does
        not apply).
    sizes : sequence of int
        The ``N`` of each point, increasing, each in ``[2 * folds, fitted]``.
    folds : int
        K of the lambda choice, at least 2.
    held_out : slice or int array
        The rows scored (at least 3), all at or after ``fitted``.
    groups : int array, shape (len(held_out),), optional
        Same id = same mask among the held-out rows
        (:func:`~dm_assets.evaluation.ceiling.group_identical_masks`): the bootstrap's
        resampling unit, and the noise ceiling of each point's scores.
    resamples : int
        Bootstrap resamples of held-out masks (0: no intervals and no ``stops_paying_at``).
    seed : int
        Seed of the bootstrap's resamples (the same for every point: paired).
    fitted : int, optional
        The number of leading rows that are the fit's models (default ``data.num_train +
        data.num_val`` of ``config``).

    Returns
    -------
    LdsCurve

    Raises
    ------
    ValueError
        Every problem with the shapes, ``sizes``, ``folds``, ``held_out`` or ``groups`` at once
        (sizes above the fitted models, below ``2 * folds``, not increasing).
    """
    from dm_assets.regression.cross_validation import cross_validated_lasso, lasso_cv_options

    if fitted is None:
        fitted = int(config["data"]["num_train"]) + int(config["data"]["num_val"])
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be (n_models, p) masks; got shape {getattr(x, 'shape', None)}")
    y = np.asarray(y) if not hasattr(y, "ndim") else y
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must be (n_models, t) with one row per row of x ({x.shape[0]}); got {y.shape}"
        )
    n = int(x.shape[0])
    if n <= fitted:
        raise ValueError(
            f"x has {n} models but the fit's are the first {fitted}: no model is left to hold out"
        )
    sizes = [int(s) for s in sizes]
    problems = _check_sizes(sizes, folds, fitted)
    if problems:
        raise ValueError("invalid LDS curve:\n" + "\n".join(f"  - {m}" for m in problems))
    held = _held_out_rows(held_out, n, fitted)
    if groups is not None and np.shape(groups) != (len(held),):
        raise ValueError(
            f"groups must give one id per held-out row ({len(held)}); got shape {np.shape(groups)}"
        )
    options = lasso_cv_options(config)
    x_held = np.asarray(x[held])
    y_held = np.asarray(y[held], dtype=np.float64)

    points: list[CurvePoint] = []
    predictions: list[np.ndarray] = []
    for size in sizes:
        start = time.perf_counter()
        fit = cross_validated_lasso(x[:size], y[:size], folds=folds, **options)
        seconds = time.perf_counter() - start
        predicted = predict(fit.seed_dict(), x_held)
        scores = score_held_out(predicted, y_held, groups=groups, resamples=resamples, seed=seed)
        at_max, at_min = _grid_end_fractions(fit.chosen_index.numpy(), fit.k)
        message = _grid_end_message(at_max, at_min, fit.n_targets, f"at N={size}")
        if message:
            logger.warning("LDS curve: %s", message)
        logger.info(
            "LDS curve: N=%d models (lambda by %d-fold) -> LDS %.4f, Pearson %.4f (fit %.1f s)",
            size,
            folds,
            scores.lds,
            scores.evaluation.pearson,
            seconds,
        )
        predictions.append(predicted)
        points.append(
            CurvePoint(
                n_models=size,
                lds=scores.lds,
                lds_ci=scores.lds_ci,
                pearson=scores.evaluation.pearson,
                r2=scores.evaluation.r2,
                seconds=seconds,
                lambda_at_max=at_max,
                lambda_at_min=at_min,
                evaluation=scores.evaluation,
                scores=scores,
                fit=fit,
            )
        )
    draws = None
    if resamples and len(points) > 1:
        draws = bootstrap_lds(predictions, y_held, groups=groups, resamples=resamples, seed=seed)
    slopes = _slopes(points, draws)
    stops = next((s.n_from for s in slopes if s.ci is not None and s.ci[0] <= 0 <= s.ci[1]), None)
    return LdsCurve(
        points=points,
        slopes=slopes,
        stops_paying_at=stops,
        folds=int(folds),
        resamples=int(resamples),
        seed=int(seed),
    )


def _slopes(points: Sequence[CurvePoint], draws: np.ndarray | None) -> list[CurveSlope]:
    """The gain per doubling between consecutive points, with the basic bootstrap interval
    from ``draws`` (float ``(len(points), resamples)``: each point's LDS on the same
    resamples; None: no intervals)."""
    slopes = []
    for i in range(len(points) - 1):
        a, b = points[i], points[i + 1]
        doublings = math.log2(b.n_models / a.n_models)
        gain = (b.lds - a.lds) / doublings
        ci = None
        if draws is not None:
            ci = basic_interval(gain, (draws[i + 1] - draws[i]) / doublings, LEVEL)
        slopes.append(CurveSlope(a.n_models, b.n_models, float(gain), ci))
    return slopes
