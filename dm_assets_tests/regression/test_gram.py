"""The sufficient-statistics solver against scikit-learn, and the statistics themselves.

Tolerances: the solver stops when the duality gap is below ``tol * var(y)``; with tol=1e-10 the
objective matches scikit-learn's (run to tol=1e-12) far inside the required 1e-3 relative.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, lasso_path

from dm_assets.regression.data import ArraySource
from dm_assets.regression.gram import (
    GramConvergenceWarning,
    fit_gram,
    lipschitz_constant,
    solve_fixed_lambda,
)
from dm_assets.regression.stats import accumulate_stats
from dm_assets_tests.helpers import planted_problem, standardize

ENGINES = ["cd", "fista"]
CPU = torch.device("cpu")


def objective(xs: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, lam: float) -> float:
    return float(0.5 * np.mean((y - xs @ w - b) ** 2) + lam * np.abs(w).sum())


def test_statistics_are_exact() -> None:
    prob = planted_problem(n=700, p=40, t=3, seed=1)
    src = ArraySource(prob.x, prob.y)
    stats = accumulate_stats(src, prob.train, batch_size=97, device=CPU)
    x = prob.x[prob.train].astype(np.float64)
    y = prob.y[prob.train].astype(np.float64)
    assert stats.n == len(prob.train)
    np.testing.assert_array_equal(stats.xtx.numpy(), x.T @ x)  # type: ignore[union-attr]
    np.testing.assert_array_equal(stats.sum_x.numpy(), x.sum(0))
    np.testing.assert_allclose(stats.xty.numpy(), x.T @ y, rtol=1e-6)
    np.testing.assert_allclose(stats.sum_y2.numpy(), (y * y).sum(0), rtol=1e-9)
    std = stats.standardization()
    xs, mean, sd = standardize(prob.x, prob.train)
    np.testing.assert_allclose(std.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(std.std.numpy(), sd, rtol=1e-9)
    for fit_intercept in (True, False):
        centered = stats.centered(std, fit_intercept=fit_intercept)
        xt = xs[prob.train]
        yt = y.copy()
        if fit_intercept:
            xt = xt - xt.mean(0)
            yt = yt - yt.mean(0)
        n = len(prob.train)
        np.testing.assert_allclose(centered.gram.numpy(), xt.T @ xt / n, atol=1e-9)  # type: ignore[union-attr]
        np.testing.assert_allclose(centered.c.numpy(), xt.T @ yt / n, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(centered.yy.numpy(), (yt * yt).mean(0), rtol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("seed", "n", "p"), [(0, 600, 30), (1, 2000, 120), (2, 400, 200)])
def test_fixed_lambda_matches_sklearn(engine: str, seed: int, n: int, p: int) -> None:
    prob = planted_problem(n=n, p=p, t=3, seed=seed)
    src = ArraySource(prob.x, prob.y)
    stats = accumulate_stats(src, prob.train, batch_size=256, device=CPU)
    std = stats.standardization()
    centered = stats.centered(std)
    xs, _, _ = standardize(prob.x, prob.train)
    xs, y = xs[prob.train], prob.y[prob.train].astype(np.float64)
    for frac in (0.5, 0.1, 0.02):
        lam = frac * centered.lambda_max()
        w0 = torch.zeros(p, 3, dtype=torch.float64)
        if engine == "fista":
            w, converged, _ = solve_fixed_lambda(
                centered.gram,
                centered.c,
                centered.yy,
                lam,
                w0,  # type: ignore[arg-type]
                lipschitz=lipschitz_constant(centered.gram),
                tol=1e-10,
                max_iter=100_000,  # type: ignore[arg-type]
            )
        else:
            from dm_assets.regression.cd_kernel import solve_columns

            wt = np.zeros((3, p))
            conv, _, _ = solve_columns(
                centered.gram.numpy(),
                centered.c.numpy(),  # type: ignore[union-attr]
                centered.yy.numpy(),
                lam.numpy(),
                wt,
                1e-10,
                100_000,
            )
            w, converged = torch.from_numpy(wt.T.copy()), torch.from_numpy(conv)
        assert converged.all()
        bias = centered.intercept(w)
        for j in range(3):
            ref = Lasso(alpha=float(lam[j]), tol=1e-12, max_iter=1_000_000).fit(xs, y[:, j])
            ours = objective(xs, y[:, j], w[:, j].numpy(), float(bias[j]), float(lam[j]))
            theirs = objective(xs, y[:, j], ref.coef_, float(ref.intercept_), float(lam[j]))
            assert ours == pytest.approx(theirs, rel=1e-6), (frac, j)
            assert ours <= theirs * (1 + 1e-9)


@pytest.mark.parametrize("engine", ENGINES)
def test_path_starts_at_zero_and_lambda_max_is_tight(engine: str) -> None:
    prob = planted_problem(seed=3)
    src = ArraySource(prob.x, prob.y)
    res = fit_gram(src, prob.train, prob.val, k=12, eps=1e-2, engine=engine, refit=False)
    assert (res.nonzeros[:, 0] == 0).all()
    assert (res.nonzeros[:, 1] > 0).all()  # just below lambda_max something enters
    xs, _, _ = standardize(prob.x, prob.train)
    y = prob.y[prob.train].astype(np.float64)
    expected = np.abs(xs[prob.train].T @ (y - y.mean(0))).max(0) / len(prob.train)
    np.testing.assert_allclose(res.lam_max.numpy(), expected, rtol=1e-5)
    # KKT at lambda_max: sklearn also gives all-zero weights there
    for j in range(prob.y.shape[1]):
        ref = Lasso(alpha=float(res.lam_max[j]) * (1 + 1e-6)).fit(xs[prob.train], y[:, j])
        assert not ref.coef_.any()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_weights_recovered(engine: str, seed: int) -> None:
    prob = planted_problem(n=4000, p=200, t=5, density=0.05, noise=0.5, seed=seed)
    res = fit_gram(ArraySource(prob.x, prob.y), prob.train, prob.val, k=25, eps=1e-2, engine=engine)
    raw = res.weight.numpy() / res.std.numpy()[:, None]  # weights on the raw masks
    for j in range(5):
        cos = raw[:, j] @ prob.w[:, j] / np.linalg.norm(raw[:, j]) / np.linalg.norm(prob.w[:, j])
        assert cos >= 0.95, (j, cos)
    pred = res.predict(prob.x[prob.test]).numpy()
    assert pred.shape == (len(prob.test), 5)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", [0, 4])
def test_selected_lambda_matches_sklearn_path(engine: str, seed: int) -> None:
    prob = planted_problem(n=3000, p=150, t=4, noise=1.0, seed=seed)
    k, eps = 20, 1e-3
    res = fit_gram(
        ArraySource(prob.x, prob.y),
        prob.train,
        prob.val,
        k=k,
        eps=eps,
        engine=engine,
        min_lambdas=k,
        refit=False,
    )  # no early stop: whole path
    xs, _, _ = standardize(prob.x, prob.train)
    xt, xv = xs[prob.train], xs[prob.val]
    for j in range(4):
        y = prob.y[:, j].astype(np.float64)
        ybar = y[prob.train].mean()
        grid = res.lambdas[j].numpy()
        _, coefs, _ = lasso_path(
            xt - xt.mean(0), y[prob.train] - ybar, alphas=grid, tol=1e-10, max_iter=100_000
        )
        val_mse = []
        for i in range(k):
            b = ybar - xt.mean(0) @ coefs[:, i]
            val_mse.append(np.mean((y[prob.val] - xv @ coefs[:, i] - b) ** 2))
        best = min(val_mse)
        chosen = float(res.val_mse[j, res.best_step[j]])
        assert chosen <= best * 1.02
        np.testing.assert_allclose(res.val_mse[j].numpy(), val_mse, rtol=1e-5)


def test_early_stopping_and_refit() -> None:
    prob = planted_problem(n=3000, p=100, t=3, noise=0.3, seed=5)
    y = prob.y.copy()
    y[:, 2] = np.random.default_rng(0).normal(size=len(y))  # pure noise: stops early
    res = fit_gram(
        ArraySource(prob.x, y), prob.train, prob.val, k=30, eps=1e-3, min_lambdas=4, patience=2
    )
    steps = (~torch.isnan(res.val_mse)).sum(1)
    assert steps[2] < 30 and steps[2] >= 4
    assert torch.isnan(res.val_mse[2, steps[2] :]).all()
    assert (res.nonzeros[2, steps[2] :] == -1).all()
    # the refit equals scikit-learn on train + validation at the chosen lambda
    rows = np.concatenate([prob.train, prob.val])
    xs, _, _ = standardize(prob.x, prob.train)
    for j in range(3):
        lam = float(res.lam[j])
        ref = Lasso(alpha=lam, tol=1e-12, max_iter=1_000_000).fit(xs[rows], y[rows, j])
        ours = objective(
            xs[rows], y[rows, j], res.weight[:, j].double().numpy(), float(res.bias[j]), lam
        )
        theirs = objective(xs[rows], y[rows, j], ref.coef_, float(ref.intercept_), lam)
        assert ours == pytest.approx(theirs, rel=1e-3)


def test_engines_agree_and_no_intercept() -> None:
    prob = planted_problem(n=1500, p=80, t=3, seed=6)
    src = ArraySource(prob.x, prob.y)
    a = fit_gram(src, prob.train, prob.val, k=10, eps=1e-2, engine="cd", tol=1e-10)
    b = fit_gram(
        src, prob.train, prob.val, k=10, eps=1e-2, engine="fista", tol=1e-10, max_iter=100_000
    )
    torch.testing.assert_close(a.weight, b.weight, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.best_step, b.best_step)
    nb = fit_gram(
        src,
        prob.train,
        prob.val,
        k=10,
        eps=1e-2,
        use_bias=False,
        tol=1e-10,
        min_lambdas=10,
        refit=False,
    )
    assert (nb.bias == 0).all()
    xs, _, _ = standardize(prob.x, prob.train)
    j, step = 0, int(nb.best_step[0])
    lam = float(nb.lambdas[j, step])
    ref = Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=1_000_000).fit(
        xs[prob.train], prob.y[prob.train, j].astype(np.float64)
    )
    np.testing.assert_allclose(nb.weight[:, j].numpy(), ref.coef_, atol=1e-4)


def test_constant_columns_and_memmap_input(tmp_path: Path) -> None:
    prob = planted_problem(n=1200, p=60, t=2, seed=7)
    x = prob.x.copy()
    x[:, 0] = True  # a training example in every model
    x[:, 1] = False  # and one in none
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", prob.y)
    src = ArraySource(
        np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")
    )
    res = fit_gram(src, prob.train, prob.val, k=10, eps=1e-2)
    assert (res.weight[:2] == 0).all()
    assert res.std[0] == 1 and res.std[1] == 1
    assert torch.isfinite(res.weight).all()


def test_bad_arguments_and_nonconvergence_warning() -> None:
    prob = planted_problem(n=500, p=40, t=2, seed=8)
    src = ArraySource(prob.x, prob.y)
    with pytest.raises(ValueError, match="at least 2 training rows and 1 validation row"):
        fit_gram(src, prob.train, [], k=5, eps=0.1)
    with pytest.raises(ValueError, match="engine must be"):
        fit_gram(src, prob.train, prob.val, k=5, eps=0.1, engine="magic")
    with pytest.raises(ValueError, match="eps"):
        fit_gram(src, prob.train, prob.val, k=5, eps=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_gram(src, prob.train, prob.val, k=5, eps=1e-3, engine="fista", max_iter=1, tol=1e-14)
    assert any(issubclass(w.category, GramConvergenceWarning) for w in caught)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_cuda_agree() -> None:
    prob = planted_problem(n=3000, p=150, t=6, seed=9)
    src = ArraySource(prob.x, prob.y)
    cpu = fit_gram(src, prob.train, prob.val, k=15, eps=1e-2, tol=1e-9)
    gpu = fit_gram(
        src, prob.train, prob.val, k=15, eps=1e-2, tol=1e-9, device="cuda", max_iter=100_000
    )
    torch.testing.assert_close(cpu.weight, gpu.weight, atol=1e-4, rtol=1e-4)
    assert torch.equal(cpu.best_step, gpu.best_step)
