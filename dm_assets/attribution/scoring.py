r"""Any attribution matrix scored exactly like the datamodels: on the same held-out models,
with the same LDS, interval and noise ceiling.

A score matrix ``scores`` float ``(p, t)`` predicts held-out model ``i``'s output on target
``j`` as the sum of the scores of the examples in its mask::

    predicted = masks @ scores            (n, p) @ (p, t) -> (n, t)

(no intercept: LDS is a per-target rank correlation across models, blind to a shift per target).
:func:`score_attribution` scores it with
:func:`dm_assets.evaluation.uncertainty.score_held_out` (replicate groups from
:func:`~dm_assets.evaluation.ceiling.group_identical_masks`).

:func:`dattri_lds` is the cross-check: ``dattri.metric.lds`` on the same scores, masks and
outputs, averaged over targets. dattri takes each model's mask as the list of its example
indices, so it needs masks of one size (it stacks them); its per-target Spearman is
``scipy.stats.spearmanr`` (average ranks for ties), the same as ours, except that a target
whose prediction or output is constant gets NaN there, which :func:`dattri_lds` leaves out of
the mean, while our LDS scores a constant prediction 0 (and leaves out constant outputs too).
dattri scores each row as given (one model's output), as our single-model truth does; dattri's
``calculate_lds_ground_truth`` would average the replicates first, which is our
"mean of k seeds' outputs" truth, not the one compared here.

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dm_assets.evaluation.ceiling import group_identical_masks

if TYPE_CHECKING:
    from dm_assets.evaluation.uncertainty import HeldOutScores


def _check(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray | None = None) -> None:
    problems = []
    if scores.ndim != 2:
        problems.append(f"scores must be (p, t); got shape {scores.shape}")
    if masks.ndim != 2:
        problems.append(f"masks must be (n, p); got shape {masks.shape}")
    if not problems and masks.shape[1] != scores.shape[0]:
        problems.append(
            f"masks have {masks.shape[1]} columns but scores {scores.shape[0]} rows: both must "
            "be the p training examples, in mask order"
        )
    if actual is not None and not problems and actual.shape != (masks.shape[0], scores.shape[1]):
        problems.append(
            f"actual has shape {actual.shape}; expected {(masks.shape[0], scores.shape[1])} "
            "(one row per mask, one column per column of scores)"
        )
    if scores.dtype.kind == "f" and not np.isfinite(scores).all():
        problems.append("scores has NaN or infinite entries")
    if problems:
        raise ValueError(
            "cannot score the attribution:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def predict_from_scores(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """float64 ``(n, t)``: ``masks @ scores`` for ``masks`` bool or 0/1 ``(n, p)`` and
    ``scores`` ``(p, t)``."""
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks)
    _check(scores, masks)
    return masks.astype(np.float64) @ scores


def score_attribution(
    scores: np.ndarray,
    masks: np.ndarray,
    actual: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> HeldOutScores:
    """``score_held_out(masks @ scores, actual, groups=group_identical_masks(masks),
    resamples=resamples, seed=seed)``: the LDS of ``scores`` ``(p, t)`` on held-out models with
    masks ``(n, p)`` and outputs ``actual`` ``(n, t)``, its bootstrap interval over held-out
    masks, the noise ceiling and LDS / ceiling where masks repeat."""
    from dm_assets.evaluation.uncertainty import score_held_out

    actual = np.asarray(actual, dtype=np.float64)
    predicted = predict_from_scores(scores, masks)
    _check(np.asarray(scores, dtype=np.float64), np.asarray(masks), actual)
    return score_held_out(
        predicted,
        actual,
        groups=group_identical_masks(np.asarray(masks)),
        resamples=resamples,
        seed=seed,
    )


def dattri_lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray) -> float | None:
    """The mean over targets (NaN targets left out) of ``dattri.metric.lds`` on the same
    inputs as :func:`score_attribution`; ``None`` when the masks differ in size (dattri cannot
    take them; see the module docstring)."""
    import torch
    from dattri.metric import lds

    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks) != 0
    actual = np.asarray(actual, dtype=np.float64)
    _check(scores, masks, actual)
    sizes = masks.sum(1)
    if len(sizes) == 0 or (sizes != sizes[0]).any():
        return None
    indices = torch.from_numpy(np.stack([np.flatnonzero(m) for m in masks]))
    per_target, _ = lds(torch.from_numpy(scores), (torch.from_numpy(actual), indices))
    values = per_target.numpy()
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
