"""Scores of predictions against held-out outputs, against scipy/numpy/sklearn references, and
predictions from fitted weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import r2_score

from dm_assets.evaluation import columns
from dm_assets.evaluation.metrics import evaluate, predict
from dm_assets.regression.data import ArraySource
from dm_assets.regression.gram import fit_gram
from dm_assets_tests.helpers import planted_problem


def tied_scores(seed: int, n: int = 60, t: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Correlated predictions and outputs rounded so that most columns have ties."""
    rng = np.random.default_rng(seed)
    actual = rng.normal(size=(n, t))
    predicted = actual + rng.normal(size=(n, t)) * rng.uniform(0.2, 3.0, size=t)
    actual[:, ::2] = np.round(actual[:, ::2] * 2)  # a handful of distinct values: many ties
    predicted[:, ::3] = np.round(predicted[:, ::3])
    return predicted, actual


# ---------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_references_column_by_column(seed: int) -> None:
    predicted, actual = tied_scores(seed)
    result = evaluate(predicted, actual)
    spearman = [scipy.stats.spearmanr(predicted[:, j], actual[:, j])[0] for j in range(25)]
    pearson = [np.corrcoef(predicted[:, j], actual[:, j])[0, 1] for j in range(25)]
    r2 = r2_score(actual, predicted, multioutput="raw_values")
    # both sides are a few float64 reductions over 60 values: agreement to rounding
    np.testing.assert_allclose(result.lds_per_target, spearman, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.pearson_per_target, pearson, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.r2_per_target, r2, rtol=0, atol=1e-12)
    assert result.lds == pytest.approx(np.mean(spearman), abs=1e-12)
    assert result.pearson == pytest.approx(np.mean(pearson), abs=1e-12)
    assert result.r2 == pytest.approx(np.mean(r2), abs=1e-12)
    assert (result.n_models, result.n_targets) == (60, 25)
    assert result.n_constant_targets == result.n_constant_predictions == 0
    assert result.ceiling is None and result.noise_ceiling is None


def test_column_slices_give_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    predicted, actual = tied_scores(3)
    groups = np.repeat(np.arange(30), 2)
    whole = evaluate(predicted, actual, groups=groups)
    monkeypatch.setattr(columns, "CHUNK_VALUES", 150)  # 2 columns per slice
    sliced = evaluate(predicted, actual, groups=groups)
    # the same arithmetic per column; only SIMD reduction order may differ in the last bit
    for name in ("lds_per_target", "pearson_per_target", "r2_per_target"):
        np.testing.assert_allclose(getattr(sliced, name), getattr(whole, name), atol=1e-14)
    assert whole.ceiling is not None and sliced.ceiling is not None
    np.testing.assert_allclose(
        sliced.ceiling.lds_per_target, whole.ceiling.lds_per_target, atol=1e-14
    )


def test_constant_targets_are_nan_excluded_and_counted() -> None:
    predicted, actual = tied_scores(4, t=6)
    actual[:, 1] = 2.5
    actual[:, 4] = -1.0
    groups = np.repeat(np.arange(30), 2)
    result = evaluate(predicted, actual, groups=groups)
    assert result.n_constant_targets == 2
    for values in (result.lds_per_target, result.pearson_per_target, result.r2_per_target):
        assert np.isnan(values[[1, 4]]).all() and np.isfinite(values[[0, 2, 3, 5]]).all()
    assert result.ceiling is not None
    assert np.isnan(result.ceiling.lds_per_target[[1, 4]]).all()
    kept = [0, 2, 3, 5]
    assert result.lds == pytest.approx(result.lds_per_target[kept].mean(), abs=1e-15)
    assert result.r2 == pytest.approx(result.r2_per_target[kept].mean(), abs=1e-15)
    assert result.noise_ceiling == pytest.approx(result.ceiling.lds_per_target[kept].mean())


def test_constant_prediction_scores_zero_correlation() -> None:
    predicted, actual = tied_scores(5, t=4)
    predicted[:, 2] = 0.7  # all weights zero: the bias alone
    result = evaluate(predicted, actual)
    assert result.n_constant_predictions == 1 and result.n_constant_targets == 0
    assert result.lds_per_target[2] == 0.0 and result.pearson_per_target[2] == 0.0
    expected_r2 = r2_score(actual[:, 2], predicted[:, 2])
    assert result.r2_per_target[2] == pytest.approx(expected_r2, abs=1e-12)


def test_perfect_predictor_scores_one() -> None:
    rng = np.random.default_rng(6)
    actual = rng.normal(size=(200, 8))
    perfect = evaluate(actual.copy(), actual)
    assert perfect.lds == 1.0 and perfect.pearson == 1.0 and perfect.r2 == 1.0
    # any increasing function of the truth ranks models perfectly; Pearson and R^2 see the bend
    bent = evaluate(np.exp(3 * actual), actual)
    assert bent.lds == pytest.approx(1.0, abs=1e-14)
    assert bent.pearson < 0.9 and bent.r2 < 0


def test_evaluate_rejects_bad_inputs_naming_them() -> None:
    predicted, actual = tied_scores(7)
    with pytest.raises(ValueError, match=r"predicted has shape \(60, 24\) but actual \(60, 25\)"):
        evaluate(predicted[:, :24], actual)
    with pytest.raises(ValueError, match=r"predicted must be \(n_models, n_targets\).*reshape"):
        evaluate(predicted[:, 0], actual[:, 0])
    bad = actual.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="actual has NaN or infinite"):
        evaluate(predicted, bad)
    with pytest.raises(ValueError, match="at least 3"):
        evaluate(predicted[:2], actual[:2])
    with pytest.raises(ValueError, match=r"groups must be \(60,\).*group_identical_masks"):
        evaluate(predicted, actual, groups=np.zeros(59, dtype=int))
    with pytest.raises(ValueError, match="groups must hold integer ids"):
        evaluate(predicted, actual, groups=np.zeros(60))


# ------------------------------------------------------------------------------- predict


def test_predict_equals_the_fitted_result() -> None:
    prob = planted_problem(n=800, p=60, t=3, seed=2)
    result = fit_gram(
        ArraySource(prob.x, prob.y), np.arange(500), np.arange(500, 650), k=8, eps=0.01
    )
    masks = prob.x[prob.test]
    expected = result.predict(masks).numpy()
    # float32 (LassoPathResult) against float64 (predict): float32 rounding of O(10) values
    scale = np.abs(expected).max()
    from_torch = predict(result.seed_dict(), masks)
    assert from_torch.dtype == np.float64 and from_torch.shape == (len(prob.test), 3)
    np.testing.assert_allclose(from_torch, expected, rtol=0, atol=1e-5 * scale)
    as_numpy = {k: v.numpy() for k, v in result.seed_dict().items()}
    np.testing.assert_array_equal(predict(as_numpy, masks), from_torch)
    chunked = predict(as_numpy, masks, chunk_rows=7)  # BLAS may block 7 rows differently
    np.testing.assert_allclose(chunked, from_torch, rtol=0, atol=1e-12 * scale)
    # the formula the docstring states, unfolded, in float64
    w = {k: v.astype(np.float64) for k, v in as_numpy.items()}
    direct = ((masks - w["mean"]) / w["std"]) @ w["weight"] + w["bias"]
    np.testing.assert_allclose(from_torch, direct, rtol=0, atol=1e-12 * scale)


def test_predict_rejects_bad_weights_and_masks() -> None:
    weights = {
        "weight": torch.zeros(5, 2),
        "bias": torch.zeros(2),
        "mean": torch.zeros(5),
        "std": torch.ones(5),
    }
    masks = np.zeros((4, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"weights lacks \['std'\].*datamodels.pt"):
        predict({k: v for k, v in weights.items() if k != "std"}, masks)
    with pytest.raises(ValueError, match=r"masks must be \(n, 5\)"):
        predict(weights, masks[:, :4])
    with pytest.raises(ValueError, match=r"weights\['bias'\] must be \(2,\)") as info:
        predict({**weights, "bias": torch.zeros(3), "std": torch.zeros(5)}, masks)
    assert "weights['std'] has entries <= 0" in str(info.value)  # every problem at once
