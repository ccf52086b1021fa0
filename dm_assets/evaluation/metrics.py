r"""Fitted datamodels judged on held-out models: LDS, Pearson, R^2 and the noise ceiling.

Held-out models are trained models the regression never saw (neither fitted on nor used to
choose lambda). Held-out model ``i`` (of ``n``) was trained on mask ``m_i`` (bool ``(p,)``, which
of the ``p`` training examples it saw); its output on target ``j`` (of ``t``) is ``y_ij`` and the
datamodel's prediction is ``yhat_ij = ((m_i - mean) / std) @ weight[:, j] + bias[j]``.

Per target ``j``, across the ``n`` held-out models:

* ``lds_j = Spearman(yhat_:j, y_:j) = Pearson(rank(yhat_:j), rank(y_:j))`` (average ranks for
  ties): the linear datamodeling score, the held-out evaluation of Ilyas et al. (2022, arXiv
  2202.00622) under the name Park et al. (2023, TRAK) gave it. ``lds`` is its mean over targets.
* ``pearson_j = Pearson(yhat_:j, y_:j)``.
* ``r2_j = 1 - sum_i (y_ij - yhat_ij)^2 / sum_i (y_ij - mean_i y_ij)^2``.

A target whose actual output is the same on every held-out model has no ranking to predict: its
three scores are NaN, it is left out of every mean and counted in ``n_constant_targets``. A target
whose *prediction* is constant (all its weights zero, e.g. lambda chosen at lambda_max) while
its output varies predicts no ranking: its correlations are 0, not NaN, so the mean does not
rise by dropping the hardest targets; such targets are counted in ``n_constant_predictions``.

Where several held-out models were trained on the same mask (different seeds), their spread is
training noise that no function of the mask can predict; :func:`estimate_noise_ceiling` turns
it into the best LDS any datamodel could reach (see there for the definition and estimator).

Plots are drawn with matplotlib's object API (``Figure`` and the Agg canvas, no pyplot state);
matplotlib is imported only when a plot is drawn. This module imports neither dagster nor mlflow
(nor torch until a curve is fitted).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

if TYPE_CHECKING:
    import torch

    from dm_assets.regression.config import RegressionConfig
    from dm_assets.store.store import Store

logger = logging.getLogger(__name__)

# Columns are scored in slices of about this many values (float64), bounding the temporaries
# at a few tens of MB whatever t is; ranking a cache-sized slice is also faster than the whole.
_CHUNK_VALUES = 2**20


# --------------------------------------------------------------------------------------------
# prediction


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def predict(
    weights: Mapping[str, torch.Tensor | np.ndarray],
    masks: np.ndarray,
    *,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """Datamodel predictions, float64 ``(n, t)``: ``((masks - mean) / std) @ weight + bias``.

    ``weights`` is the dict saved as ``datamodels.pt`` (:meth:`LassoPathResult.seed_dict`):
    ``weight`` ``(p, t)``, ``bias`` ``(t,)``, ``mean`` and ``std`` ``(p,)`` (torch tensors or
    numpy arrays; other keys are ignored). ``masks`` ``(n, p)``, bool or 0/1 (a memory map is
    read ``chunk_rows`` rows at a time; default: ``max(512, 2**24 // p)``).

    Computed in float64 as ``masks @ (weight / std) + (bias - (mean / std) @ weight)``, the same
    affine map folded so that the standardized masks are never materialized.
    """
    missing = [k for k in ("weight", "bias", "mean", "std") if k not in weights]
    if missing:
        raise ValueError(
            f"weights lacks {missing}: pass the dict saved as datamodels.pt "
            "(LassoPathResult.seed_dict(): weight, bias, mean, std)"
        )
    weight = _to_numpy(weights["weight"])
    bias, mean, std = (_to_numpy(weights[k]) for k in ("bias", "mean", "std"))
    problems = []
    if weight.ndim != 2:
        problems.append(f"weights['weight'] must be (p, t); got shape {weight.shape}")
    else:
        p, t = weight.shape
        if bias.shape != (t,):
            problems.append(f"weights['bias'] must be ({t},) to match weight; got {bias.shape}")
        for key, value in (("mean", mean), ("std", std)):
            if value.shape != (p,):
                problems.append(
                    f"weights[{key!r}] must be ({p},) to match weight; got {value.shape}"
                )
        if std.shape == (p,) and not np.all(std > 0):
            problems.append("weights['std'] has entries <= 0: a constant column's std is 1")
        masks_shape = getattr(masks, "shape", None)
        if masks_shape is None or len(masks_shape) != 2 or masks_shape[1] != p:
            problems.append(
                f"masks must be (n, {p}) (one row per model, one column per training example "
                f"the weights cover); got shape {masks_shape}"
            )
    if problems:
        raise ValueError("cannot predict:\n" + "\n".join(f"  - {m}" for m in problems))
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be a positive number of rows (or None)")
    n = int(masks.shape[0])
    folded = weight / std[:, None]
    offset = bias - (mean / std) @ weight
    # blocks of at least 512 rows: each block re-reads the (p, t) weights, which cost more than
    # the block itself once p * t is large
    rows = chunk_rows or max(512, 2**24 // max(p, 1))
    out = np.empty((n, t), dtype=np.float64)
    for start in range(0, n, rows):
        block = np.asarray(masks[start : start + rows], dtype=np.float64)
        out[start : start + rows] = block @ folded + offset
    return out


# --------------------------------------------------------------------------------------------
# replicate groups and the noise ceiling


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
    comparable with :attr:`Evaluation.lds`. ``pearson`` / ``pearson_per_target``: the Pearson
    ceiling; its square is the R^2 ceiling. ``reliability_per_target`` ``(t,)``: the estimated
    fraction of the output's variance that the mask explains (in normal scores). NaN for targets
    whose output is constant. ``n_groups`` distinct masks among the held-out models, of which
    ``n_replicated_groups`` hold at least two models (``n_replicated_models`` in all).
    """

    lds: float
    lds_per_target: np.ndarray
    pearson: float
    pearson_per_target: np.ndarray
    reliability_per_target: np.ndarray
    n_groups: int
    n_replicated_groups: int
    n_replicated_models: int


def _group_index(groups: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
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


def _normal_scores(ranks: np.ndarray) -> np.ndarray:
    return ndtri((ranks - 0.5) / ranks.shape[0])


def _ceiling_columns(
    actual: np.ndarray, ranks: np.ndarray, inverse: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(spearman ceiling, pearson ceiling, reliability in normal scores)`` per column."""
    rho_scores = _reliability(_normal_scores(ranks), inverse, counts)
    rho_raw = _reliability(actual, inverse, counts)
    return _spearman_from_pearson(np.sqrt(rho_scores)), np.sqrt(rho_raw), rho_scores


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


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
    values = _as_matrix(actual, "actual")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError("actual has NaN or infinite values: drop those models or targets")
    n, t = values.shape
    inverse, counts = _group_index(groups, n)
    if len(counts) < 2 or not (counts >= 2).any():
        return None
    columns = np.full((3, t), np.nan)
    for lo, hi in _column_slices(n, t):
        block = np.asarray(values[:, lo:hi], dtype=np.float64)
        constant = block.max(0) == block.min(0)
        parts = _ceiling_columns(block, rankdata(block, axis=0), inverse, counts)
        columns[:, lo:hi] = np.where(constant, np.nan, parts)
    return _noise_ceiling(columns, counts)


def _noise_ceiling(columns: np.ndarray, counts: np.ndarray) -> NoiseCeiling:
    """Assemble the result from ``columns`` ``(3, t)``: Spearman ceiling, Pearson ceiling and
    reliability per target; ``counts`` the group sizes."""
    replicated = counts >= 2
    return NoiseCeiling(
        lds=_nanmean(columns[0]),
        lds_per_target=columns[0],
        pearson=_nanmean(columns[1]),
        pearson_per_target=columns[1],
        reliability_per_target=columns[2],
        n_groups=len(counts),
        n_replicated_groups=int(replicated.sum()),
        n_replicated_models=int(counts[replicated].sum()),
    )


# --------------------------------------------------------------------------------------------
# scores


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Scores of predictions against held-out models' outputs (see the module docstring).

    ``lds``, ``pearson``, ``r2``: means over the targets whose output varies; the
    ``*_per_target`` arrays are float64 ``(t,)``, NaN for constant targets. ``n_models`` held-out
    models, ``n_targets`` targets, ``n_constant_targets`` of them constant (left out),
    ``n_constant_predictions`` predicted constant (correlations 0). ``noise_ceiling`` (the LDS
    ceiling), ``pearson_ceiling`` and ``ceiling`` (the full :class:`NoiseCeiling`) are ``None``
    unless ``groups`` marked replicated masks.
    """

    lds: float
    lds_per_target: np.ndarray
    pearson: float
    pearson_per_target: np.ndarray
    r2: float
    r2_per_target: np.ndarray
    n_models: int
    n_targets: int
    n_constant_targets: int
    n_constant_predictions: int
    ceiling: NoiseCeiling | None = None

    @property
    def noise_ceiling(self) -> float | None:
        """The LDS ceiling (mean over targets), comparable with :attr:`lds`; ``None`` without
        replicates."""
        return None if self.ceiling is None else self.ceiling.lds

    @property
    def pearson_ceiling(self) -> float | None:
        return None if self.ceiling is None else self.ceiling.pearson

    def summary(self) -> dict[str, float | int]:
        """The scalar results, for metadata and metrics (ceilings only when estimated)."""
        out: dict[str, float | int] = {
            "lds": self.lds,
            "pearson": self.pearson,
            "r2": self.r2,
            "n_models": self.n_models,
            "n_targets": self.n_targets,
            "n_constant_targets": self.n_constant_targets,
            "n_constant_predictions": self.n_constant_predictions,
        }
        if self.ceiling is not None:
            out["noise_ceiling"] = self.ceiling.lds
            out["pearson_ceiling"] = self.ceiling.pearson
            out["n_replicated_groups"] = self.ceiling.n_replicated_groups
        return out


def _as_matrix(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be (n_models, n_targets); got shape {array.shape} "
            "(one target: reshape(-1, 1))"
        )
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{name} must hold numbers; got dtype {array.dtype}")
    return array


def _column_slices(n: int, t: int) -> list[tuple[int, int]]:
    width = max(1, _CHUNK_VALUES // max(n, 1))
    return [(lo, min(lo + width, t)) for lo in range(0, t, width)]


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column pair of ``a``, ``b`` ``(n, c)``; NaN where one is
    constant (callers decide what that means)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    num = np.einsum("ij,ij->j", a, b)
    den = np.sqrt(np.einsum("ij,ij->j", a, a) * np.einsum("ij,ij->j", b, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.clip(r, -1.0, 1.0)


def evaluate(
    predicted: np.ndarray, actual: np.ndarray, *, groups: np.ndarray | None = None
) -> Evaluation:
    """Score predictions of held-out models' outputs, per target and averaged over targets.

    ``predicted``, ``actual`` float ``(n, t)``: row ``i`` is held-out model ``i``, column ``j``
    target ``j`` (finite values, ``n >= 3``). ``groups`` int ``(n,)`` (optional): same id = same
    training mask (:func:`group_identical_masks`); where some mask has several models the noise
    ceiling is estimated (:func:`estimate_noise_ceiling`). Formulas and the treatment of
    constant columns: see the module docstring. Spearman correlations rank each column with
    average ranks for ties and correlate the ranks, vectorized over targets.
    """
    pred = _as_matrix(predicted, "predicted")
    act = _as_matrix(actual, "actual")
    problems = []
    if pred.shape != act.shape:
        problems.append(
            f"predicted has shape {pred.shape} but actual {act.shape}: both must be "
            "(n_models, n_targets), row i the same held-out model"
        )
    elif pred.shape[0] < 3:
        problems.append(f"got {pred.shape[0]} held-out model(s): correlations need at least 3")
    for name, array in (("predicted", pred), ("actual", act)):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            problems.append(f"{name} has NaN or infinite values: drop those models or targets")
    if problems:
        raise ValueError("cannot evaluate:\n" + "\n".join(f"  - {m}" for m in problems))
    n, t = act.shape
    group_index = _group_index(groups, n) if groups is not None else None
    if group_index is not None and (len(group_index[1]) < 2 or not (group_index[1] >= 2).any()):
        group_index = None  # no replicates (or a single mask): no ceiling
    lds = np.empty(t)
    pearson = np.empty(t)
    r2 = np.empty(t)
    ceiling_columns = np.full((3, t), np.nan)
    n_constant_predictions = 0
    constant_all = np.zeros(t, dtype=bool)
    for lo, hi in _column_slices(n, t):
        a = np.asarray(act[:, lo:hi], dtype=np.float64)
        p = np.asarray(pred[:, lo:hi], dtype=np.float64)
        constant = a.max(0) == a.min(0)
        flat = (p.max(0) == p.min(0)) & ~constant
        constant_all[lo:hi] = constant
        n_constant_predictions += int(flat.sum())
        rank_a = rankdata(a, axis=0)
        rank_p = rankdata(p, axis=0)
        for out, r in ((lds, _pearson_columns(rank_p, rank_a)), (pearson, _pearson_columns(p, a))):
            out[lo:hi] = np.where(constant, np.nan, np.where(flat, 0.0, r))
        sse = ((a - p) ** 2).sum(0)
        sst = ((a - a.mean(0)) ** 2).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r2[lo:hi] = np.where(constant, np.nan, 1.0 - sse / np.where(constant, 1.0, sst))
        if group_index is not None:
            parts = _ceiling_columns(a, rank_a, *group_index)
            ceiling_columns[:, lo:hi] = np.where(constant, np.nan, parts)
    return Evaluation(
        lds=_nanmean(lds),
        lds_per_target=lds,
        pearson=_nanmean(pearson),
        pearson_per_target=pearson,
        r2=_nanmean(r2),
        r2_per_target=r2,
        n_models=n,
        n_targets=t,
        n_constant_targets=int(constant_all.sum()),
        n_constant_predictions=n_constant_predictions,
        ceiling=None if group_index is None else _noise_ceiling(ceiling_columns, group_index[1]),
    )


# --------------------------------------------------------------------------------------------
# LDS against the number of models in the fit


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


def fitted_and_held_out(
    dataset_path: str | Path, store: Store, num_train: int, num_val: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(seen, held)``: the model indices the fit used (the dataset's first
    ``num_train + num_val`` rows, in their order) and the held-out ones (completed models of
    ``store`` that are not among them, in increasing order); int64 arrays."""
    from dm_assets.regression.beton import beton_info

    seen = beton_info(dataset_path).model_indices[: num_train + num_val]
    return seen, np.setdiff1d(store.completed_indices(), seen)


def read_rows(
    store: Store,
    indices: np.ndarray,
    *,
    x_name: str,
    y_name: str,
    target_start: int = 0,
    target_end: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """The masks ``(n, p)`` and the outputs float64 ``(n, t)`` of models ``indices``, the
    outputs cut to the regression's targets ``[target_start, target_end)`` (-1: to the end)."""
    masks = np.asarray(store.read(x_name)[indices])
    outputs = np.asarray(store.read(y_name)[indices], dtype=np.float64).reshape(len(indices), -1)
    return masks, outputs[:, target_start : None if target_end == -1 else target_end]


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


# --------------------------------------------------------------------------------------------
# plots


def _save(fig: Any, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    return out


def plot_lds_curve(
    points: Sequence[CurvePoint],
    out_png: str | Path,
    *,
    title: str = "",
    ceiling: float | None = None,
) -> Path:
    """Draw held-out LDS and Pearson against the number of models in the fit to ``out_png``.

    x: :attr:`CurvePoint.n_models_used`, the models the weights were fitted on (training rows,
    plus the validation rows when refitted), on a log scale when it spans more than a factor 4;
    ``ceiling`` (the LDS noise ceiling, :attr:`Evaluation.noise_ceiling`) is drawn as a dashed
    line. With no points the figure says that no curve was computed (and still shows the
    ceiling). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    sizes = np.array([p.n_models_used for p in points], dtype=np.float64)
    refit = [p.n_models_used - p.n_train for p in points if p.n_models_used != p.n_train]
    lds = np.array([p.lds for p in points], dtype=np.float64)
    pearson = np.array([p.pearson for p in points], dtype=np.float64)
    if len(points):
        ax.plot(sizes, lds, marker="o", color="tab:blue", label="LDS (Spearman)")
        ax.plot(sizes, pearson, marker="s", ls=":", color="tab:orange", label="Pearson")
        if sizes.max() > 4 * sizes.min():
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(sizes, labels=[str(int(v)) for v in sizes])  # the sizes fitted, plainly
    else:
        ax.text(
            0.5,
            0.5,
            "no curve computed\n(evaluation.curve_sizes is empty)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
    if ceiling is not None and np.isfinite(ceiling):
        ax.axhline(
            ceiling, ls="--", color="black", lw=1.2, label=f"noise ceiling (LDS) {ceiling:.3f}"
        )
    values = np.concatenate([lds, pearson, [ceiling] if ceiling is not None else []])
    values = values[np.isfinite(values)]
    low = min(0.0, float(values.min()) - 0.05) if values.size else 0.0
    ax.set_ylim(low, 1.02)
    ax.set_xlabel(
        f"models in the fit (training + {refit[0]} validation models, refit at the chosen lambda)"
        if refit
        else "models in the fit"
    )
    ax.set_ylabel("held-out correlation (mean over targets)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "Linear datamodeling score against models used")
    return _save(fig, out_png)


def plot_predicted_vs_actual(
    predicted: np.ndarray,
    actual: np.ndarray,
    out_png: str | Path,
    *,
    targets: Sequence[int] | None = None,
    max_panels: int = 6,
) -> Path:
    """Scatter panels of predicted (x) against actual (y) output across held-out models, one per
    target, each titled with its Spearman correlation, the line ``y = x`` dashed.

    ``predicted``, ``actual`` ``(n, t)`` as for :func:`evaluate`. ``targets``: the columns to
    draw (at most ``max_panels``); default: up to ``max_panels`` targets at evenly spaced
    quantiles of the per-target Spearman, best to worst, constant targets skipped.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if max_panels < 1:
        raise ValueError(f"max_panels={max_panels} must be at least 1")
    result = evaluate(predicted, actual)
    pred, act = np.asarray(predicted), np.asarray(actual)
    t = result.n_targets
    if targets is None:
        scored = np.flatnonzero(~np.isnan(result.lds_per_target))
        order = scored[np.argsort(-result.lds_per_target[scored], kind="stable")]
        if len(order) > max_panels:
            order = order[np.linspace(0, len(order) - 1, max_panels).round().astype(int)]
        chosen = [int(j) for j in order]
    else:
        chosen = [int(j) for j in targets]
        bad = [j for j in chosen if not 0 <= j < t]
        if bad:
            raise ValueError(f"targets {bad} are not columns of the {t} targets: use 0 .. {t - 1}")
        if len(chosen) > max_panels:
            raise ValueError(
                f"targets has {len(chosen)} entries but max_panels={max_panels}: pass fewer "
                "targets or raise max_panels"
            )
    cols = max(1, min(3, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / cols))
    fig = Figure(figsize=(3.6 * cols, 3.3 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, j in zip(axes, chosen, strict=False):
        ax.scatter(pred[:, j], act[:, j], s=8, alpha=0.5, edgecolors="none")
        lo = float(min(pred[:, j].min(), act[:, j].min()))
        hi = float(max(pred[:, j].max(), act[:, j].max()))
        ax.plot([lo, hi], [lo, hi], ls="--", color="gray", lw=1)
        ax.set_title(f"target {j}: Spearman {result.lds_per_target[j]:.3f}", fontsize="medium")
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
    for ax in axes[len(chosen) :]:
        ax.set_axis_off()
    if not chosen:
        axes[0].text(0.5, 0.5, "no target varies", ha="center", va="center", color="gray")
    fig.suptitle(f"Datamodel predictions on {result.n_models} held-out models")
    return _save(fig, out_png)
