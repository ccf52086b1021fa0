"""K-fold lambda choice from sufficient statistics against a brute-force K-fold, and the refit
against scikit-learn at the chosen lambda.

Tolerances: ours solves to a duality gap of ``1e-10 * var(y)`` (``tol=1e-10``) and
scikit-learn (the reference, fitted from the rows) to ``1e-13``, so objectives agree to about
``1e-10`` relative and weights, on these well-conditioned
problems, to about ``1e-5`` of their scale. The CV errors agree to ``1e-5`` relative: the
statistics sum ``X^T y`` in float32 within a batch (relative error about ``1e-7``), and the
validation error expands into sums (``y'y - 2 u'X'y + ...``) whose cancellation magnifies that
by about ``mean(y)^2 / mse`` (here ~10), while the reference sums residuals directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, lasso_path

from dm_assets.regression.config import load_config
from dm_assets.regression.cross_validation import (
    cross_validated_lasso,
    fold_assignment,
    lasso_cv_options,
)
from dm_assets_tests.helpers import planted_problem, standardize

CPU = torch.device("cpu")
TOL = 1e-10


def brute_force_cv(x: np.ndarray, y: np.ndarray, fold: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``(t, k)`` squared errors summed over the folds' held-out rows / n: each fold fitted on
    its training rows by scikit-learn's coordinate descent (``lasso_path`` on the rows,
    centered on the fold's training means: the intercept), predicted row by row."""
    n, t = y.shape
    xs, _, _ = standardize(x, np.arange(n))  # all n rows' column statistics, as documented
    yf = y.astype(np.float64)
    total = np.zeros(grid.shape)
    for f in np.unique(fold):
        train, val = fold != f, fold == f
        x_bar, y_bar = xs[train].mean(0), yf[train].mean(0)
        for j in range(t):
            _, coefs, _ = lasso_path(
                xs[train] - x_bar, yf[train, j] - y_bar[j], alphas=grid[j], tol=1e-13
            )
            # coefs (p, k): one column per lambda; the intercept centers on the training rows
            pred = (xs[val] - x_bar) @ coefs + y_bar[j]
            total[j] += ((yf[val, j, None] - pred) ** 2).sum(0)
    return total / n


# FISTA (the GPU engine) on the smaller problem only: many tiny torch calls are slow on a CPU
@pytest.mark.parametrize(
    ("engine", "seed", "n", "p", "folds"),
    [("cd", 0, 200, 15, 5), ("fista", 0, 200, 15, 5), ("cd", 1, 301, 20, 3)],
)
def test_cv_choice_equals_brute_force_and_refit_equals_direct_fit(
    engine: str, seed: int, n: int, p: int, folds: int
) -> None:
    prob = planted_problem(n=n, p=p, t=4, density=0.2, noise=1.5, seed=seed)
    x, y = prob.x, prob.y
    result = cross_validated_lasso(
        x, y, folds=folds, k=15, eps=1e-2, seed=seed, engine=engine, tol=TOL, max_iter=100_000
    )
    fold = fold_assignment(n, folds, seed)
    np.testing.assert_array_equal(result.fold_of_row, fold)
    grid = result.lambdas.numpy()
    expected = brute_force_cv(x, y, fold, grid)
    np.testing.assert_allclose(result.cv_mse.numpy(), expected, rtol=1e-5)
    chosen = result.chosen_index.numpy()
    np.testing.assert_array_equal(chosen, np.argmin(expected, axis=1))
    # the choice is interior here (noisy planted weights): neither all-zero nor the grid's end
    assert ((chosen > 0) & (chosen < 14)).all()
    assert result.lam.numpy() == pytest.approx(grid[np.arange(4), chosen], rel=1e-6)

    xs, mean, _ = standardize(x, np.arange(n))
    np.testing.assert_allclose(result.mean.numpy(), mean, rtol=1e-6)
    for j in range(4):
        ref = Lasso(alpha=float(result.lam[j]), tol=1e-14, max_iter=1_000_000)
        ref.fit(xs, y[:, j].astype(np.float64))
        scale = np.abs(ref.coef_).max()
        np.testing.assert_allclose(result.weight[:, j].numpy(), ref.coef_, atol=1e-4 * scale)
        assert float(result.bias[j]) == pytest.approx(ref.intercept_, abs=1e-4 * scale)
    predicted = xs @ result.weight.numpy().astype(np.float64) + result.bias.numpy()
    assert result.seed_dict().keys() == {"weight", "bias", "lam", "lam_max", "mean", "std"}
    assert np.corrcoef(predicted[:, 0], y[:, 0])[0, 1] > 0.5


def test_pure_noise_chooses_lambda_max_and_predicts_a_constant() -> None:
    # two lambdas: lambda_max (the mean alone) or nearly least squares on 40 features; on noise
    # the latter's CV error exceeds the former's by about 40/400 of the variance, about 4.5
    # standard deviations of that difference (sqrt(p / 2)): lambda_max, whatever the seed
    rng = np.random.default_rng(7)
    x = rng.random((400, 40)) < 0.5
    signal = x @ rng.normal(size=(40, 1)) + 0.01 * rng.normal(size=(400, 1))
    y = np.concatenate([rng.normal(size=(400, 3)), signal], axis=1)
    result = cross_validated_lasso(x, y, folds=5, k=2, eps=1e-3)
    assert result.chosen_index.tolist() == [0, 0, 0, 1]
    assert (result.weight[:, :3] == 0).all() and (result.weight[:, 3] != 0).sum() > 30
    np.testing.assert_allclose(result.bias[:3].numpy(), y[:, :3].mean(0), rtol=1e-5, atol=1e-6)


def test_early_stopping_on_the_summed_cv_error() -> None:
    prob = planted_problem(n=300, p=20, t=4, density=0.2, noise=1.5, seed=2)
    full = cross_validated_lasso(prob.x, prob.y, folds=5, k=20, eps=1e-3, tol=1e-9)
    early = cross_validated_lasso(
        prob.x, prob.y, folds=5, k=20, eps=1e-3, tol=1e-9, min_lambdas=5, patience=3
    )
    cv = full.cv_mse.numpy()
    for j in range(4):
        # the main fit's rule on the summed error: stop 3 lambdas after the best so far
        best, since, reached = 0, 0, 20
        for i in range(1, 20):
            since = 0 if cv[j, i] < cv[j, best] else since + 1
            best = i if since == 0 else best
            if since >= 3 and i + 1 >= 5:
                reached = i + 1
                break
        seen = early.cv_mse.numpy()[j]
        assert np.isfinite(seen[:reached]).all() and np.isnan(seen[reached:]).all()
        np.testing.assert_allclose(seen[:reached], cv[j, :reached], rtol=1e-9)
        assert int(early.chosen_index[j]) == best
    assert np.isnan(early.cv_mse.numpy()).any()  # some target stopped before the grid's end
    # the CV curve has one minimum here: stopping early chose what the full grid chose
    torch.testing.assert_close(early.chosen_index, full.chosen_index)
    torch.testing.assert_close(early.weight, full.weight, rtol=0, atol=1e-6)


def test_folds_are_deterministic_and_balanced() -> None:
    a = fold_assignment(23, 5, seed=3)
    np.testing.assert_array_equal(a, fold_assignment(23, 5, seed=3))
    assert not np.array_equal(a, fold_assignment(23, 5, seed=4))
    assert sorted(np.bincount(a).tolist()) == [4, 4, 5, 5, 5]


def test_options_come_from_the_config() -> None:
    config = load_config(
        None,
        {
            "data": {"data_path": "unused", "num_train": 100, "num_val": 20, "seed": 9},
            "cfg": {"k": 7, "eps": 0.05, "batch_size": 50, "out_dir": "unused", "device": "cpu"},
        },
    )
    options = lasso_cv_options(config)
    assert options == {
        "k": 7,
        "eps": 0.05,
        "use_bias": True,
        "batch_size": 50,
        "tol": 1e-6,
        "max_iter": 5000,
        "device": CPU,
        "seed": 9,
        "min_lambdas": 10,  # the reference's early-stopping rule
        "patience": 1,
    }


def test_bad_inputs_are_named() -> None:
    x = np.zeros((9, 3), dtype=bool)
    y = np.zeros((9, 2))
    with pytest.raises(ValueError, match=r"folds=1: K-fold cross-validation needs an integer >= 2"):
        cross_validated_lasso(x, y, folds=1, k=3, eps=0.1)
    with pytest.raises(ValueError, match=r"9 rows for folds=5.*n >= 2 \* folds = 10"):
        cross_validated_lasso(x, y, folds=5, k=3, eps=0.1)
    with pytest.raises(ValueError, match=r"y must be \(n, t\)"):
        cross_validated_lasso(x, y[:-1], folds=2, k=3, eps=0.1)
