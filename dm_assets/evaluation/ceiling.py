r"""The noise ceiling: the best LDS any datamodel could reach, from held-out models that share a
mask.

Where several held-out models were trained on the same mask (different seeds), their spread is
training noise that no function of the mask can predict; :func:`estimate_noise_ceiling` turns
it into the best LDS (and Pearson correlation) any datamodel could reach (see there for the
definition and estimator). :func:`~dm_assets.evaluation.metrics.evaluate` adds it to its scores
when given the groups of identical masks (:func:`group_identical_masks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

from dm_assets.evaluation.columns import as_matrix, column_slices, nanmean


def group_identical_masks(masks: np.ndarray) -> np.ndarray:
    """Group id, int64 ``(n,)``, of each row of ``masks`` ``(n, p)`` (bool or 0/1): rows with the
    same mask share an id; ids run ``0, 1, ...`` in order of first appearance."""
    if getattr(masks, "ndim", None) != 2:
        raise ValueError(
            f"masks must be (n, p) bool or 0/1; got shape {getattr(masks, 'shape', None)}"
        )
    n = int(masks.shape[0])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    packed = np.packbits(np.asarray(masks) != 0, axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    # renumber the lexicographic ids by first appearance
    rename = np.empty(len(first), dtype=np.int64)
    rename[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rename[inverse]


@dataclass(frozen=True, eq=False)
class NoiseCeiling:
    """The best scores any function of the mask could reach (see :func:`estimate_noise_ceiling`).

    ``lds`` (mean over targets) and ``lds_per_target`` float64 ``(t,)``: the Spearman ceiling,
    comparable with :attr:`~dm_assets.evaluation.metrics.Evaluation.lds`. ``pearson`` /
    ``pearson_per_target``: the Pearson ceiling; its square is the R^2 ceiling.
    ``reliability_per_target`` ``(t,)``: the estimated fraction of the output's variance that
    the mask explains (in normal scores). NaN for targets whose output is constant.
    ``n_groups`` distinct masks among the held-out models, of which ``n_replicated_groups``
    hold at least two models (``n_replicated_models`` in all).
    """

    lds: float
    lds_per_target: np.ndarray
    pearson: float
    pearson_per_target: np.ndarray
    reliability_per_target: np.ndarray
    n_groups: int
    n_replicated_groups: int
    n_replicated_models: int


def index_groups(groups: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inverse (n,), counts (G,))`` with groups renumbered ``0 .. G-1``."""
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(
            f"groups must be ({n},), one group id per held-out model (the rows of actual); "
            f"got shape {groups.shape}: use group_identical_masks(masks)"
        )
    if groups.dtype.kind not in "iub":
        raise ValueError(
            f"groups must hold integer ids (same id = same mask); got dtype {groups.dtype}"
        )
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return inverse.reshape(-1).astype(np.int64), counts.astype(np.int64)


def _reliability(values: np.ndarray, inverse: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One-way ANOVA intraclass correlation ICC(1) of each column of ``values`` ``(n, c)`` over
    the groups: ``tau^2 / (tau^2 + sigma^2)``, clipped to [0, 1]; NaN for a constant column."""
    n, n_groups = values.shape[0], len(counts)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    group_mean = np.add.reduceat(values[order], starts, axis=0) / counts[:, None]
    grand = values.mean(0)
    ssb = (counts[:, None] * (group_mean - grand) ** 2).sum(0)
    ssw = ((values - group_mean[inverse]) ** 2).sum(0)
    msb = ssb / (n_groups - 1)
    msw = ssw / (n - n_groups)
    # n0: the effective group size for unequal groups (k when every group has k models)
    n0 = (n - float((counts.astype(np.float64) ** 2).sum()) / n) / (n_groups - 1)
    tau2 = (msb - msw) / n0
    total = tau2 + msw
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(total > 0, tau2 / np.where(total > 0, total, 1.0), np.nan)
    return np.clip(rho, 0.0, 1.0)


def _spearman_from_pearson(r: np.ndarray) -> np.ndarray:
    """Spearman correlation of a bivariate normal pair with Pearson correlation ``r``."""
    return (6.0 / math.pi) * np.arcsin(r / 2.0)


def spearman_brown(reliability: np.ndarray | float, k: float | np.ndarray) -> np.ndarray:
    r"""The reliability of the mean of ``k`` replicates from that of one, ``rho`` (any shape):
    ``rho_k = k rho / (1 + (k - 1) rho)`` (Spearman-Brown).

    Under the model of :func:`estimate_noise_ceiling` (``y = s + e``, noise variance
    ``sigma^2`` independent of the mask), the mean of ``k`` seeds has noise variance
    ``sigma^2 / k`` and reliability ``tau^2 / (tau^2 + sigma^2 / k)``, which is ``rho_k``. Where
    masks have unequal numbers ``k_g`` of seeds, the average noise variance over masks is
    ``sigma^2 mean_g(1 / k_g)``: pass the harmonic mean of the ``k_g``. ``k`` may be an array
    that broadcasts against ``rho``. NaN stays NaN.
    """
    k = np.asarray(k, dtype=np.float64)
    if not np.all(np.isnan(k) | (k >= 1)):
        raise ValueError(f"k={k} must be at least 1 (the number of replicates averaged)")
    rho = np.asarray(reliability, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return k * rho / (1.0 + (k - 1.0) * rho)


def ceiling_of_mean(reliability: np.ndarray, k: float | np.ndarray) -> np.ndarray:
    r"""The Spearman noise ceiling per target against the mean of ``k`` seeds' outputs, float64
    shaped like ``reliability`` (one model's reliability per target in normal scores,
    :attr:`NoiseCeiling.reliability_per_target`; NaN stays NaN)::

        ceiling_j(k) = (6 / pi) * arcsin(sqrt(rho_k_j) / 2),   rho_k = k rho / (1 + (k - 1) rho)

    the ceiling of :func:`estimate_noise_ceiling` with the reliability of a ``k``-seed mean
    (:func:`spearman_brown`; ``k`` = 1 gives the one-model ceiling). Assumes in addition that
    averaging the raw outputs acts like averaging their normal scores (the transform ``h`` of
    the model is close to linear over one mask's spread of seeds).
    """
    return _spearman_from_pearson(np.sqrt(spearman_brown(reliability, k)))


def _normal_scores(ranks: np.ndarray) -> np.ndarray:
    return ndtri((ranks - 0.5) / ranks.shape[0])


def ceiling_per_column(
    actual: np.ndarray, ranks: np.ndarray, inverse: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(spearman ceiling, pearson ceiling, reliability in normal scores)``, each float64
    ``(c,)``, of the columns of ``actual`` ``(n, c)`` given their average ``ranks`` ``(n, c)``
    and the groups (:func:`index_groups`)."""
    rho_scores = _reliability(_normal_scores(ranks), inverse, counts)
    rho_raw = _reliability(actual, inverse, counts)
    return _spearman_from_pearson(np.sqrt(rho_scores)), np.sqrt(rho_raw), rho_scores


def estimate_noise_ceiling(actual: np.ndarray, groups: np.ndarray) -> NoiseCeiling | None:
    r"""The LDS (and Pearson) that the best possible datamodel would reach, from replicates.

    ``actual`` float ``(n, t)``: outputs of ``n`` held-out models on ``t`` targets; ``groups``
    int ``(n,)``: same id = trained on the same mask (:func:`group_identical_masks`). Returns
    ``None`` when no two models share a mask (nothing tells training noise from signal) or all
    share one.

    **Definition.** Over the distribution of held-out models (random mask ``m``, random seed),
    the ceiling of target ``j`` is the highest Spearman correlation that any function ``q`` of
    the mask reaches with one model's output ``y``::

        ceiling_j = max_q Spearman(q(m), y) = Spearman(E[F(y) | m], y)       (F: the cdf of y)

    (Spearman is the Pearson correlation of the grades ``F_q(q(m))`` and ``F(y)``; for a fixed
    uniform marginal the covariance with ``F(y)`` is largest, by the rearrangement inequality,
    when the grades increase with ``E[F(y) | m]``.) Two models trained on the same mask differ
    only by the seed, and this is the part no datamodel can predict. The ceiling is a population
    value: the LDS of even the perfect predictor on ``n`` models scatters around it by about
    ``(1 - ceiling^2) / sqrt(n)``.

    **Model (assumptions).** Some increasing transform ``h`` makes the output additive and
    Gaussian: ``y = h(s(m) + e)`` with ``s(m) ~ N(0, tau^2)`` across masks (a linear datamodel
    over many examples is a sum of many small terms) and training noise ``e ~ N(0, sigma^2)``
    independent of the mask (homoscedastic in that scale). Then ``E[F(y) | m]`` increases with
    ``s(m)``, so ``ceiling_j = Spearman(s, s + e)``; with the reliability
    ``rho = tau^2 / (tau^2 + sigma^2)`` (the correlation of two replicates) the attenuation
    formula gives ``Pearson(s, s + e) = sqrt(rho)``, and for a bivariate normal pair
    ``Spearman = (6 / pi) arcsin(Pearson / 2)``::

        ceiling_j = (6 / pi) * arcsin(sqrt(rho_j) / 2)

    Outputs with many ties (0/1 correctness) break the continuous model; use margins. Where a
    handful of examples decide a target's output, ``s(m)`` is far from Gaussian and the estimate
    runs low (in simulation with 200 examples, half in each mask, noise variance 0.25 to 4
    times the signal's: by about 0.02 with 3 influential examples, 0.01 with 10, under 0.004
    with 50 or more).

    **Estimator.** Per target, the normal scores ``z_i = Phi^-1((r_i - 1/2) / n)`` of the
    outputs' average ranks ``r_i`` recover ``(s + e)`` standardized, whatever ``h``; then the
    one-way ANOVA estimate of the intraclass correlation over the ``G`` groups (sizes ``n_g``)::

        MSB = sum_g n_g (zbar_g - zbar)^2 / (G - 1)
        MSW = sum_g sum_i (z_gi - zbar_g)^2 / (n - G)
        n0  = (n - sum_g n_g^2 / n) / (G - 1)             (= k when every group has k models)
        tau2_hat = (MSB - MSW) / n0,    rho_hat = tau2_hat / (tau2_hat + MSW), clipped to [0, 1]

    and ``ceiling_j = (6 / pi) arcsin(sqrt(rho_hat_j) / 2)``; ``lds`` is its mean over
    targets. The Pearson ceiling ``sqrt(rho_hat)`` comes from the same ANOVA on the raw outputs
    and needs only additive, mask-independent noise (no Gaussianity); its square bounds R^2.

    Why this estimator: it uses every model (groups of any size; singleton masks add to the
    between-mask variance) where correlating "replicate 1" with "replicate 2" depends on an
    arbitrary pairing and drops the rest; it is deterministic; and, like the Spearman ceiling
    itself, it is unchanged by any increasing transform of the outputs. Correlating two
    replicates estimates ``rho``, not the ceiling: a perfect predictor is noise-free on one
    side, which is why the square root. Sampling error of ``rho_hat`` (``G`` groups of ``k``):
    about ``(1 - rho)(1 + (k - 1) rho) sqrt(2 / (k (k - 1) G))``.
    """
    values = as_matrix(actual, "actual")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError("actual has NaN or infinite values: drop those models or targets")
    n, t = values.shape
    inverse, counts = index_groups(groups, n)
    if len(counts) < 2 or not (counts >= 2).any():
        return None
    columns = np.full((3, t), np.nan)
    for lo, hi in column_slices(n, t):
        block = np.asarray(values[:, lo:hi], dtype=np.float64)
        constant = block.max(0) == block.min(0)
        parts = ceiling_per_column(block, rankdata(block, axis=0), inverse, counts)
        columns[:, lo:hi] = np.where(constant, np.nan, parts)
    return noise_ceiling_from_columns(columns, counts)


def noise_ceiling_from_columns(columns: np.ndarray, counts: np.ndarray) -> NoiseCeiling:
    """Assemble the result from ``columns`` ``(3, t)``: Spearman ceiling, Pearson ceiling and
    reliability per target; ``counts`` the group sizes."""
    replicated = counts >= 2
    return NoiseCeiling(
        lds=nanmean(columns[0]),
        lds_per_target=columns[0],
        pearson=nanmean(columns[1]),
        pearson_per_target=columns[1],
        reliability_per_target=columns[2],
        n_groups=len(counts),
        n_replicated_groups=int(replicated.sum()),
        n_replicated_models=int(counts[replicated].sum()),
    )
