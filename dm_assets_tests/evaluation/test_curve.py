"""The budget-honest LDS curve: each point N uses exactly rows [0, N) (K-fold lambda choice and
refit), slopes per doubling from paired resamples, grid-end warnings with their fractions, the
main fit's grid ends, input checks, JSON and the figure."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dm_assets.evaluation.ceiling import group_identical_masks
from dm_assets.evaluation.curve import (
    LdsCurve,
    grid_end_warning,
    lambda_at_grid_ends,
    lds_curve,
)
from dm_assets.evaluation.figures import budget_curve_figure, plot_lds_curve
from dm_assets.evaluation.metrics import predict
from dm_assets.evaluation.uncertainty import bootstrap_lds
from dm_assets.regression.config import RegressionConfig, load_config
from dm_assets.regression.cross_validation import cross_validated_lasso, lasso_cv_options
from dm_assets.regression.data import ArraySource
from dm_assets.regression.gram import fit_gram
from dm_assets_tests.helpers import PNG_SIGNATURE, planted_problem


def curve_config(
    num_train: int, num_val: int, *, k: int = 12, eps: float = 1e-2
) -> RegressionConfig:
    return load_config(
        None,
        {
            "data": {"data_path": "unused", "num_train": num_train, "num_val": num_val, "seed": 3},
            "cfg": {
                "k": k,
                "eps": eps,
                "batch_size": 128,
                "out_dir": "unused",
                "device": "cpu",
                "solver": "gram",
            },
        },
    )


def noise_and_signal(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """40 features; 3 targets of pure noise and one nearly noiseless linear target."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 40)) < 0.5
    signal = x @ rng.normal(size=(40, 1)) + 0.01 * rng.normal(size=(n, 1))
    return x, np.concatenate([rng.normal(size=(n, 3)), signal], axis=1)


def test_points_use_exactly_their_first_n_rows_and_grow() -> None:
    prob = planted_problem(n=1000, p=30, t=4, density=0.3, seed=11)
    config = curve_config(600, 200)  # rows [0, 800) are the fit's, [800, 1000) held out
    held = slice(800, 1000)
    curve = lds_curve(
        prob.x, prob.y, config=config, sizes=[40, 160, 640], held_out=held, resamples=200
    )
    assert [p.n_models for p in curve.points] == [40, 160, 640]
    assert curve.folds == 5 and curve.resamples == 200
    options = lasso_cv_options(config)
    for point in curve.points:
        n = point.n_models
        direct = cross_validated_lasso(prob.x[:n], prob.y[:n], folds=5, **options)
        assert point.fit is not None and point.fit.n == n
        torch.testing.assert_close(point.fit.weight, direct.weight, rtol=0, atol=0)
        predicted = predict(direct.seed_dict(), prob.x[800:])
        assert point.evaluation.n_models == 200
        np.testing.assert_allclose(
            point.evaluation.lds_per_target,
            predict_lds(predicted, prob.y[800:]),
            rtol=1e-12,
        )
        assert point.seconds > 0
        assert point.lds_ci is not None and point.lds_ci[0] <= point.lds <= point.lds_ci[1]
    lds = [p.lds for p in curve.points]
    # noise 0.5 of the signal's sd: the ceiling is 6/pi asin(sqrt(0.8)/2) = 0.885
    assert lds[0] + 0.03 < lds[1] and lds[1] - 0.01 < lds[2] < 0.9

    # rows from N on (the rest of the fit's rows and the unused ones) do not touch point N
    x2, y2 = prob.x.copy(), prob.y.copy()
    rng = np.random.default_rng(0)
    x2[160:800] = rng.random((640, 30)) < 0.5
    y2[160:800] = rng.normal(size=(640, 4))
    again = lds_curve(x2, y2, config=config, sizes=[40, 160], held_out=held, resamples=200)
    for a, b in zip(again.points, curve.points[:2], strict=True):
        assert a.lds == b.lds and a.lds_ci == b.lds_ci
        assert a.fit is not None and b.fit is not None
        torch.testing.assert_close(a.fit.weight, b.fit.weight, rtol=0, atol=0)
    # ... while a change inside [0, N) does
    x2[:40] = ~x2[:40]
    moved = lds_curve(x2, y2, config=config, sizes=[40], held_out=held, resamples=0)
    assert moved.points[0].lds != curve.points[0].lds


def predict_lds(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    from scipy.stats import spearmanr

    return np.array([spearmanr(predicted[:, j], actual[:, j])[0] for j in range(actual.shape[1])])


def test_slope_intervals_come_from_paired_resamples() -> None:
    prob = planted_problem(n=700, p=30, t=4, density=0.3, seed=12)
    # 50 held-out masks trained twice (another seed: output noise), as the experiments do
    x = np.concatenate([prob.x, prob.x[-50:]])
    y = np.concatenate([prob.y, prob.y[-50:] + 0.3 * prob.y.std(0)])
    held = np.arange(500, 750)
    groups = group_identical_masks(x[held])
    config = curve_config(400, 100)
    curve = lds_curve(
        x,
        y,
        config=config,
        sizes=[20, 80, 320],
        held_out=held,
        groups=groups,
        seed=5,
        resamples=300,
    )
    assert curve.points[0].scores is not None
    assert curve.points[0].scores.noise_ceiling is not None  # replicates reached the scores
    predictions = [predict(p.fit.seed_dict(), x[held]) for p in curve.points if p.fit]
    draws = bootstrap_lds(predictions, y[held], groups=groups, resamples=300, seed=5)
    for i, slope in enumerate(curve.slopes):
        a, b = curve.points[i], curve.points[i + 1]
        assert (slope.n_from, slope.n_to) == (a.n_models, b.n_models)
        assert slope.gain_per_doubling == pytest.approx((b.lds - a.lds) / 2)  # 4x: 2 doublings
        gains = (draws[i + 1] - draws[i]) / 2
        q_lo, q_hi = np.quantile(gains, [0.025, 0.975])
        g = slope.gain_per_doubling
        assert slope.ci == pytest.approx((2 * g - q_hi, 2 * g - q_lo))
        # paired: far narrower than the two points' own intervals would suggest together
        assert slope.ci is not None and a.lds_ci is not None and b.lds_ci is not None
        assert slope.ci[1] - slope.ci[0] < (a.lds_ci[1] - a.lds_ci[0]) + (b.lds_ci[1] - b.lds_ci[0])
    assert curve.slopes[0].ci is not None and curve.slopes[0].ci[0] > 0  # 20 -> 80 pays
    expected_stop = next((s.n_from for s in curve.slopes if s.ci and s.ci[0] <= 0 <= s.ci[1]), None)
    assert curve.stops_paying_at == expected_stop
    report = json.loads(json.dumps(curve.to_dict()))
    assert [p["n_models"] for p in report["points"]] == [20, 80, 320]
    assert report["bootstrap"] == {
        "resamples": 300,
        "level": 0.95,
        "seed": 5,
        "unit": "held-out masks",
    }
    assert report["x_label"] == "models trained (N; lambda chosen by 5-fold inside them)"
    assert len(report["slopes"]) == 2 and len(report["slopes"][0]["ci"]) == 2


def test_noise_stops_paying_at_once_and_grid_ends_warn_with_fractions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # two lambdas: lambda_max or nearly least squares; on noise least squares loses by ~4.5
    # standard deviations (see test_cross_validation), on the clean signal it wins outright
    x, y = noise_and_signal(8, 1000)
    config = curve_config(500, 300, k=2, eps=1e-3)
    with caplog.at_level(logging.WARNING, logger="dm_assets.evaluation.curve"):
        curve = lds_curve(x, y, config=config, sizes=[200, 400, 800], held_out=slice(800, 1000))
    for point in curve.points:
        assert (point.lambda_at_max, point.lambda_at_min) == (0.75, 0.25)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 3
    for message, n in zip(messages, (200, 400, 800), strict=True):
        assert (
            f"75.0% of targets (3 of 4) chose the grid's largest lambda (lambda_max) at N={n}"
            in message
        )
        assert "predict a constant" in message
        assert "25.0% of targets (1 of 4) chose the grid's smallest lambda" in message
        assert "lower cfg.eps" in message
    # the noise targets alone: constant predictions score LDS 0 at every N and on every
    # resample, so no doubling is shown to pay, from the first size on
    noise = lds_curve(
        x, y[:, :3], config=config, sizes=[200, 400, 800], held_out=slice(800, 1000), resamples=50
    )
    assert [p.lds for p in noise.points] == [0.0, 0.0, 0.0]
    assert [p.lambda_at_max for p in noise.points] == [1.0, 1.0, 1.0]
    assert all(s.ci == (0.0, 0.0) for s in noise.slopes)
    assert noise.stops_paying_at == 200
    assert curve.slopes[0].ci is not None  # the mixed curve has intervals too


def test_grid_end_warning_and_the_main_fits_grid_ends() -> None:
    assert grid_end_warning([3, 4, 5], 10, "in the main fit") is None
    assert grid_end_warning([0, 0, 0], 1, "x") is None  # one lambda: nothing was chosen
    text = grid_end_warning(np.array([0, 9, 4, 4, 4, 4, 4, 4]), 10, "in the main fit")
    assert text is not None
    assert (
        "12.5% of targets (1 of 8) chose the grid's largest lambda (lambda_max) in the main" in text
    )
    assert "12.5% of targets (1 of 8) chose the grid's smallest lambda" in text

    x, y = noise_and_signal(9, 600)
    cv = cross_validated_lasso(x, y, folds=4, k=2, eps=1e-3)
    assert lambda_at_grid_ends(cv) == (0.75, 0.25)
    src = ArraySource(x, y)
    path = fit_gram(src, np.arange(400), np.arange(400, 600), k=2, eps=1e-3, min_lambdas=2)
    assert lambda_at_grid_ends(path) == pytest.approx(
        (float((path.best_step == 0).float().mean()), float((path.best_step == 1).float().mean()))
    )
    weights = path.seed_dict()
    assert lambda_at_grid_ends(weights, eps=1e-3) == lambda_at_grid_ends(path)
    assert lambda_at_grid_ends({"weight": weights["weight"]}) is None  # lam not recorded
    with pytest.raises(ValueError, match=r"pass the fit's cfg\.eps"):
        lambda_at_grid_ends(weights)
    constant = {"lam": torch.zeros(2), "lam_max": torch.zeros(2)}
    assert lambda_at_grid_ends(constant, eps=0.01) == (1.0, 0.0)


def test_bad_curves_are_refused_naming_every_problem() -> None:
    prob = planted_problem(n=400, p=10, t=2, seed=5)
    config = curve_config(250, 50)
    held = slice(300, 400)
    with pytest.raises(ValueError) as info:
        lds_curve(prob.x, prob.y, config=config, sizes=[350, 4, 4], held_out=held)
    text = str(info.value)
    assert "must be increasing" in text
    assert "sizes [4, 4] are below 2 * folds = 10" in text
    assert "sizes [350] exceed the 300 fitted models" in text
    with pytest.raises(ValueError, match=r"folds=1: choosing lambda by K-fold needs"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], folds=1, held_out=held)
    with pytest.raises(ValueError, match="sizes is empty"):
        lds_curve(prob.x, prob.y, config=config, sizes=[], held_out=held)
    with pytest.raises(ValueError, match="held_out includes rows below the 300 fitted models"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=slice(200, 400))
    with pytest.raises(ValueError, match=r"held_out has rows outside \[0, 400\)"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=[350, 400, 401])
    with pytest.raises(ValueError, match="held_out selects 2 model"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=slice(300, 302))
    with pytest.raises(ValueError, match=r"y must be \(n_models, t\)"):
        lds_curve(prob.x, prob.y[:-1], config=config, sizes=[50], held_out=held)
    with pytest.raises(ValueError, match="no model is left to hold out"):
        lds_curve(prob.x[:300], prob.y[:300], config=config, sizes=[50], held_out=held)
    with pytest.raises(ValueError, match="groups must give one id per held-out row"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=held, groups=np.zeros(3))
    # fitted overrides the config's split: 350 fitted rows allow N = 350
    curve = lds_curve(
        prob.x,
        prob.y[:, 0],
        config=config,
        sizes=[350],
        held_out=held.start + np.arange(50, 100),
        fitted=350,
        resamples=0,
    )
    point = curve.points[0]
    assert point.n_models == 350 and point.evaluation.n_targets == 1 and point.lds_ci is None
    assert curve.slopes == [] and curve.stops_paying_at is None


def test_the_curve_figure(tmp_path: Path) -> None:
    prob = planted_problem(n=600, p=20, t=3, density=0.3, seed=13)
    curve = lds_curve(
        prob.x,
        prob.y,
        config=curve_config(400, 100),
        sizes=[20, 80, 320],
        held_out=slice(500, 600),
        resamples=100,
    )
    fig = budget_curve_figure(curve, title="t", ceiling=0.9, ceiling_ci=(0.85, 0.93))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "models trained (N; lambda chosen by 5-fold inside them)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["20", "80", "320"]
    for path, value in (
        (tmp_path / "a" / "curve.png", curve),
        (tmp_path / "dict.png", json.loads(json.dumps(curve.to_dict()))),
        (tmp_path / "none.png", None),
        (tmp_path / "empty.png", LdsCurve([], [], None, folds=5, resamples=0, seed=0)),
    ):
        out = plot_lds_curve(value, path, title="t", ceiling=0.9, ceiling_ci=(0.85, 0.93))
        data = out.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    empty = budget_curve_figure(None)
    assert "no curve computed" in empty.axes[0].texts[0].get_text()
    assert math.isclose(
        curve.slopes[0].gain_per_doubling * 2, curve.points[1].lds - curve.points[0].lds
    )
