"""Scoring an attribution matrix: the same as score_held_out on masks @ scores, and the same
LDS as dattri's own metric."""

from __future__ import annotations

import numpy as np
import pytest

from dm_assets.attribution import dattri_lds, predict_from_scores, score_attribution
from dm_assets.evaluation.ceiling import group_identical_masks
from dm_assets.evaluation.uncertainty import score_held_out


def _problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-size masks (each 10 distinct masks trained 3 times), scores and outputs that
    follow them with noise."""
    rng = np.random.default_rng(seed)
    p, t = 20, 5
    distinct = np.zeros((10, p), dtype=bool)
    for row in distinct:
        row[rng.choice(p, p // 2, replace=False)] = True
    masks = np.repeat(distinct, 3, axis=0)
    scores = rng.normal(size=(p, t))
    actual = masks @ scores + rng.normal(size=(len(masks), t))
    return masks, scores, actual


@pytest.mark.parametrize("seed", [0, 1])
def test_scoring_is_score_held_out_of_masks_times_scores(seed: int) -> None:
    masks, scores, actual = _problem(seed)
    ours = score_attribution(scores, masks, actual, resamples=200, seed=seed)
    reference = score_held_out(
        masks.astype(float) @ scores,
        actual,
        groups=group_identical_masks(masks),
        resamples=200,
        seed=seed,
    )
    assert ours.to_dict() == reference.to_dict()
    assert ours.noise_ceiling is not None and ours.seeds == 3
    np.testing.assert_array_equal(predict_from_scores(scores, masks), masks @ scores)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_our_lds_equals_dattris(seed: int) -> None:
    masks, scores, actual = _problem(seed)
    ours = score_attribution(scores, masks, actual, resamples=0)
    assert dattri_lds(scores, masks, actual) == pytest.approx(ours.lds, abs=1e-12)


def test_dattri_cannot_take_masks_of_unequal_size() -> None:
    masks, scores, actual = _problem(0)
    masks = masks.copy()
    masks[0, ~masks[0]] = True
    assert dattri_lds(scores, masks, actual) is None


def test_shapes_are_checked() -> None:
    masks, scores, actual = _problem(0)
    with pytest.raises(ValueError, match="masks have 20 columns but scores 19 rows"):
        score_attribution(scores[:19], masks, actual)
    with pytest.raises(ValueError, match="actual has shape"):
        score_attribution(scores, masks, actual[:, :2])
