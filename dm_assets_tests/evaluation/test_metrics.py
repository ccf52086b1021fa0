"""Evaluation: the scores against scipy/numpy/sklearn references, the noise ceiling against its
analytic value and Monte Carlo simulation, the LDS curve against a direct fit, the plots."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import r2_score

from dm_assets.evaluation import metrics as evaluation_module
from dm_assets.evaluation.metrics import (
    CurvePoint,
    estimate_noise_ceiling,
    evaluate,
    group_identical_masks,
    lds_curve,
    plot_lds_curve,
    plot_predicted_vs_actual,
    predict,
)
from dm_assets.regression.compute_datamodels import compute_datamodels
from dm_assets.regression.config import RegressionConfig, load_config
from dm_assets.regression.data import ArraySource
from dm_assets.regression.gram import fit_gram
from dm_assets_tests.helpers import planted_problem


def spearman_ceiling(rho: float) -> float:
    """Spearman(s, s + e) for Gaussian s, e with reliability rho = var s / (var s + var e)."""
    return 6 / math.pi * math.asin(math.sqrt(rho) / 2)


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
    monkeypatch.setattr(evaluation_module, "_CHUNK_VALUES", 150)  # 2 columns per slice
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


def test_group_identical_masks_numbers_by_first_appearance() -> None:
    rng = np.random.default_rng(8)
    distinct = rng.random((5, 19)) < 0.5
    order = np.array([3, 0, 3, 1, 4, 0, 2, 3])
    groups = group_identical_masks(distinct[order])
    np.testing.assert_array_equal(groups, [0, 1, 0, 2, 3, 1, 4, 0])
    np.testing.assert_array_equal(group_identical_masks(distinct[order].astype(np.uint8)), groups)
    with pytest.raises(ValueError, match=r"masks must be \(n, p\)"):
        group_identical_masks(distinct[0])


# ----------------------------------------------------------------------------- noise ceiling


def gaussian_replicates(
    rho: float, sizes: np.ndarray, t: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(signal, outputs, groups)``: per group a signal s ~ N(0, rho), per model output
    s + e with e ~ N(0, 1 - rho); ``sizes`` models per group; t independent targets."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    signal = (rng.normal(size=(len(sizes), t)) * math.sqrt(rho))[groups]
    outputs = signal + rng.normal(size=signal.shape) * math.sqrt(1 - rho)
    return signal, outputs, groups


def test_analytic_spearman_ceiling_matches_monte_carlo() -> None:
    rng = np.random.default_rng(9)
    for rho in (0.2, 0.6, 0.9):
        s = rng.normal(size=200_000) * math.sqrt(rho)
        y = s + rng.normal(size=s.size) * math.sqrt(1 - rho)
        simulated = scipy.stats.spearmanr(s, y)[0]
        # standard error of a Spearman correlation at n = 2e5 is below 0.0025
        assert simulated == pytest.approx(spearman_ceiling(rho), abs=0.005)


@pytest.mark.parametrize("rho", [0.2, 0.6, 0.9])
@pytest.mark.parametrize("design", ["pairs", "mixed"])
def test_noise_ceiling_recovers_the_analytic_value(rho: float, design: str) -> None:
    rng = np.random.default_rng(10)
    # pairs, or unequal groups with singletons
    sizes = np.full(1000, 2) if design == "pairs" else rng.choice([1, 2, 3, 5], size=700)
    signal, outputs, groups = gaussian_replicates(rho, sizes, t=100, seed=int(rho * 10))
    result = evaluate(signal, outputs, groups=groups)
    ceiling = result.ceiling
    assert ceiling is not None
    assert ceiling.n_groups == len(sizes)
    assert ceiling.n_replicated_groups == int((sizes >= 2).sum())
    assert ceiling.n_replicated_models == int(sizes[sizes >= 2].sum())
    # per target the estimate's sd is at most ~0.04 (rho = 0.2, pairs); the mean over 100
    # independent targets has sd <= 0.004, and the bias (sqrt of a noisy rho) is below 0.002
    assert ceiling.lds == pytest.approx(spearman_ceiling(rho), abs=0.012)
    assert ceiling.pearson == pytest.approx(math.sqrt(rho), abs=0.012)
    assert np.nanmean(ceiling.reliability_per_target) == pytest.approx(rho, abs=0.012)
    # the ceiling is what the perfect predictor (the signal itself) actually scores
    assert result.lds == pytest.approx(ceiling.lds, abs=0.012)
    assert result.pearson == pytest.approx(ceiling.pearson, abs=0.012)
    standalone = estimate_noise_ceiling(outputs, groups)
    assert standalone is not None
    np.testing.assert_array_equal(standalone.lds_per_target, ceiling.lds_per_target)


def test_noise_ceiling_ignores_increasing_transforms_of_the_output() -> None:
    _, outputs, groups = gaussian_replicates(0.5, np.full(300, 3), t=20, seed=11)
    plain = estimate_noise_ceiling(outputs, groups)
    bent = estimate_noise_ceiling(np.exp(2 * outputs) + outputs**3, groups)
    assert plain is not None and bent is not None
    np.testing.assert_allclose(bent.lds_per_target, plain.lds_per_target, rtol=0, atol=1e-12)
    assert abs(bent.pearson - plain.pearson) > 0.02  # the Pearson ceiling is not rank-based


def test_noise_ceiling_on_planted_datamodels_matches_monte_carlo() -> None:
    """Bernoulli masks, a linear datamodel of 50 of 200 examples, Gaussian training noise with
    the signal's variance, outputs bent by exp: the estimate from 600 masks x 3 seeds against
    the Spearman of the true signal and one output on 50,000 fresh models."""
    rng = np.random.default_rng(12)
    p, t, k = 200, 16, 3
    weight = np.zeros((p, t))
    for j in range(t):
        weight[rng.choice(p, 50, replace=False), j] = rng.normal(size=50)
    scale = np.sqrt(0.25 * (weight**2).sum(0))  # sd of the signal over masks

    def models(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        signal = (masks @ weight) / scale
        return signal, np.exp(0.5 * (signal + rng.normal(size=signal.shape)))

    masks = np.repeat(rng.random((600, p)) < 0.5, k, axis=0)
    _, outputs = models(masks)
    ceiling = estimate_noise_ceiling(outputs, group_identical_masks(masks))
    assert ceiling is not None and ceiling.n_replicated_groups == 600
    signal, fresh = models(rng.random((50_000, p)) < 0.5)
    simulated = evaluate(signal, fresh).lds  # Spearman(E[y | mask], y), per target, averaged
    assert simulated == pytest.approx(spearman_ceiling(0.5), abs=0.01)
    # 16 targets x 600 groups of 3: sd of the mean estimate ~0.005; the signal's departure
    # from Gaussian (50 terms) costs at most ~0.004 (simulated): 0.015 is about 3 sd
    assert ceiling.lds == pytest.approx(simulated, abs=0.015)


def test_noise_ceiling_extremes_and_absence() -> None:
    _, noiseless, groups = gaussian_replicates(1.0, np.full(100, 2), t=3, seed=13)
    top = estimate_noise_ceiling(noiseless, groups)
    assert top is not None
    np.testing.assert_allclose(top.lds_per_target, 1.0, atol=1e-12)
    _, noise, groups = gaussian_replicates(0.0, np.full(1000, 2), t=50, seed=14)
    bottom = estimate_noise_ceiling(noise, groups)
    assert bottom is not None and bottom.lds < 0.15  # sqrt of a rho clipped at 0: small, >= 0
    distinct = np.arange(len(noise))
    assert estimate_noise_ceiling(noise, distinct) is None
    assert estimate_noise_ceiling(noise, np.zeros(len(noise), dtype=int)) is None
    assert evaluate(noise, noise, groups=distinct).ceiling is None
    noise[0, 0] = np.inf
    with pytest.raises(ValueError, match="actual has NaN or infinite"):
        estimate_noise_ceiling(noise, groups)


# -------------------------------------------------------------------------------- LDS curve


def curve_config(
    tmp_path: Path, num_train: int = 2100, num_val: int = 450, **cfg: object
) -> RegressionConfig:
    return load_config(
        None,
        {
            "data": {"data_path": "unused", "num_train": num_train, "num_val": num_val},
            "cfg": {
                "k": 12,
                "batch_size": 500,
                "out_dir": str(tmp_path / "out"),
                "device": "cpu",
                "solver": "gram",
                **cfg,
            },
        },
    )


def test_lds_curve_grows_and_ends_at_the_direct_fit(tmp_path: Path) -> None:
    # 45 of 150 examples matter: a few hundred models are needed; rows 2100 / 450 / 450
    prob = planted_problem(n=3000, p=150, t=4, density=0.3, seed=3)
    config = curve_config(tmp_path)
    points = lds_curve(prob.x, prob.y, config=config, sizes=[60, 250, 800, 2100])
    assert [p.n_train for p in points] == [60, 250, 800, 2100]
    lds = [p.lds for p in points]
    # noise 0.5 of the signal's sd: the ceiling is 6/pi asin(sqrt(0.8)/2) = 0.885
    assert 0.85 < lds[-1] < 0.9 and lds[-1] > lds[0] + 0.05
    assert all(b > a - 0.01 for a, b in itertools.pairwise(lds))
    assert all(p.seconds > 0 and p.evaluation.n_models == 450 for p in points)
    assert [p.n_models_used for p in points] == [510, 700, 1250, 2550]  # refit on + 450
    direct = compute_datamodels(config, source=ArraySource(prob.x, prob.y))
    held = prob.test
    expected = evaluate(predict(direct.result.seed_dict(), prob.x[held]), prob.y[held])
    # same rows, same batches, same solver: the same numbers
    np.testing.assert_allclose(points[-1].evaluation.lds_per_target, expected.lds_per_target)
    assert points[-1].lds == pytest.approx(expected.lds, abs=1e-12)
    assert points[-1].r2 == pytest.approx(expected.r2, abs=1e-9)


def test_lds_curve_options(tmp_path: Path) -> None:
    prob = planted_problem(n=700, p=40, t=2, seed=4)
    x = np.concatenate([prob.x, prob.x[-50:]])  # 50 held-out masks trained twice
    y = np.concatenate([prob.y, prob.y[-50:] + 0.1 * prob.y.std(0)])
    held = np.arange(600, 750)
    config = curve_config(tmp_path, batch_size=300)
    points = lds_curve(
        x,
        y,
        config=config,
        sizes=[30, 400],
        num_train=400,
        num_val=200,
        held_out=held,
        groups=group_identical_masks(x[held]),
        config_overrides={"cfg": {"k": 6}},
    )
    assert [p.n_train for p in points] == [30, 400]
    assert [p.n_models_used for p in points] == [230, 600]
    no_refit = lds_curve(
        x,
        y,
        config=config,
        sizes=[30],
        num_train=400,
        num_val=200,
        config_overrides={"cfg": {"refit": False}},
    )
    assert no_refit[0].n_models_used == 30
    ceiling = points[0].evaluation.ceiling
    assert ceiling is not None and ceiling.n_replicated_groups == 50
    single = lds_curve(x, y[:, 0], config=config, sizes=[400], num_train=400, num_val=200)
    assert single[0].evaluation.n_targets == 1 and single[0].evaluation.n_models == 150


def test_lds_curve_rejects_bad_inputs_naming_them(tmp_path: Path) -> None:
    prob = planted_problem(n=400, p=20, t=2, seed=5)
    config = curve_config(tmp_path, num_train=250, num_val=50, batch_size=100)
    with pytest.raises(ValueError) as info:
        lds_curve(prob.x, prob.y, config=config, sizes=[300, 1, 1])
    text = str(info.value)
    assert "must be increasing" in text and "at least 2" in text
    assert "at most num_train=250" in text
    with pytest.raises(ValueError, match="sizes is empty"):
        lds_curve(prob.x, prob.y, config=config, sizes=[])
    with pytest.raises(ValueError, match="held_out includes rows below num_train"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=slice(200, 400))
    with pytest.raises(ValueError, match=r"held_out has rows outside \[0, 400\)"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=[350, 400, 401])
    with pytest.raises(ValueError, match="held_out selects 2 model"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=slice(300, 302))
    with pytest.raises(ValueError, match=r"y must be \(n_models, t\)"):
        lds_curve(prob.x, prob.y[:-1], config=config, sizes=[50])
    with pytest.raises(ValueError, match="no model is left to hold out"):
        lds_curve(prob.x[:300], prob.y[:300], config=config, sizes=[50])
    with pytest.raises(ValueError, match="groups must give one id per held-out row"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], groups=np.zeros(3))
    with pytest.raises(ValueError, match=r"cfg\.solver='magic'"):
        lds_curve(
            prob.x,
            prob.y,
            config=config,
            sizes=[50],
            config_overrides={"cfg": {"solver": "magic"}},
        )


# ------------------------------------------------------------------------------------ plots


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_write_pngs(tmp_path: Path) -> None:
    predicted, actual = tied_scores(15, n=80, t=10)
    result = evaluate(predicted, actual)
    points = [
        CurvePoint(n, n + 100, lds, lds + 0.02, lds - 0.1, 0.5, result)
        for n, lds in [(50, 0.2), (200, 0.45), (1000, 0.6)]
    ]
    no_refit = [CurvePoint(n, n, 0.5, 0.5, 0.2, 0.1, result) for n in (100, 200)]
    assert_png(plot_lds_curve(points, tmp_path / "a" / "curve.png", title="t", ceiling=0.7))
    assert_png(plot_lds_curve(points[1:2], tmp_path / "one.png"))
    assert_png(plot_lds_curve(no_refit, tmp_path / "linear.png"))
    assert_png(plot_lds_curve([], tmp_path / "empty.png", ceiling=0.7))
    assert_png(plot_predicted_vs_actual(predicted, actual, tmp_path / "pva.png"))
    assert_png(plot_predicted_vs_actual(predicted, actual, tmp_path / "two.png", targets=[3, 1]))
    with pytest.raises(ValueError, match=r"targets \[10\] are not columns"):
        plot_predicted_vs_actual(predicted, actual, tmp_path / "x.png", targets=[10])
    with pytest.raises(ValueError, match="targets has 3 entries but max_panels=2"):
        plot_predicted_vs_actual(
            predicted, actual, tmp_path / "x.png", targets=[0, 1, 2], max_panels=2
        )
