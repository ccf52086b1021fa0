"""The SAGA solver against scikit-learn's coordinate descent, on datamodels-shaped problems.

Every comparison standardizes the masks with the training rows' statistics, as the solver
does, so both sides minimize ``(1/(2n)) ||y - X_std w - b||^2 + lambda ||w||_1``.

Tolerances: SAGA stops when its duality gap is below ``tol * var(y)`` (default ``1e-4``), which
bounds its excess objective; at ``lambda = 0.1 lambda_max`` the objective is above
``0.1 var(y)`` on these problems, so the excess is below ``1e-3`` relative (observed: 1e-7 and
less, the duality gap being a loose bound).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, lasso_path

from dm_assets.regression.data import ArraySource
from dm_assets.regression.path import LassoPathResult
from dm_assets.regression.saga import fit_saga, saga_fixed_lambda
from dm_assets.regression.saga_driver import SagaConvergenceWarning, SagaDivergedError
from dm_assets.regression.saga_rows import CACHE_BYTES
from dm_assets.regression.stats import accumulate_stats
from dm_assets_tests.helpers import Problem, planted_problem, standardize

CPU = torch.device("cpu")


def objective(x_std: np.ndarray, y: np.ndarray, w: np.ndarray, b: float, lam: float) -> float:
    r = y.astype(np.float64) - x_std @ w.astype(np.float64) - b
    return 0.5 * float(np.mean(r * r)) + lam * float(np.abs(w).sum())


def lambda_max_exact(x_std: np.ndarray, y: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    return np.abs(x_std.T @ (y - y.mean(0))).max(0) / len(y)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "p"), [(600, 50), (2000, 200), (300, 300)])
def test_fixed_lambda_objective_matches_sklearn(n: int, p: int, seed: int) -> None:
    prob = planted_problem(n=n, p=p, t=3, seed=seed)
    rows = prob.train
    x_std, _, _ = standardize(prob.x, rows)
    lam = 0.1 * lambda_max_exact(x_std[rows], prob.y[rows])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SagaConvergenceWarning)
        # more features than models (210 x 300) is not strongly convex: 100-300 epochs
        sol = saga_fixed_lambda(
            ArraySource(prob.x, prob.y), rows, torch.tensor(lam), batch_size=64, max_epochs=1000
        )
    assert bool(sol.converged.all())
    for j in range(3):
        y = prob.y[rows, j]
        ref = Lasso(alpha=lam[j], tol=1e-10, max_iter=100_000).fit(x_std[rows], y)
        ours = objective(x_std[rows], y, sol.weight[:, j].numpy(), float(sol.bias[j]), lam[j])
        best = objective(x_std[rows], y, ref.coef_, float(ref.intercept_), lam[j])
        assert (ours - best) / best < 1e-3
        assert ours >= best * (1 - 1e-6)  # sklearn is (near) optimal: a check of both sides
        assert ours - best <= float(sol.gap[j]) + 1e-6 * best  # the gap bounds the excess


def test_fixed_lambda_without_bias_matches_sklearn() -> None:
    prob = planted_problem(n=1000, p=60, t=2, seed=5)
    rows = prob.train
    x_std, _, _ = standardize(prob.x, rows)
    lam = 0.05 * np.abs(x_std[rows].T @ prob.y[rows]).max(0) / len(rows)
    sol = saga_fixed_lambda(
        ArraySource(prob.x, prob.y), rows, torch.tensor(lam), batch_size=100, use_bias=False
    )
    assert bool(sol.converged.all())
    assert torch.equal(sol.bias, torch.zeros(2))
    for j in range(2):
        y = prob.y[rows, j]
        ref = Lasso(alpha=lam[j], fit_intercept=False, tol=1e-10, max_iter=100_000)
        ref.fit(x_std[rows], y)
        ours = objective(x_std[rows], y, sol.weight[:, j].numpy(), 0.0, lam[j])
        best = objective(x_std[rows], y, ref.coef_, 0.0, lam[j])
        assert abs(ours - best) / best < 1e-3


@pytest.mark.parametrize("cache_bytes", [CACHE_BYTES, 0])
def test_reported_gap_and_objective_are_those_of_the_weights(cache_bytes: int) -> None:
    """The exact check runs inside an epoch where the target takes no step: the duality gap and
    objective it reports must be those of the returned weights, recomputed here in float64."""
    prob = planted_problem(n=1500, p=80, t=3, seed=6)
    rows = prob.train
    x_std, _, _ = standardize(prob.x, rows)
    lam = 0.05 * lambda_max_exact(x_std[rows], prob.y[rows])
    sol = saga_fixed_lambda(
        ArraySource(prob.x, prob.y),
        rows,
        torch.tensor(lam),
        batch_size=64,
        cache_bytes=cache_bytes,
    )
    z = x_std[rows] - x_std[rows].mean(0)
    u = prob.y[rows].astype(np.float64) - prob.y[rows].mean(0)
    w = sol.weight.numpy().astype(np.float64)
    r = z @ w - u
    grad = z.T @ r / len(rows)
    half_mse, l1 = (r * r).mean(0) / 2, np.abs(w).sum(0)
    s = np.minimum(1.0, lam / np.abs(grad).max(0))
    gap = (1 + s * s) * half_mse + lam * l1 - s * (2 * half_mse - (w * grad).sum(0))
    np.testing.assert_allclose(sol.objective.numpy(), half_mse + lam * l1, rtol=1e-5)
    np.testing.assert_allclose(sol.gap.numpy(), gap, rtol=1e-2, atol=1e-6 * float(u.var(0).min()))
    assert bool(sol.converged.all()) and np.all(gap <= 1e-4 * u.var(0))


def test_strongly_correlated_columns_converge() -> None:
    """Groups of ten near-copies of a column (curvature near 10 where the full-gradient step
    assumes 1) at a fixed lambda: the fits match coordinate descent (without the full-gradient
    step they need 1100 epochs and more here)."""
    rng = np.random.default_rng(3)
    base = rng.random((1500, 20)) < 0.5
    x = np.concatenate([base] + [base ^ (rng.random(base.shape) < 0.02) for _ in range(9)], 1)
    w = np.zeros((200, 2))
    w[rng.choice(20, 4, replace=False), 0] = 1.0
    w[rng.choice(20, 4, replace=False), 1] = -1.5
    y = (x @ w + 0.5 * rng.normal(size=(1500, 2))).astype(np.float32)
    rows = np.arange(1200)
    x_std, _, _ = standardize(x, rows)
    lam = 0.05 * lambda_max_exact(x_std[rows], y[rows])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SagaConvergenceWarning)
        sol = saga_fixed_lambda(
            ArraySource(x, y), rows, torch.tensor(lam), batch_size=64, max_epochs=1000
        )
    for j in range(2):
        ref = Lasso(alpha=lam[j], tol=1e-10, max_iter=100_000).fit(x_std[rows], y[rows, j])
        ours = objective(
            x_std[rows], y[rows, j], sol.weight[:, j].numpy(), float(sol.bias[j]), lam[j]
        )
        best = objective(x_std[rows], y[rows, j], ref.coef_, float(ref.intercept_), lam[j])
        assert (ours - best) / best < 1e-3


def test_path_on_nearly_duplicated_columns_converges() -> None:
    """Thirty near-copies of each of 10 columns (curvature near 30 where the full-gradient step
    assumes 1): the step's size backs off where it overshoots, and every fit converges (without
    the step 1 fit, without its back-off 9 fits reach 2000 epochs here; with both at most
    1500)."""
    rng = np.random.default_rng(1)
    base = rng.random((1000, 10)) < 0.5
    x = np.concatenate([base] + [base ^ (rng.random(base.shape) < 0.01) for _ in range(29)], 1)
    w = np.zeros((300, 2), np.float32)
    w[rng.choice(10, 1), 0], w[rng.choice(10, 1), 1] = rng.normal(size=2)
    signal = x.astype(np.float32) @ w
    y = signal + rng.normal(size=signal.shape).astype(np.float32) * signal.std(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SagaConvergenceWarning)
        res = fit_saga(
            ArraySource(x, y),
            np.arange(800),
            np.arange(800, 1000),
            k=12,
            eps=1e-2,
            batch_size=128,
            refit=False,
            max_epochs=2000,
        )
    assert res.info["capped_fits"] == 0


def test_cached_and_streamed_rows_agree() -> None:
    """Cached rows (fixed minibatches, visited in a new order each epoch) and rows streamed
    from the source (new minibatches each epoch) solve the same problems."""
    prob = planted_problem(n=2000, p=100, t=3, seed=2)
    src = ArraySource(prob.x, prob.y)
    kwargs = {"k": 15, "eps": 1e-2, "batch_size": 128, "refit": False}
    cached = fit_saga(src, prob.train, prob.val, **kwargs)
    streamed = fit_saga(src, prob.train, prob.val, cache_bytes=0, **kwargs)
    assert cached.info["cached"] == 1 and streamed.info["cached"] == 0
    assert torch.equal(cached.best_step, streamed.best_step)
    walked = ~cached.val_mse.isnan()
    assert torch.equal(walked, ~streamed.val_mse.isnan())
    np.testing.assert_allclose(cached.val_mse[walked], streamed.val_mse[walked], rtol=2e-2)
    # rows beyond the budget stream
    over_budget = fit_saga(src, prob.train, prob.val, cache_bytes=10_000, **kwargs)
    assert over_budget.info["cached"] == 0
    assert torch.equal(over_budget.weight, streamed.weight)


def test_read_only_memmap_gives_the_same_solution(tmp_path: Path) -> None:
    prob = planted_problem(n=400, p=40, t=2, seed=3)
    np.save(tmp_path / "x.npy", prob.x)
    np.save(tmp_path / "y.npy", prob.y)
    mapped = ArraySource(
        np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")
    )
    in_memory = saga_fixed_lambda(ArraySource(prob.x, prob.y), prob.train, 0.05, batch_size=64)
    from_disk = saga_fixed_lambda(mapped, prob.train, 0.05, batch_size=64)
    assert torch.equal(in_memory.weight, from_disk.weight)
    assert torch.equal(in_memory.bias, from_disk.bias)


@pytest.mark.parametrize("seed", [0, 1])
def test_lambda_max_is_exact_and_path_starts_at_zero(seed: int) -> None:
    prob = planted_problem(n=1200, p=80, t=4, seed=seed)
    src, train = ArraySource(prob.x, prob.y), prob.train
    x_std, _, _ = standardize(prob.x, train)
    exact = lambda_max_exact(x_std[train], prob.y[train])
    res = fit_saga(src, train, prob.val, k=10, eps=1e-2, batch_size=128, refit=False)
    np.testing.assert_allclose(res.lam_max.numpy(), exact, rtol=1e-6)
    # upstream's lambda_max, on raw 0/1 masks, is about half the true one
    y_c = prob.y[train] - prob.y[train].mean(0)
    raw = np.abs(prob.x[train].T.astype(np.float64) @ y_c).max(0) / len(train)
    assert np.all(raw < 0.6 * exact)
    assert torch.equal(res.nonzeros[:, 0], torch.zeros(4, dtype=torch.int64))
    np.testing.assert_allclose(res.train_mse[:, 0].numpy(), prob.y[train].var(0), rtol=1e-5)
    # independently: sklearn is all zero just above lambda_max and not just below
    for j in range(4):
        y = prob.y[train, j]
        above = Lasso(alpha=exact[j] * (1 + 1e-6), tol=1e-10).fit(x_std[train], y)
        below = Lasso(alpha=exact[j] * 0.99, tol=1e-10).fit(x_std[train], y)
        assert not above.coef_.any() and below.coef_.any()
    # at lambda_max itself the solution is w = 0 exactly, even from a nonzero warm start
    stats = accumulate_stats(src, train, batch_size=128, device=CPU, gram=False)
    lam_max = stats.centered(stats.standardization()).lambda_max()
    at_max = saga_fixed_lambda(src, train, lam_max, batch_size=128, weight=torch.ones(80, 4))
    assert not at_max.weight.any()


@pytest.fixture(scope="module")
def planted_fit() -> tuple[LassoPathResult, Problem]:
    """Datamodels-shaped: 2800 training, 600 validation models, 200 examples, 6 targets with
    10 nonzero weights each, noise half the signal's standard deviation."""
    prob = planted_problem(n=4000, p=200, t=6, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SagaConvergenceWarning)  # lr=None converges untuned
        res = fit_saga(
            ArraySource(prob.x, prob.y), prob.train, prob.val, k=40, eps=1e-3, batch_size=256
        )
    return res, prob


def test_planted_weights_recovered(planted_fit: tuple[LassoPathResult, Problem]) -> None:
    res, prob = planted_fit
    assert res.refit and res.solver == "saga" and res.weight.shape == (200, 6)
    assert (res.n_train, res.n_val) == (2800, 600)
    assert cosine(res.weight.numpy(), prob.w * res.std.numpy()[:, None]).min() >= 0.95
    assert res.info["capped_fits"] == 0 and res.info["epochs_per_lambda_max"] < 50
    # the gap estimate sends a target to its exact check about once per lambda
    walked = int((~res.val_mse.isnan()).sum())
    assert res.info["checked_targets"] <= 1.5 * walked


def test_validation_choice_matches_sklearn_path(
    planted_fit: tuple[LassoPathResult, Problem],
) -> None:
    res, prob = planted_fit
    train, val = prob.train, prob.val
    x_std, _, _ = standardize(prob.x, train)
    y_bar = prob.y[train].mean(0)
    for j in range(prob.y.shape[1]):
        _, coefs, _ = lasso_path(
            x_std[train],
            prob.y[train, j] - y_bar[j],
            alphas=res.lambdas[j].numpy(),
            tol=1e-8,
            max_iter=100_000,
        )
        val_mse = ((x_std[val] @ coefs + y_bar[j] - prob.y[val, j][:, None]) ** 2).mean(0)
        chosen = float(res.val_mse[j, res.best_step[j]])
        assert chosen <= 1.02 * val_mse.min()
        # and the whole path walked agrees with coordinate descent's
        walked = ~res.val_mse[j].isnan().numpy()
        np.testing.assert_allclose(res.val_mse[j].numpy()[walked], val_mse[walked], rtol=0.03)


def test_refit_solves_train_plus_validation(
    planted_fit: tuple[LassoPathResult, Problem],
) -> None:
    res, prob = planted_fit
    rows = np.concatenate([prob.train, prob.val])
    x_std, _, _ = standardize(prob.x, prob.train)  # the training standardization throughout
    np.testing.assert_allclose(res.mean.numpy(), prob.x[prob.train].mean(0), rtol=1e-6)
    for j in range(3):
        lam, y = float(res.lam[j]), prob.y[rows, j]
        ref = Lasso(alpha=lam, tol=1e-10, max_iter=100_000).fit(x_std[rows], y)
        ours = objective(x_std[rows], y, res.weight[:, j].numpy(), float(res.bias[j]), lam)
        best = objective(x_std[rows], y, ref.coef_, float(ref.intercept_), lam)
        assert (ours - best) / best < 1e-3


def test_divergence_raises_promptly_and_the_epoch_cap_warns() -> None:
    prob = planted_problem(n=1000, p=100, t=2, seed=4)
    src = ArraySource(prob.x, prob.y)
    # promptly: in the first epoch that takes a step (the first one only checks)
    with pytest.raises(SagaDivergedError, match=r"after 1 epoch\(s\) .*lr=1e\+03.*Lower lr"):
        fit_saga(src, prob.train, prob.val, k=5, eps=0.1, batch_size=64, lr=1e3)
    with pytest.warns(SagaConvergenceWarning, match=r"max_epochs=1 .*Raise max_epochs"):
        fit_saga(src, prob.train, prob.val, k=5, eps=0.1, batch_size=64, max_epochs=1)


def test_targets_stopping_at_different_steps() -> None:
    prob = planted_problem(n=1600, p=60, t=1, density=0.2, noise=0.2, seed=7)
    noise = np.random.default_rng(7).normal(size=(1600, 1)).astype(np.float32)
    y = np.concatenate([noise, prob.y], axis=1)
    kwargs = {"k": 30, "eps": 1e-3, "batch_size": 128, "refit": False}
    joint = fit_saga(ArraySource(prob.x, y), prob.train, prob.val, **kwargs)
    walked = (~joint.val_mse.isnan()).sum(1)
    assert walked[0] < walked[1]  # the noise target leaves first
    assert joint.val_mse.shape == joint.nonzeros.shape == (2, 30)
    assert bool(joint.val_mse[0, walked[0] :].isnan().all())
    assert bool((joint.nonzeros[0, walked[0] :] == -1).all())
    # the returned weights are those of each target's best step, kept when it left
    nonzeros = (joint.weight != 0).sum(0)
    assert torch.equal(nonzeros, joint.nonzeros[torch.arange(2), joint.best_step])
    # targets do not interact: each alone walks the same path
    for j in range(2):
        alone = fit_saga(ArraySource(prob.x, y[:, [j]]), prob.train, prob.val, **kwargs)
        assert torch.equal(alone.best_step, joint.best_step[[j]])
        np.testing.assert_allclose(alone.val_mse[0], joint.val_mse[j], rtol=1e-4)
        np.testing.assert_allclose(alone.weight[:, 0], joint.weight[:, j], atol=1e-4)


def test_invalid_arguments_are_all_reported() -> None:
    prob = planted_problem(n=50, p=5, t=1, seed=0)
    with pytest.raises(ValueError) as info:
        fit_saga(
            ArraySource(prob.x, prob.y),
            [0, 1, 2, 60],
            [2, 3],
            k=0,
            eps=2.0,
            batch_size=0,
            lr=-1.0,
            tol=0.0,
            cache_bytes=-1,
        )
    message = str(info.value)
    for name in [
        "train_rows",
        "share row positions",
        "k (",
        "eps",
        "batch_size",
        "lr",
        "tol",
        "cache_bytes",
    ]:
        assert name in message


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("table_on_host", [False, True])
def test_cpu_and_cuda_agree(table_on_host: bool) -> None:
    prob = planted_problem(n=2000, p=150, t=4, seed=9)
    src = ArraySource(prob.x, prob.y)
    kwargs = {"k": 20, "eps": 1e-2, "batch_size": 256, "tol": 1e-6}
    cpu = fit_saga(src, prob.train, prob.val, **kwargs)
    gpu = fit_saga(src, prob.train, prob.val, device="cuda", table_on_host=table_on_host, **kwargs)
    np.testing.assert_allclose(gpu.lam_max, cpu.lam_max, rtol=1e-6)
    assert torch.equal(gpu.best_step, cpu.best_step)
    walked = ~cpu.val_mse.isnan()
    np.testing.assert_allclose(gpu.val_mse[walked], cpu.val_mse[walked], rtol=1e-4)
    np.testing.assert_allclose(gpu.weight, cpu.weight, atol=1e-3)
    np.testing.assert_allclose(gpu.bias, cpu.bias, atol=1e-3)
