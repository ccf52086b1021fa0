"""Working-set coordinate descent (KKT admission and checks) against the full-sweep solver.

Screening only decides which coordinates are visited; the stopping test is the same duality
gap, so at a tight ``tol`` (1e-13 of ``var(y)``) the screened and unscreened solutions agree
to about ``sqrt(tol)`` in the weights (the objective is strongly convex on the support), and
both satisfy the LASSO's optimality conditions: ``|r_j| <= lambda`` where ``w_j = 0`` and
``r_j = lambda sign(w_j)`` elsewhere, ``r = c - G w``.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest
import torch

from dm_assets.regression.cd_kernel import solve_columns, solve_columns_screened, solve_paths
from dm_assets.regression.data import ArraySource
from dm_assets.regression.gram import GramConvergenceWarning, fit_gram
from dm_assets.regression.path import PathTracker, lambda_grid
from dm_assets.regression.stats import CenteredProblem, SufficientStats, accumulate_stats
from dm_assets_tests.helpers import Problem, planted_problem, standardize

CPU = torch.device("cpu")
TOL = 1e-13


def correlated_problem(seed: int) -> Problem:
    """Planted masks where every column has two near-copies (5% of bits flipped): features
    enter in several KKT rounds per lambda, and a screening rule would miss some of them."""
    prob = planted_problem(n=1500, p=40, t=3, seed=seed)
    rng = np.random.default_rng(seed)
    copies = [prob.x ^ (rng.random(prob.x.shape) < 0.05) for _ in range(2)]
    x = np.concatenate([prob.x, *copies], axis=1)
    return Problem(x, prob.y, prob.w, prob.train, prob.val, prob.test)


def centered(prob: Problem) -> tuple[CenteredProblem, SufficientStats, SufficientStats]:
    src = ArraySource(prob.x, prob.y)
    train = accumulate_stats(src, prob.train, batch_size=256, device=CPU)
    val = accumulate_stats(src, prob.val, batch_size=256, device=CPU)
    return train.centered(train.standardization()), train, val


def assert_kkt(g: np.ndarray, c: np.ndarray, w: np.ndarray, lam: float) -> None:
    r = c - g @ w
    slack = 1e-5 * lam
    zero = w == 0
    assert np.all(np.abs(r[zero]) <= lam + slack)
    np.testing.assert_allclose(r[~zero], lam * np.sign(w[~zero]), atol=slack, rtol=0)


@pytest.mark.parametrize("make", [planted_problem, correlated_problem])
@pytest.mark.parametrize("seed", [0, 1])
def test_screened_fixed_lambda_equals_full_sweeps(make, seed: int) -> None:  # type: ignore[no-untyped-def]
    prob = make(seed=seed)
    problem, _, _ = centered(prob)
    g, c, yy = problem.gram.numpy(), problem.c.numpy(), problem.yy.numpy()  # type: ignore[union-attr]
    p, t = c.shape
    for frac in (0.6, 0.1, 0.01):
        lam = frac * problem.lambda_max().numpy()
        full = np.zeros((t, p))
        ok_full, _, mse_full = solve_columns(g, c, yy, lam, full, TOL, 100_000)
        # warm starts: from zero, and from a support that is partly wrong
        for start in (np.zeros((t, p)), np.roll(full, 3, axis=1)):
            screened = np.ascontiguousarray(start)
            ok, _, mse = solve_columns_screened(g, c, yy, lam, screened, TOL, 100_000)
            assert ok.all() and ok_full.all()
            np.testing.assert_allclose(screened, full, atol=1e-5)
            np.testing.assert_allclose(mse, mse_full, rtol=1e-8)
            for j in range(t):
                assert_kkt(g, c[:, j], screened[j], float(lam[j]))


def reference_path(
    problem: CenteredProblem,
    val_x: np.ndarray,
    val_y: np.ndarray,
    lambdas: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-sweep CD warm-started along each target's grid, scored on the validation rows
    themselves: weights ``(t, k, p)``, training and validation MSE ``(t, k)``."""
    g, c, yy = problem.gram.numpy(), problem.c.numpy(), problem.yy.numpy()  # type: ignore[union-attr]
    p, t = c.shape
    k = lambdas.shape[1]
    weights, train, valid = np.zeros((t, k, p)), np.zeros((t, k)), np.zeros((t, k))
    w = np.zeros((t, p))
    for s in range(k):
        ok, _, mse = solve_columns(g, c, yy, np.ascontiguousarray(lambdas[:, s]), w, TOL, 100_000)
        assert ok.all()
        weights[:, s] = w
        train[:, s] = mse
        bias = problem.intercept(torch.from_numpy(w.T.copy())).numpy()
        valid[:, s] = ((val_y - val_x @ w.T - bias) ** 2).mean(0)
    return weights, train, valid


@pytest.mark.parametrize("make", [planted_problem, correlated_problem])
@pytest.mark.parametrize("seed", [2, 3])
def test_screened_path_equals_full_sweep_path(make, seed: int) -> None:  # type: ignore[no-untyped-def]
    prob = make(seed=seed)
    problem, _, _ = centered(prob)
    k = 30
    lambdas = lambda_grid(problem.lambda_max(), k, 1e-3).numpy()
    xs, _, _ = standardize(prob.x, prob.train)
    weights, train_ref, val_ref = reference_path(
        problem, xs[prob.val], prob.y[prob.val].astype(np.float64), lambdas
    )

    best, train_mse, val_mse, nonzeros, _, converged = solve_paths(
        *path_arguments(prob, k=k, eps=1e-3, tol=TOL)
    )
    assert converged.all()
    np.testing.assert_allclose(train_mse, train_ref, rtol=1e-7)
    # from the validation sums, whose X^T y is summed in float32 (module stats): ~1e-6 relative
    np.testing.assert_allclose(val_mse, val_ref, rtol=1e-5)
    np.testing.assert_array_equal(nonzeros, (np.abs(weights) > 0).sum(2))
    chosen = val_ref.argmin(1)
    np.testing.assert_allclose(best, weights[np.arange(len(chosen)), chosen], atol=1e-5)
    g, c = problem.gram.numpy(), problem.c.numpy()  # type: ignore[union-attr]
    for j, s in enumerate(chosen):
        assert_kkt(g, c[:, j], best[j], float(lambdas[j, s]))


def test_early_stopping_matches_the_path_tracker() -> None:
    prob = planted_problem(n=2000, p=60, t=4, noise=2.0, seed=11)
    y = prob.y.copy()
    y[:, 3] = np.random.default_rng(1).normal(size=len(y))  # noise: stops after min_lambdas
    res = fit_gram(ArraySource(prob.x, y), prob.train, prob.val, k=30, eps=1e-3, min_lambdas=4,
                   patience=2, refit=False)  # fmt: skip
    tracker = PathTracker(res.lambdas, min_lambdas=4, patience=2)
    for step in range(30):
        ids = torch.nonzero(tracker.active)[:, 0]
        if ids.numel() == 0:
            break
        tracker.record(step, ids, res.train_mse[ids, step], res.val_mse[ids, step],
                       res.nonzeros[ids, step])  # fmt: skip
    # replaying the recorded tables through the rule stops each target where the kernel did
    done = (~torch.isnan(res.val_mse)).sum(1)
    assert torch.equal(tracker.steps_done, done)
    assert torch.equal(tracker.best_step, res.best_step)
    assert done[3] < 30 and done[3] >= 4


def test_cd_nonconvergence_warns() -> None:
    prob = planted_problem(n=500, p=40, t=2, seed=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_gram(ArraySource(prob.x, prob.y), prob.train, prob.val, k=5, eps=1e-3, engine="cd",
                 max_iter=1, tol=1e-14)  # fmt: skip
    messages = [str(w.message) for w in caught if issubclass(w.category, GramConvergenceWarning)]
    assert any("(target, lambda) solves stopped at max_iter=1" in m for m in messages)


def path_arguments(  # type: ignore[type-arg]
    prob: Problem, k: int = 25, eps: float = 1e-3, tol: float = 1e-10
) -> list:
    """``solve_paths``' arguments for ``prob`` (float64, the whole path: min_lambdas = k,
    patience 3; every thread numba has)."""
    problem, train, val = centered(prob)
    std = train.standardization()

    def f64(x: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(x.numpy(), dtype=np.float64)

    lambdas = lambda_grid(problem.lambda_max(), k, eps).numpy()
    return [
        f64(problem.gram),  # type: ignore[arg-type]
        f64(problem.c.T),
        f64(problem.yy),
        np.ascontiguousarray(lambdas),
        f64(problem.x_bar_std),
        f64(problem.y_bar),
        f64(val.xtx),  # type: ignore[arg-type]
        f64(val.xty.T),
        f64(val.sum_x),
        f64(val.sum_y),
        f64(val.sum_y2),
        val.n,
        f64(std.mean),
        f64(1.0 / std.std),
        k,
        3,
        tol,
        100_000,
        numba.get_num_threads(),
    ]


def test_path_on_a_float32_gram_matrix_matches_float64() -> None:
    # what fit_gram passes: G rounded to float32 (the weights move by ~1e-8) and the
    # validation counts in float32 (exact: integers below 2^24)
    prob = planted_problem(n=3000, p=80, t=5, noise=1.0, seed=21)
    args = path_arguments(prob)
    ref = solve_paths(*args)
    assert np.array_equal(args[6].astype(np.float32), args[6])  # counts: exact in float32
    args32 = list(args)
    args32[0] = args[0].astype(np.float32)
    args32[6] = args[6].astype(np.float32)
    out = solve_paths(*args32)
    best, train_mse, val_mse, nonzeros, _, converged = out
    assert converged.all()
    np.testing.assert_allclose(best, ref[0], atol=1e-6)
    np.testing.assert_allclose(train_mse, ref[1], rtol=1e-6)
    np.testing.assert_allclose(val_mse, ref[2], rtol=1e-6)
    assert np.abs(nonzeros - ref[3]).max() <= 1  # a weight at the threshold may flip
    np.testing.assert_array_equal(np.nanargmin(val_mse, 1), np.nanargmin(ref[2], 1))


def test_path_results_do_not_depend_on_threads_or_target_order() -> None:
    # the threads reuse their buffers (working sets, compact matrices) from target to target:
    # nothing of one target may leak into the next, whichever thread runs it and after what
    prob = correlated_problem(seed=5)
    prob = Problem(prob.x, np.concatenate([prob.y, prob.y[:, ::-1] * 0.5], 1), prob.w,
                   prob.train, prob.val, prob.test)  # fmt: skip
    args = path_arguments(prob, k=20, eps=1e-2)
    ref = solve_paths(*args)
    order = np.random.default_rng(0).permutation(args[1].shape[0])
    shuffled = list(args)
    for i in (1, 2, 3, 5, 7, 9, 10):  # the per-target arguments
        shuffled[i] = np.ascontiguousarray(args[i][order])
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            shuffled[-1] = threads
            out = solve_paths(*shuffled)
            for got, want in zip(out, ref, strict=True):
                np.testing.assert_array_equal(got, want[order])
    finally:
        numba.set_num_threads(before)


def test_batched_admission_copies_the_working_set_block() -> None:
    from dm_assets.regression.cd_kernel import _admit_many

    rng = np.random.default_rng(3)
    p = 300
    a = rng.normal(size=(p, p))
    g = np.ascontiguousarray((a + a.T).astype(np.float32))
    vg = np.ascontiguousarray(a @ a.T)
    ws = np.empty(p, dtype=np.int64)
    in_ws = np.zeros(p, dtype=np.bool_)
    ws_g = np.empty((16, 16), dtype=np.float32)
    ws_vg = np.empty((16, 16))
    size = 0
    order = rng.permutation(p)
    for m in (1, 5, 0, 40, 3, 120, 60):  # growth past the capacity, empty batches
        new = np.ascontiguousarray(order[size : size + m])
        ws_g, ws_vg, size = _admit_many(g, vg, new, m, ws, size, ws_g, ws_vg, in_ws)
        chosen = ws[:size]
        np.testing.assert_array_equal(chosen, order[:size])
        np.testing.assert_array_equal(ws_g[:size, :size], g[np.ix_(chosen, chosen)])
        np.testing.assert_array_equal(ws_vg[:size, :size], vg[np.ix_(chosen, chosen)])
        assert in_ws.sum() == size and in_ws[chosen].all()
