r"""LDS, noise ceiling and their ratio with bootstrap intervals over held-out masks, against two
ground truths: one model's output and the mean of the ``k`` seeds trained on a mask.

Held-out model ``i`` (of ``n``) was trained on mask ``m_i``; several models may share a mask
(replicates: the same training set, other seeds), and ``groups`` (int ``(n,)``, same id = same
mask, :func:`~dm_assets.evaluation.ceiling.group_identical_masks`) says which. The point
estimates are those of :func:`~dm_assets.evaluation.metrics.evaluate` (LDS = mean over targets
of ``Spearman(yhat_:j, y_:j)``; the noise ceiling of :mod:`~dm_assets.evaluation.ceiling`).

**Two ground truths.**

* *One model's output* (``single``): every held-out model against its own output, the LDS of
  Ilyas et al. (2022). Its noise ceiling is
  :func:`~dm_assets.evaluation.ceiling.estimate_noise_ceiling`'s.
* *Mean of k seeds' outputs* (``mean_of_seeds``): one row per replicated mask ``g`` (``k_g >=
  2`` models; masks with one model are left out), the prediction ``mean_{i in g} yhat_ij``
  (the same for every model of a mask) against ``ybar_gj = mean_{i in g} y_ij``. Averaging
  seeds removes part of the training noise, so the LDS and its ceiling are higher. The
  ceiling per target is the one-model ceiling with the reliability of a ``k``-seed mean
  (Spearman-Brown, :func:`~dm_assets.evaluation.ceiling.ceiling_of_mean`)::

      rho_k = k rho / (1 + (k - 1) rho),   ceiling_j = (6 / pi) arcsin(sqrt(rho_k_j) / 2)

  with ``rho_j`` the one-model reliability (ANOVA in normal scores, over all held-out models)
  and ``k`` the harmonic mean of the replicated masks' sizes (the average noise variance of a
  mask mean is ``sigma^2 mean_g(1 / k_g)``); averaged over targets.

**Intervals.** Bootstrap (level ``level``, default 95%) with held-out *masks* as the
resampling unit: each resample draws ``G`` masks with replacement from the ``G`` distinct
masks, and every model of a drawn mask comes along (a cluster bootstrap: replicates of a mask
share its draw, so they are not counted as independent evidence). A mask drawn twice counts as
two masks, both in the ranks (its models appear twice) and in the ceiling's ANOVA (two groups).
On each resample every statistic is recomputed exactly as for the point estimate: the per-target
Spearman correlations with average ranks of the resampled rows (ties, such as the predictions
shared by one mask's models, get average ranks), the ANOVA reliability of the resampled normal
scores, the ceiling, and the ratio ``LDS / ceiling`` of the same resample (so the ratio's
interval accounts for their correlation). The mean-of-seeds truth uses the same draws,
restricted to the replicated masks. With ``q_a`` the ``a``-quantile of the resampled values
``theta*`` and ``theta`` the estimate, the interval is the *basic* (reverse percentile) one::

    [2 theta - q_{(1 + level) / 2},  2 theta - q_{(1 - level) / 2}]

i.e. the percentile interval reflected about the estimate, which removes the bootstrap's
estimate of the bias. Why not the plain percentile interval: the LDS and the ceiling of ``G``
masks are biased low by O(1/G) (Spearman correlations and a square root of a noisy
reliability), and resamples of the sample repeat that bias once more, so the percentile
interval sits about two biases below the population value. In simulation (40 examples,
Gaussian training noise, a fixed predictor; 100 held-out samples of 100 masks x 4 seeds, 40
targets) percentile intervals covered the population LDS in 81%, the ceiling in 30% and the
mean-of-seeds ceiling in 16% of the samples; basic intervals in 95%, 96% and 98% (the tests
repeat a smaller version). With many targets the interval can therefore lie entirely above the
point estimate: that is the bias, not an error. Resamples where a statistic is undefined (no
replicated mask drawn, fewer than three rows) are left out of its quantiles; intervals are
clipped to the statistic's range ([-1, 1] for the LDS, [0, 1] for the ceiling).

Assumptions and scope:

* The targets are fixed, not resampled: the interval describes the uncertainty from the finite
  set of held-out models and masks (the population of masks and seeds the held-out models
  were drawn from), for *these* targets. It does not describe how the LDS would vary over
  another choice of targets.
* Held-out masks are independent draws from the mask distribution and seeds independent given
  the mask (the design of the experiments: random masks, per-model seeds).
* Basic intervals assume the bootstrap distribution of ``theta* - theta`` mimics that of
  ``theta - population value`` (bias and spread); with few masks (under ~30) they run short.
  For the ceilings the resamples' extra ties (a mask drawn twice) make the bootstrap bias
  somewhat larger than the estimate's, so the correction overshoots a little (coverage ~90%
  with 40 masks in simulation). See
  :func:`~dm_assets.evaluation.ceiling.estimate_noise_ceiling` for the ceiling's own model
  assumptions (Gaussian signal plus mask-independent noise in some increasing
  transform of the output).
* The mean-of-seeds ceiling further assumes that averaging raw outputs acts like averaging
  their normal scores (the transform is close to linear over one mask's seeds).

**Computation.** Each column is sorted once; for a resample the rows carry their multiplicity
``w_i`` (draws of their mask) and the average rank of row ``i`` is ``W_<(i) + (W_=(i) + 1) / 2``
(``W_<`` the total multiplicity of strictly smaller values, ``W_=`` of its tie block), read off
the cumulative sums of the multiplicities in sorted order. The Spearman correlation is then the
multiplicity-weighted Pearson correlation of these ranks, which equals the correlation over the
materialized resample; the sums are exact integers (in doubled ranks). Normal scores come
from a per-resample table of ``Phi^-1``. One compiled pass per resample and target computes
the ranks, every predictor's correlation and the reliability (:func:`_resample_scores`; it
replaced array expressions over ``(resamples, targets, models)`` blocks that were 3 times
slower). The cost is ``O(resamples * n * t)``; the sort orders are held for blocks of targets
(:data:`BLOCK_VALUES`).

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from scipy.special import ndtri

from dm_assets.evaluation.ceiling import ceiling_of_mean, index_groups
from dm_assets.evaluation.columns import as_matrix
from dm_assets.evaluation.metrics import Evaluation, evaluate

logger = logging.getLogger(__name__)

# About this many (predictors + 1) x models x targets values per block of targets: the sort
# orders of a block are five int64 arrays of that size (80 MB at most).
BLOCK_VALUES = 2**21

ONE_MODEL = "one model's output"
RESAMPLING_UNIT = "held-out masks"


def basic_interval(
    estimate: float,
    draws: np.ndarray,
    level: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> tuple[float, float] | None:
    """The basic bootstrap interval ``[2 est - q_{(1+level)/2}, 2 est - q_{(1-level)/2}]`` of a
    statistic with point estimate ``estimate`` and values ``draws`` (any shape) on the
    resamples (the intervals of :func:`score_held_out`; see the module docstring for why not
    the percentile interval). Non-finite draws are left out; ``None`` when none is left or
    the estimate is not finite. ``bounds``: the statistic's range, to clip to.

    For a function of several LDS, such as a curve's slope per doubling from
    :func:`bootstrap_lds`, pass the function of the point estimates and its values on the
    rows of the resamples (paired, so their correlation is accounted for)."""
    finite = np.asarray(draws, dtype=np.float64).ravel()
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or not math.isfinite(estimate):
        return None
    q_lo, q_hi = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    lo, hi = 2.0 * estimate - q_hi, 2.0 * estimate - q_lo
    if bounds is not None:
        lo, hi = min(max(lo, bounds[0]), bounds[1]), min(max(hi, bounds[0]), bounds[1])
    return float(lo), float(hi)


def _json_float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _json_pair(pair: tuple[float, float] | None) -> list[float | None] | None:
    return None if pair is None else [_json_float(pair[0]), _json_float(pair[1])]


def _ratio(lds: float, ceiling: float | None) -> float | None:
    if ceiling is None or not ceiling > 0:
        return None
    return lds / ceiling


@dataclass(frozen=True, eq=False)
class TruthScores:
    """Scores against one ground truth (see the module docstring).

    ``ground_truth``: ``"one model's output"`` or ``"mean of k seeds' outputs"``. ``lds`` (mean
    over targets of the Spearman correlation), ``noise_ceiling`` (``None`` without replicated
    masks) and ``lds_over_ceiling`` (``None`` without a positive ceiling), each with its
    basic bootstrap interval ``(lo, hi)`` (``None`` when ``resamples == 0`` or the
    statistic has none). ``models``: rows scored (held-out models, or replicated masks for the
    mean truth); ``masks``: distinct masks among them.
    """

    ground_truth: str
    lds: float
    lds_ci: tuple[float, float] | None
    noise_ceiling: float | None
    noise_ceiling_ci: tuple[float, float] | None
    lds_over_ceiling: float | None
    lds_over_ceiling_ci: tuple[float, float] | None
    models: int
    masks: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: intervals as ``[lo, hi]`` lists; ``None`` (and NaN, as ``None``) kept."""
        return {
            "ground_truth": self.ground_truth,
            "lds": _json_float(self.lds),
            "lds_ci": _json_pair(self.lds_ci),
            "noise_ceiling": _json_float(self.noise_ceiling),
            "noise_ceiling_ci": _json_pair(self.noise_ceiling_ci),
            "lds_over_ceiling": _json_float(self.lds_over_ceiling),
            "lds_over_ceiling_ci": _json_pair(self.lds_over_ceiling_ci),
            "models": self.models,
            "masks": self.masks,
        }


@dataclass(frozen=True, eq=False)
class HeldOutScores:
    """Held-out scores with intervals (:func:`score_held_out`).

    ``evaluation``: the point estimates of :func:`~dm_assets.evaluation.metrics.evaluate`
    (per-target arrays, Pearson, R^2). ``single``: every held-out model against its own
    output; ``mean_of_seeds``: each replicated mask's prediction against the mean of its
    models' outputs (``None`` with fewer than three replicated masks). ``seeds``: the number
    ``k`` of models per replicated mask (the rounded harmonic mean when they differ; ``None``
    without replicates). ``targets``, and the bootstrap's ``resamples``, ``level``, ``seed``.
    The properties ``lds``, ``lds_ci``, ... are the single truth's.
    """

    evaluation: Evaluation
    single: TruthScores
    mean_of_seeds: TruthScores | None
    seeds: int | None
    targets: int
    resamples: int
    level: float
    seed: int

    @property
    def lds(self) -> float:
        return self.single.lds

    @property
    def lds_ci(self) -> tuple[float, float] | None:
        return self.single.lds_ci

    @property
    def noise_ceiling(self) -> float | None:
        return self.single.noise_ceiling

    @property
    def noise_ceiling_ci(self) -> tuple[float, float] | None:
        return self.single.noise_ceiling_ci

    @property
    def lds_over_ceiling(self) -> float | None:
        return self.single.lds_over_ceiling

    @property
    def lds_over_ceiling_ci(self) -> tuple[float, float] | None:
        return self.single.lds_over_ceiling_ci

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the single truth's ``lds``, ``ci`` (its interval), ``noise_ceiling``,
        ``noise_ceiling_ci``, ``lds_over_ceiling``, ``lds_over_ceiling_ci``, ``ground_truth``;
        ``held_out_models``, ``masks``, ``targets``, ``seeds``; ``pearson``, ``r2``,
        ``n_constant_targets``, ``n_constant_predictions`` (point estimates);
        ``mean_of_seeds`` (:meth:`TruthScores.to_dict` or ``None``) and ``bootstrap``
        (``resamples``, ``level``, ``seed``, ``unit``). NaN becomes ``None``."""
        single = self.single
        return {
            "lds": _json_float(single.lds),
            "ci": _json_pair(single.lds_ci),
            "noise_ceiling": _json_float(single.noise_ceiling),
            "noise_ceiling_ci": _json_pair(single.noise_ceiling_ci),
            "lds_over_ceiling": _json_float(single.lds_over_ceiling),
            "lds_over_ceiling_ci": _json_pair(single.lds_over_ceiling_ci),
            "ground_truth": single.ground_truth,
            "held_out_models": single.models,
            "masks": single.masks,
            "targets": self.targets,
            "seeds": self.seeds,
            "pearson": _json_float(self.evaluation.pearson),
            "r2": _json_float(self.evaluation.r2),
            "n_constant_targets": self.evaluation.n_constant_targets,
            "n_constant_predictions": self.evaluation.n_constant_predictions,
            "mean_of_seeds": None if self.mean_of_seeds is None else self.mean_of_seeds.to_dict(),
            "bootstrap": {
                "resamples": self.resamples,
                "level": self.level,
                "seed": self.seed,
                "unit": RESAMPLING_UNIT,
            },
        }


def resample_masks(n_masks: int, resamples: int, seed: int) -> np.ndarray:
    """How often each mask is drawn in each resample, int64 ``(resamples, n_masks)``: every
    resample draws ``n_masks`` masks uniformly with replacement (rows sum to ``n_masks``), from
    ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_masks, size=(resamples, n_masks))
    offsets = (np.arange(resamples) * n_masks)[:, None]
    flat = np.bincount((draws + offsets).ravel(), minlength=resamples * n_masks)
    return flat.reshape(resamples, n_masks).astype(np.int64)


class _SortedUnits:
    """The sort order and tie blocks of ``values`` float ``(c, U)`` (a row per target, an entry
    per unit: a held-out model, or a mask whose models share the value), from which
    :func:`_ranks_into` reads the average ranks of any resample of the masks.

    ``unit_group`` int ``(U,)``: the mask of each unit; ``unit_size`` int ``(U,)``: the models
    it stands for (each takes the unit's rank)."""

    def __init__(self, values: np.ndarray, unit_group: np.ndarray, unit_size: np.ndarray) -> None:
        c, u = values.shape
        self.u = u
        order = np.argsort(values, axis=1, kind="stable")
        ordered = np.take_along_axis(values, order, axis=1)
        self.group_sorted = np.ascontiguousarray(unit_group[order], dtype=np.int64)
        self.sizes = np.ascontiguousarray(unit_size[order], dtype=np.int64)
        starts = np.ones((c, u), dtype=bool)
        starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        ends = np.ones((c, u), dtype=bool)
        ends[:, :-1] = starts[:, 1:]
        spot = np.arange(u)[None, :]
        # each sorted position's tie block: its first position, and one past its last
        first = np.maximum.accumulate(np.where(starts, spot, 0), axis=1)
        past = np.minimum.accumulate(np.where(ends, spot + 1, u)[:, ::-1], axis=1)[:, ::-1]
        self.order = np.ascontiguousarray(order, dtype=np.int64)
        self.first = np.ascontiguousarray(first, dtype=np.int64)
        self.past = np.ascontiguousarray(past, dtype=np.int64)


@numba.njit(cache=True, nogil=True)
def _ranks_into(
    weight: np.ndarray,
    group_sorted: np.ndarray,
    sizes: np.ndarray,
    order: np.ndarray,
    first: np.ndarray,
    past: np.ndarray,
    cum: np.ndarray,
    out: np.ndarray,
) -> None:
    """``2 r - 1`` of each unit of one column into ``out[:U]`` (unit order) for the mask
    multiplicities ``weight`` ``(G,)``, from the column's sorted units (rows of
    :class:`_SortedUnits`' arrays); ``cum`` is scratch of at least ``U + 1`` int64. With
    ``cum`` the cumulative multiplicity in sorted order (0 first), ``2 r - 1 = 2 W_< + W_= =
    cum[first] + cum[past]`` over the unit's tie block (for an untied unit ``cum[s] +
    cum[s + 1]``). Units drawn 0 times get a finite rank (weighted by 0 wherever used). Exact
    integers."""
    u = order.shape[0]
    cum[0] = 0
    for s in range(u):
        cum[s + 1] = cum[s] + weight[group_sorted[s]] * sizes[s]
    for s in range(u):
        out[order[s]] = cum[first[s]] + cum[past[s]]


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _resample_scores(
    counts: np.ndarray,
    inverse: np.ndarray,
    mask_sizes: np.ndarray,
    a_group: np.ndarray,
    a_size: np.ndarray,
    a_order: np.ndarray,
    a_first: np.ndarray,
    a_past: np.ndarray,
    p_group: np.ndarray,
    p_size: np.ndarray,
    p_order: np.ndarray,
    p_first: np.ndarray,
    p_past: np.ndarray,
    p_units: np.ndarray,
    table: np.ndarray,
    lds: np.ndarray,
    rho: np.ndarray,
) -> None:
    """Every resample's per-target LDS of each predictor and, when ``table`` has rows, the
    reliability of the outputs (the module doc's computation), in one pass per resample and
    target with no temporaries larger than a column.

    ``counts`` int64 ``(R, G)``: draws of each mask; ``inverse`` ``(n,)``: the mask of each
    model; ``mask_sizes`` ``(G,)``. ``a_*`` ``(c, n)``: the outputs' :class:`_SortedUnits`
    (one unit per model); ``p_*`` ``(P, c, n)``: each predictor's, its first ``p_units[k]``
    units used (``n``: a unit per model; ``G``: a unit per mask, ``p_group`` the mask).
    ``table`` float64 ``(R, span)``: ``Phi^-1`` of the normal scores by ``2 r - 1`` per
    resample (``(0, 0)``: no reliability). Out: ``lds`` float64 ``(P, R, c)`` and ``rho``
    ``(R, c)`` (untouched without a table), NaN where undefined.

    The rank sums are exact integers in the doubled ranks ``d = 2 r``: with ``N`` the
    resample's models and ``4 N m^2 = N (N + 1)^2``, ``4 cov = sum w d_p d_a - N (N + 1)^2``
    and the same for the variances; a predictor with a unit per mask pairs its ranks with the
    sum of ``d_a`` over the mask's models.
    """
    n_resamples, n_masks = counts.shape
    c, n = a_order.shape
    n_predictors = p_units.shape[0]
    with_table = table.shape[0] > 0
    for b in numba.prange(n_resamples):
        weight = counts[b]
        total = 0
        drawn_squares = 0
        for g in range(n_masks):
            total += weight[g] * mask_sizes[g]
            drawn_squares += weight[g] * mask_sizes[g] * mask_sizes[g]
        centre = total * (total + 1) * (total + 1)  # 4 N m^2
        cum = np.empty(n + 1, dtype=np.int64)
        d_a = np.empty(n, dtype=np.int64)
        d_p = np.empty(n, dtype=np.int64)
        mask_a = np.empty(n_masks, dtype=np.int64)
        z_sum = np.empty(n_masks)
        z_squares = np.empty(n_masks)
        for j in range(c):
            _ranks_into(weight, a_group[j], a_size[j], a_order[j], a_first[j], a_past[j], cum, d_a)
            var_a = -centre
            mask_a[:] = 0
            for i in range(n):
                d = d_a[i] + 1  # 2 r
                d_a[i] = d
                var_a += weight[inverse[i]] * d * d
                mask_a[inverse[i]] += d
            for k in range(n_predictors):
                units = p_units[k]
                _ranks_into(
                    weight, p_group[k, j, :units], p_size[k, j, :units], p_order[k, j, :units],
                    p_first[k, j, :units], p_past[k, j, :units], cum, d_p,
                )  # fmt: skip
                var_p = -centre
                cov = -centre
                if units == n:  # a unit per model
                    for i in range(n):
                        d = d_p[i] + 1
                        w = weight[inverse[i]]
                        var_p += w * d * d
                        cov += w * d * d_a[i]
                else:  # a unit per mask: unit g is mask g
                    for g in range(units):
                        d = d_p[g] + 1
                        var_p += weight[g] * mask_sizes[g] * d * d
                        cov += weight[g] * d * mask_a[g]
                if total < 3 or var_a <= 0:
                    value = np.nan
                elif var_p <= 0:
                    value = 0.0
                else:
                    value = cov / math.sqrt(float(var_a) * float(var_p))
                    value = min(max(value, -1.0), 1.0)
                lds[k, b, j] = value
            if not with_table:
                continue
            if var_a <= 0 or total <= n_masks:  # constant, or no replicated mask drawn
                rho[b, j] = np.nan
                continue
            z_sum[:] = 0.0
            z_squares[:] = 0.0
            scores = table[b]
            for i in range(n):
                z = scores[d_a[i] - 1]
                z_sum[inverse[i]] += z
                z_squares[inverse[i]] += z * z
            sum_z = 0.0
            sum_zz = 0.0
            between = 0.0  # sum_g w_g S_g^2 / n_g
            for g in range(n_masks):
                w = float(weight[g])
                sum_z += w * z_sum[g]
                sum_zz += w * z_squares[g]
                between += w / mask_sizes[g] * z_sum[g] * z_sum[g]
            models = float(total)
            ssb = between - sum_z * sum_z / models
            ssw = sum_zz - between
            n0 = (models - drawn_squares / models) / (n_masks - 1)
            msb = ssb / (n_masks - 1)
            msw = ssw / (models - n_masks)
            tau2 = (msb - msw) / n0
            whole = tau2 + msw
            rho[b, j] = min(max(tau2 / whole, 0.0), 1.0) if whole > 0 else np.nan


class _Masks:
    """The held-out models' masks, and the order the bootstrap keeps the models in: by mask
    (mask ``g`` holds ``sizes[g]`` consecutive models) or, when every mask has the same number
    ``k`` of models, seed-major (the ``j``-th model of mask ``g`` at ``j * G + g``), so that a
    sum over each mask's models is ``k`` contiguous slices."""

    def __init__(self, sizes: np.ndarray) -> None:
        self.sizes = sizes.astype(np.int64)
        self.count = len(sizes)
        self.equal = int(self.sizes.min()) == int(self.sizes.max())
        ends = np.cumsum(self.sizes)
        self.starts = ends - self.sizes
        self.ends = ends - 1
        if self.equal:
            self.inverse = np.tile(np.arange(self.count), int(self.sizes[0]))
            self.first = np.arange(self.count)
        else:
            self.inverse = np.repeat(np.arange(self.count), self.sizes)
            self.first = self.starts

    def arrange(self, inverse: np.ndarray) -> np.ndarray:
        """The order, int ``(n,)``, that puts models with masks ``inverse`` (ids ``0 .. G-1``)
        in this layout."""
        by_mask = np.argsort(inverse, kind="stable")
        if not self.equal:
            return by_mask
        within = np.empty(len(inverse), dtype=np.int64)
        within[by_mask] = np.arange(len(inverse)) - self.starts[inverse[by_mask]]
        return np.argsort(within * self.count + inverse, kind="stable")

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Sum over each mask's models of ``values`` ``(..., n)`` in this layout: ``(..., G)``."""
        if self.equal:
            out = values[..., : self.count].copy()
            for j in range(1, int(self.sizes[0])):
                out += values[..., j * self.count : (j + 1) * self.count]
            return out
        return np.diff(np.cumsum(values, axis=-1)[..., self.ends], axis=-1, prepend=0.0)

    def constant_within(self, values: np.ndarray) -> bool:
        """Whether every row of ``values`` ``(c, n)`` is constant over each mask's models."""
        return bool((values == values[:, self.first][:, self.inverse]).all())


def _accumulate(total: np.ndarray, count: np.ndarray, values: np.ndarray) -> None:
    """Add the non-NaN entries of ``values`` ``(..., c)`` into ``total`` and their number into
    ``count`` (for means over targets that skip NaN)."""
    finite = ~np.isnan(values)
    total += np.where(finite, values, 0.0).sum(-1)
    count += finite.sum(-1)


@dataclass(frozen=True)
class _Draws:
    """Per-resample values: ``lds`` ``(P, R)``, ``ceiling`` ``(R,)`` and ``mean_ceiling``
    ``(R,)`` (NaN where undefined; ceilings ``None`` when not asked for)."""

    lds: np.ndarray
    ceiling: np.ndarray | None
    mean_ceiling: np.ndarray | None


def _bootstrap(
    predicted: Sequence[np.ndarray],
    actual: np.ndarray,
    masks: _Masks,
    counts: np.ndarray,
    *,
    ceilings: bool,
    mean_k: np.ndarray | None = None,
) -> _Draws:
    """The statistics on each resample. Rows of ``predicted`` (each ``(n, t)``) and ``actual``
    are in the layout of ``masks``; ``counts`` int
    ``(R, G)``: draws of each mask per resample. With ``ceilings``, also the noise ceiling per
    resample and, given ``mean_k`` ``(R,)`` (the harmonic mean size of the drawn replicated
    masks), the ceiling of a ``mean_k``-seed mean."""
    n, t = actual.shape
    resamples = counts.shape[0]
    n_predictors = len(predicted)
    # columns per block: the sorted units of the outputs and of every predictor, five int64
    # arrays of (c, n) each, stay within a few BLOCK_VALUES
    width = max(1, min(t, BLOCK_VALUES // max(n * (n_predictors + 1), 1)))
    lds_sum = np.zeros((n_predictors, resamples))
    lds_count = np.zeros((n_predictors, resamples), dtype=np.int64)
    ceil_sum, ceil_count = np.zeros(resamples), np.zeros(resamples, dtype=np.int64)
    mean_sum, mean_count = np.zeros(resamples), np.zeros(resamples, dtype=np.int64)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    mask_of_model = np.ascontiguousarray(masks.inverse, dtype=np.int64)
    models = counts @ masks.sizes
    if ceilings:
        # normal scores Phi^-1((r - 1/2) / N) = Phi^-1((2r - 1) / (2N)) by 2r - 1, a row per
        # resample; the clip only touches models drawn 0 times, whose scores weigh 0
        span = 2 * int(models.max()) + 1
        top = 2.0 * models[:, None]
        table = np.ascontiguousarray(ndtri(np.clip(np.arange(span)[None, :], 1.0, top - 1.0) / top))
    else:
        table = np.empty((0, 0))
    rows = np.ones(n, dtype=np.int64)
    for lo in range(0, t, width):
        hi = min(lo + width, t)
        c = hi - lo
        columns = np.ascontiguousarray(np.asarray(actual[:, lo:hi], dtype=np.float64).T)
        sorted_actual = _SortedUnits(columns, mask_of_model, rows)
        # each predictor's units: one per model, or one per mask when its value is constant
        # over each mask's models (n / G times less work)
        p_group, p_size, p_order, p_first, p_past = (
            np.zeros((n_predictors, c, n), dtype=np.int64) for _ in range(5)
        )
        units = np.empty(n_predictors, dtype=np.int64)
        for k, p in enumerate(predicted):
            values = np.ascontiguousarray(np.asarray(p[:, lo:hi], dtype=np.float64).T)
            if masks.constant_within(values):
                sorted_p = _SortedUnits(values[:, masks.first], np.arange(masks.count), masks.sizes)
            else:
                sorted_p = _SortedUnits(values, mask_of_model, rows)
            units[k] = sorted_p.u
            used = slice(0, sorted_p.u)
            p_group[k, :, used] = sorted_p.group_sorted
            p_size[k, :, used] = sorted_p.sizes
            p_order[k, :, used] = sorted_p.order
            p_first[k, :, used] = sorted_p.first
            p_past[k, :, used] = sorted_p.past
        lds = np.empty((n_predictors, resamples, c))
        rho = np.empty((resamples, c) if ceilings else (0, 0))
        _resample_scores(
            counts, mask_of_model, masks.sizes, sorted_actual.group_sorted, sorted_actual.sizes,
            sorted_actual.order, sorted_actual.first, sorted_actual.past, p_group, p_size,
            p_order, p_first, p_past, units, table, lds, rho,
        )  # fmt: skip
        for k in range(n_predictors):
            _accumulate(lds_sum[k], lds_count[k], lds[k])
        if not ceilings:
            continue
        _accumulate(ceil_sum, ceil_count, ceiling_of_mean(rho, 1.0))
        if mean_k is not None:
            k_b = mean_k[:, None]
            drawn = ~np.isnan(k_b)  # NaN k: no replicated mask drawn
            ceiling_k = ceiling_of_mean(rho, np.where(drawn, k_b, 1.0))
            _accumulate(mean_sum, mean_count, np.where(drawn, ceiling_k, np.nan))
    with np.errstate(invalid="ignore", divide="ignore"):
        lds_mean = np.where(lds_count > 0, lds_sum / np.maximum(lds_count, 1), np.nan)
        ceil_mean = np.where(ceil_count > 0, ceil_sum / np.maximum(ceil_count, 1), np.nan)
        mean_mean = np.where(mean_count > 0, mean_sum / np.maximum(mean_count, 1), np.nan)
    return _Draws(
        lds=lds_mean,
        ceiling=ceil_mean if ceilings else None,
        mean_ceiling=mean_mean if ceilings and mean_k is not None else None,
    )


def _check_level(resamples: int, level: float) -> None:
    problems = []
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 0:
        problems.append(f"resamples={resamples!r} must be a whole number >= 0 (0: no intervals)")
    if not 0.0 < level < 1.0:
        problems.append(f"level={level!r} must be strictly between 0 and 1 (0.95: 95%)")
    if problems:
        raise ValueError("cannot bootstrap:\n" + "\n".join(f"  - {m}" for m in problems))


def _prepare(
    predicted: Sequence[Any], actual: Any, groups: np.ndarray | None
) -> tuple[list[np.ndarray], np.ndarray, _Masks]:
    """Validate (every problem at once); return the predictions and outputs, float64 with rows
    in the bootstrap's layout of the masks, and the masks (ids renumbered ``0 .. G-1``)."""
    problems = []
    try:
        act = as_matrix(actual, "actual")
    except ValueError as exc:
        act = None
        problems.append(str(exc))
    preds = []
    for k, p in enumerate(predicted):
        name = "predicted" if len(predicted) == 1 else f"predicted[{k}]"
        try:
            matrix = as_matrix(p, name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if act is not None and matrix.shape != act.shape:
            problems.append(
                f"{name} has shape {matrix.shape} but actual {act.shape}: both must be "
                "(n_models, n_targets), row i the same held-out model"
            )
        elif not np.isfinite(matrix).all():
            problems.append(f"{name} has NaN or infinite values: drop those models or targets")
        preds.append(matrix)
    if act is not None:
        if act.shape[0] < 3:
            problems.append(
                f"actual has shape {act.shape}: correlations need at least 3 held-out models"
            )
        if not np.isfinite(act).all():
            problems.append("actual has NaN or infinite values: drop those models or targets")
    if problems or act is None:
        raise ValueError("cannot score:\n" + "\n".join(f"  - {m}" for m in problems))
    n = act.shape[0]
    if groups is None:
        inverse, sizes = np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    else:
        inverse, sizes = index_groups(groups, n)
    masks = _Masks(sizes)
    order = masks.arrange(inverse)
    as_float = [np.asarray(p, dtype=np.float64)[order] for p in preds]
    return as_float, np.asarray(act, dtype=np.float64)[order], masks


def _mean_rows(values: np.ndarray, masks: _Masks, keep: np.ndarray) -> np.ndarray:
    """Mean over each mask's models of ``values`` ``(n, t)`` (rows in the masks' layout), for
    the masks in ``keep``: ``(R, t)``."""
    return (masks.sums(values.T).T / masks.sizes[:, None])[keep]


def _harmonic_mean(sizes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted harmonic mean of ``sizes`` ``(G,)`` per row of ``weights`` ``(R, G)``; NaN
    where all weights are 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return weights.sum(1) / (weights @ (1.0 / sizes))


def bootstrap_lds(
    predicted: Sequence[np.ndarray],
    actual: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """The LDS of each predictor on the same bootstrap resamples of held-out masks, float64
    ``(len(predicted), resamples)``.

    ``predicted``: predictions, each float ``(n, t)``; ``actual`` float ``(n, t)`` the held-out
    models' outputs; ``groups`` int ``(n,)`` same id = same mask (``None``: every model its own
    mask). Resample ``b`` draws the masks :func:`resample_masks` ``(G, resamples, seed)`` gives
    (the draws of :func:`score_held_out` with the same ``seed``), all models of a drawn mask
    together, and scores every predictor on it: the values are paired, so
    ``basic_interval(lds[1] - lds[0], out[1] - out[0])`` is an interval for the difference of
    two LDS (the curve's slope), with ``lds`` the point estimates. Targets are fixed. NaN where
    every target is constant in a resample.
    """
    _check_level(resamples, 0.95)
    if len(predicted) == 0:
        raise ValueError("predicted is empty: pass a sequence of (n_models, n_targets) arrays")
    preds, act, masks = _prepare(list(predicted), actual, groups)
    counts = resample_masks(masks.count, resamples, seed)
    return _bootstrap(preds, act, masks, counts, ceilings=False).lds


def score_held_out(
    predicted: np.ndarray,
    actual: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> HeldOutScores:
    """LDS, noise ceiling and LDS / ceiling on held-out models, with bootstrap intervals, against
    one model's output and against the mean of each replicated mask's seeds.

    Parameters
    ----------
    predicted, actual : float array (n, t)
        Row ``i``: held-out model ``i``'s prediction and output on the ``t`` targets (finite,
        ``n >= 3``).
    groups : int array (n,), optional
        Same id = same training mask (:func:`~dm_assets.evaluation.ceiling.
        group_identical_masks`); ``None``: every model its own mask (no ceiling, no mean truth).
    resamples : int
        Bootstrap resamples of the held-out masks (0: no intervals).
    seed : int
        Seed of ``numpy.random.default_rng`` for the resamples (:func:`resample_masks`).
    level : float
        Coverage of the (basic bootstrap) intervals.

    Returns
    -------
    HeldOutScores
        Point estimates as :func:`~dm_assets.evaluation.metrics.evaluate` gives them, for the
        single truth and (with at least three replicated masks) the mean-of-seeds truth, with
        intervals. Formulas, resampling unit and assumptions: see the module docstring.
    """
    _check_level(resamples, level)
    evaluation = evaluate(predicted, actual, groups=groups)
    preds, act, masks = _prepare([predicted], actual, groups)
    sizes = masks.sizes
    pred = preds[0]
    n, t = act.shape
    n_groups = len(sizes)
    ceiling = evaluation.ceiling
    replicated = sizes >= 2
    has_replicates = ceiling is not None
    k_point = float(_harmonic_mean(sizes[replicated], np.ones((1, int(replicated.sum()))))[0])
    equal_sizes = has_replicates and len(np.unique(sizes[replicated])) == 1
    seeds = None if not has_replicates else round(k_point)
    mean_rows = int(replicated.sum())
    with_mean = has_replicates and mean_rows >= 3
    counts = resample_masks(n_groups, resamples, seed) if resamples else None
    single_draws = mean_draws = None
    if counts is not None:
        mean_k = _harmonic_mean(sizes[replicated], counts[:, replicated]) if with_mean else None
        single_draws = _bootstrap(
            [pred], act, masks, counts, ceilings=has_replicates, mean_k=mean_k
        )
    single_ceiling = None if ceiling is None else ceiling.lds
    single = _truth(
        ONE_MODEL,
        evaluation.lds,
        single_ceiling,
        None if single_draws is None else single_draws.lds[0],
        None if single_draws is None else single_draws.ceiling,
        level,
        models=n,
        masks=n_groups,
    )
    mean_of_seeds = None
    if with_mean and ceiling is not None:
        mean_pred = _mean_rows(pred, masks, replicated)
        mean_act = _mean_rows(act, masks, replicated)
        mean_lds = evaluate(mean_pred, mean_act).lds
        per_target = ceiling_of_mean(ceiling.reliability_per_target, k_point)
        finite = per_target[~np.isnan(per_target)]
        mean_ceiling = float(finite.mean()) if finite.size else float("nan")
        if counts is not None and single_draws is not None:
            each = _Masks(np.ones(mean_rows, dtype=np.int64))
            mean_draws = _bootstrap(
                [mean_pred], mean_act, each, counts[:, replicated], ceilings=False
            )
        if equal_sizes:
            label = f"mean of {seeds} seeds' outputs"
        else:
            label = (
                f"mean of {seeds} seeds' outputs (harmonic mean {k_point:.2f} of unequal seeds "
                "per mask)"
            )
        mean_of_seeds = _truth(
            label,
            mean_lds,
            mean_ceiling,
            None if mean_draws is None else mean_draws.lds[0],
            None if single_draws is None else single_draws.mean_ceiling,
            level,
            models=mean_rows,
            masks=mean_rows,
        )
    elif has_replicates:
        logger.warning(
            "only %d mask(s) have several held-out models: the mean-of-seeds truth needs at "
            "least 3, so it is not scored",
            mean_rows,
        )
    return HeldOutScores(
        evaluation=evaluation,
        single=single,
        mean_of_seeds=mean_of_seeds,
        seeds=seeds,
        targets=t,
        resamples=int(resamples),
        level=float(level),
        seed=int(seed),
    )


def _truth(
    label: str,
    lds: float,
    ceiling: float | None,
    lds_draws: np.ndarray | None,
    ceiling_draws: np.ndarray | None,
    level: float,
    *,
    models: int,
    masks: int,
) -> TruthScores:
    lds_ci = ceiling_ci = ratio_ci = None
    ratio = _ratio(lds, ceiling)
    if lds_draws is not None:
        lds_ci = basic_interval(lds, lds_draws, level, (-1.0, 1.0))
        if ceiling is not None and ceiling_draws is not None:
            ceiling_ci = basic_interval(ceiling, ceiling_draws, level, (0.0, 1.0))
            with np.errstate(invalid="ignore", divide="ignore"):
                ratios = np.where(ceiling_draws > 0, lds_draws / ceiling_draws, np.nan)
            if ratio is not None:
                ratio_ci = basic_interval(ratio, ratios, level)
    return TruthScores(
        ground_truth=label,
        lds=lds,
        lds_ci=lds_ci,
        noise_ceiling=ceiling,
        noise_ceiling_ci=ceiling_ci,
        lds_over_ceiling=ratio,
        lds_over_ceiling_ci=ratio_ci,
        models=models,
        masks=masks,
    )
