r"""Fitted datamodels judged on held-out models: predictions, LDS, Pearson and R^2.

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

Where several held-out models were trained on the same mask (different seeds), :func:`evaluate`
adds the noise ceiling, the best LDS any datamodel could reach
(:mod:`~dm_assets.evaluation.ceiling`).

This module imports neither dagster nor mlflow (nor torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import rankdata

from dm_assets.evaluation.ceiling import (
    NoiseCeiling,
    ceiling_per_column,
    index_groups,
    noise_ceiling_from_columns,
)
from dm_assets.evaluation.columns import as_matrix, column_slices, nanmean

if TYPE_CHECKING:
    import torch


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
    training mask (:func:`~dm_assets.evaluation.ceiling.group_identical_masks`); where some
    mask has several models the noise ceiling is estimated
    (:func:`~dm_assets.evaluation.ceiling.estimate_noise_ceiling`). Formulas and the treatment
    of constant columns: see the module docstring. Spearman correlations rank each column with
    average ranks for ties and correlate the ranks, vectorized over targets.
    """
    pred = as_matrix(predicted, "predicted")
    act = as_matrix(actual, "actual")
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
    group_index = index_groups(groups, n) if groups is not None else None
    if group_index is not None and (len(group_index[1]) < 2 or not (group_index[1] >= 2).any()):
        group_index = None  # no replicates (or a single mask): no ceiling
    lds = np.empty(t)
    pearson = np.empty(t)
    r2 = np.empty(t)
    ceiling_columns = np.full((3, t), np.nan)
    n_constant_predictions = 0
    constant_all = np.zeros(t, dtype=bool)
    for lo, hi in column_slices(n, t):
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
            parts = ceiling_per_column(a, rank_a, *group_index)
            ceiling_columns[:, lo:hi] = np.where(constant, np.nan, parts)
    return Evaluation(
        lds=nanmean(lds),
        lds_per_target=lds,
        pearson=nanmean(pearson),
        pearson_per_target=pearson,
        r2=nanmean(r2),
        r2_per_target=r2,
        n_models=n,
        n_targets=t,
        n_constant_targets=int(constant_all.sum()),
        n_constant_predictions=n_constant_predictions,
        ceiling=None
        if group_index is None
        else noise_ceiling_from_columns(ceiling_columns, group_index[1]),
    )
