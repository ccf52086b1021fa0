"""The sufficient-statistics LASSO path solver (``solver: gram``), exact and the default.

In datamodels the models outnumber the features, and every target's path depends only on
``X^T X``, ``X^T y`` and ``y^T y`` of the training models (and the same of the validation
models to score each lambda). One pass of large matrix products over the rows computes them
exactly (0/1 masks); then all targets solve together on a ``p x p`` problem, on any device.

Per target ``t`` and lambda, with ``G = X_std^T X_std / n`` and ``c = X_std^T (y - y_bar) / n``
(centered on the fitting rows)::

    min_w  (1/2) w^T G w - c^T w + (1/2) yy + lambda * ||w||_1
         = (1/(2n)) ||y - X_std w - b||^2 + lambda * ||w||_1   at b = y_bar - x_bar_std^T w

solved by FISTA (accelerated proximal gradient) on all targets at once, with per-target
adaptive restarts, until each target's duality gap is at most ``tol * yy`` (a test that does
not depend on the step size). Memory: ``p x p`` (the Gram matrix) plus a few ``p x t`` arrays.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence

import numba
import numpy as np
import torch

from dm_assets.regression.cd_kernel import (
    solve_columns_screened,
    solve_paths,
    sparse_quadratic_forms,
)
from dm_assets.regression.config import MIN_LAMBDAS, PATIENCE
from dm_assets.regression.data import RowSource
from dm_assets.regression.path import LassoPathResult, PathTracker, Standardization, lambda_grid
from dm_assets.regression.stats import CenteredProblem, SufficientStats, accumulate_stats

logger = logging.getLogger(__name__)


class GramConvergenceWarning(UserWarning):
    """Some targets did not reach the duality-gap tolerance within ``max_iter`` iterations."""


def soft_threshold(v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``sign(v) * max(|v| - tau, 0)``, ``tau`` broadcast over rows (one per column)."""
    return torch.sign(v) * torch.clamp(v.abs() - tau, min=0)


def lipschitz_constant(gram: torch.Tensor, iterations: int = 100) -> float:
    """An upper estimate of the largest eigenvalue of the (PSD) ``gram``, by power iteration.

    Power iteration approaches the top eigenvalue from below; the 5% margin keeps the FISTA
    step ``1 / L`` safe, and the solver backs off further if the objective ever rises.
    """
    p = gram.shape[0]
    v = torch.ones(p, dtype=gram.dtype, device=gram.device) / math.sqrt(p)
    estimate = 0.0
    for _ in range(iterations):
        w = gram @ v
        norm = float(torch.linalg.vector_norm(w))
        if norm == 0.0:
            return 1.0
        v = w / norm
        if abs(norm - estimate) <= 1e-6 * norm:
            estimate = norm
            break
        estimate = norm
    return 1.05 * estimate


def _objective_and_gap(
    gram: torch.Tensor, c: torch.Tensor, yy: torch.Tensor, lam: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column ``(a,)``: the primal objective, the duality gap and the training MSE
    (``||r||^2 / n``) of ``w`` ``(p, a)`` for ``min_w (1/2) w^T G w - c^T w + lam ||w||_1``."""
    grad = gram @ w - c  # = -X_std^T r / n
    wc = (w * c).sum(0)
    mse = (yy + (w * grad).sum(0) - wc).clamp_min(0)  # ||r||^2 / n
    l1 = w.abs().sum(0)
    primal = 0.5 * mse + lam * l1
    grad_inf = grad.abs().amax(0)
    s = torch.where(grad_inf > lam, lam / grad_inf.clamp_min(1e-300), torch.ones_like(lam))
    dual = -0.5 * s * s * mse + s * (yy - wc)
    return primal, (primal - dual).clamp_min(0), mse


def solve_fixed_lambda(
    gram: torch.Tensor,
    c: torch.Tensor,
    yy: torch.Tensor,
    lam: torch.Tensor,
    w0: torch.Tensor,
    *,
    lipschitz: float,
    tol: float = 1e-6,
    max_iter: int = 5000,
    check_every: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """FISTA for ``min_w (1/2) w^T G w - c^T w + lam ||w||_1``, every column at once.

    Per column (target) this is ``(1/(2n)) ||y - X_std w - b||^2 + lam ||w||_1`` at the best
    intercept (module doc). Converged columns are dropped from the iteration, so the cost
    follows the slowest targets only; adaptive restarts drop momentum that points uphill, and
    the step halves whenever an objective rises (``lipschitz`` was too low).

    Parameters
    ----------
    gram : float tensor, shape (p, p)
        ``G = X_std^T X_std / n`` (symmetric positive semi-definite).
    c : float tensor, shape (p, a)
        ``X_std^T (y - y_bar) / n`` per column.
    yy : float tensor, shape (a,)
        ``||y - y_bar||^2 / n`` per column: the objective's scale.
    lam : float tensor, shape (a,)
        Each column's lambda.
    w0 : float tensor, shape (p, a)
        The warm start (not modified).
    lipschitz : float
        An upper estimate of ``G``'s largest eigenvalue (:func:`lipschitz_constant`); the
        step is ``1 / lipschitz``.
    tol : float
        A column has converged when its duality gap is at most ``tol * yy``.
    max_iter : int
        Iterations before giving up (the columns left then count as not converged).
    check_every : int
        Iterations between duality-gap tests.

    Returns
    -------
    w : float tensor, shape (p, a)
        The solutions.
    converged : bool tensor, shape (a,)
        Which columns met ``tol``.
    iterations : int
        The iterations run (those of the slowest column).
    """
    w = w0.clone()
    converged = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
    todo = torch.arange(w.shape[1], device=w.device)
    step = 1.0 / lipschitz
    it = 0
    while todo.numel() and it < max_iter:
        c_t, yy_t, lam_t = c[:, todo], yy[todo], lam[todo]
        x = w[:, todo]
        y = x.clone()
        t = torch.ones(todo.numel(), dtype=w.dtype, device=w.device)
        last_primal = torch.full_like(yy_t, float("inf"))
        for _ in range(check_every):
            grad = gram @ y - c_t
            x_new = soft_threshold(y - step * grad, step * lam_t)
            t_new = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
            # adaptive restart: momentum that points uphill is dropped (per column)
            uphill = ((y - x_new) * (x_new - x)).sum(0) > 0
            t_new = torch.where(uphill, torch.ones_like(t_new), t_new)
            beta = torch.where(uphill, torch.zeros_like(t), (t - 1) / t_new)
            y = x_new + beta * (x_new - x)
            x, t = x_new, t_new
            it += 1
        primal, gap, _ = _objective_and_gap(gram, c_t, yy_t, lam_t, x)
        if not torch.isfinite(primal).all() or bool((primal > last_primal * (1 + 1e-6)).any()):
            step *= 0.5  # the Lipschitz estimate was too low: back off
        last_primal = primal
        w[:, todo] = x
        done = gap <= tol * yy_t.clamp_min(1e-30)
        converged[todo[done]] = True
        todo = todo[~done]
    return w, converged, it


class _Engine:
    """Solves one lambda step for a set of targets on one ``(G, c, yy)`` problem.

    ``fista``: torch on any device (dense ``G @ W`` products: what a GPU is for). ``cd``:
    compiled coordinate descent on the CPU with working sets and KKT checks
    (:func:`~dm_assets.regression.cd_kernel.solve_columns_screened`); along a path ``cd`` runs
    :func:`~dm_assets.regression.cd_kernel.solve_paths` instead (:func:`_solve_path_cd`).
    """

    def __init__(
        self, name: str, problem: CenteredProblem, dtype: torch.dtype, tol: float, max_iter: int
    ) -> None:
        if problem.gram is None:
            raise ValueError("the gram solver needs X^T X (accumulate_stats(gram=True))")
        self.name, self.tol, self.max_iter = name, tol, max_iter
        self.device = problem.c.device
        if name == "cd":
            self.gram_np = np.ascontiguousarray(problem.gram.cpu().numpy())
            self.c_np = np.ascontiguousarray(problem.c.cpu().numpy())
            self.yy_np = problem.yy.cpu().numpy()
        else:
            self.gram = problem.gram.to(dtype)
            self.c = problem.c.to(dtype)
            self.yy = problem.yy.to(dtype)
            self.lipschitz = lipschitz_constant(self.gram)
        self.dtype = dtype

    def solve(
        self, ids: torch.Tensor, lam: torch.Tensor, w0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """Weights ``(p, a)`` for targets ``ids`` at ``lam`` ``(a,)`` from ``w0`` ``(p, a)``;
        also which converged, the iterations (FISTA) or sweeps (CD, the slowest target), and
        the training MSE float64 ``(a,)`` at the solution."""
        if self.name == "cd":
            idx = ids.cpu().numpy()
            w = np.ascontiguousarray(w0.T.cpu().numpy(), dtype=np.float64)
            converged, sweeps, mse = solve_columns_screened(
                self.gram_np,
                np.ascontiguousarray(self.c_np[:, idx]),
                self.yy_np[idx],
                lam.cpu().numpy().astype(np.float64),
                w,
                self.tol,
                self.max_iter,
            )
            return (
                torch.from_numpy(w.T.copy()).to(self.device),
                torch.from_numpy(converged).to(self.device),
                int(sweeps.max(initial=0)),
                torch.from_numpy(mse).to(self.device),
            )
        lam_t = lam.to(self.dtype)
        c_t, yy_t = self.c[:, ids], self.yy[ids]
        w_t, converged_t, its = solve_fixed_lambda(
            self.gram,
            c_t,
            yy_t,
            lam_t,
            w0.to(self.dtype),
            lipschitz=self.lipschitz,
            tol=self.tol,
            max_iter=self.max_iter,
        )
        _, _, mse_t = _objective_and_gap(self.gram, c_t, yy_t, lam_t, w_t)
        return w_t, converged_t, its, mse_t.to(torch.float64)


def _validation_mse(
    val: SufficientStats,
    standardization: Standardization,
    weight: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    *,
    sparse: bool,
) -> torch.Tensor:
    """Mean squared error ``(a,)`` of ``((x - mean)/std) @ weight + bias`` on the rows summed
    in ``val``, from the sums alone; ``weight`` float64 ``(p, a)`` and ``bias`` ``(a,)`` belong
    to the target ids ``targets``. ``sparse``: quadratic forms over nonzero weights only."""
    if val.xtx is None:
        raise ValueError("validation statistics need X^T X (accumulate_stats(gram=True))")
    std = standardization.std.to(weight.device)
    u = weight / std[:, None]  # weights on raw masks
    offset = bias - standardization.mean.to(weight.device) @ u  # intercept on raw masks
    if sparse:
        quad_np = sparse_quadratic_forms(
            val.xtx.cpu().numpy(), np.ascontiguousarray(u.T.cpu().numpy())
        )
        quad = torch.from_numpy(quad_np).to(weight.device)
    else:
        quad = (u * (val.xtx @ u)).sum(0)
    total = (
        val.sum_y2[targets]
        - 2 * (u * val.xty[:, targets]).sum(0)
        - 2 * offset * val.sum_y[targets]
        + quad
        + 2 * offset * (val.sum_x @ u)
        + val.n * offset * offset
    )
    return (total / val.n).clamp_min(0)


def fit_gram(
    source: RowSource,
    train_rows: Sequence[int] | np.ndarray,
    val_rows: Sequence[int] | np.ndarray,
    *,
    k: int,
    eps: float,
    batch_size: int = 1024,
    use_bias: bool = True,
    device: torch.device | str = "cpu",
    engine: str = "auto",
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-6,
    max_iter: int = 5000,
    min_lambdas: int = MIN_LAMBDAS,
    patience: int = PATIENCE,
    refit: bool = True,
) -> LassoPathResult:
    """Fit every target's LASSO path from sufficient statistics; choose lambda on validation.

    Objective per target ``t`` on the ``n`` training rows, ``X_std = (X - mean) / std`` with
    the training rows' column statistics::

        (1 / (2 n)) * ||y_t - X_std w_t - b_t||^2 + lambda_t * ||w_t||_1

    Parameters
    ----------
    source : RowSource
        The rows (see :mod:`dm_assets.regression.data`): ``p`` 0/1 features, ``t`` targets.
    train_rows, val_rows : int array-like, shapes (n,) and (n_val,)
        Row positions: training rows (at least 2) fit, validation rows (at least one) score
        each lambda. Masks are standardized with the training rows' column statistics.
    k, eps : int, float
        ``k`` lambdas per target, geometric from its ``lambda_max`` to ``eps * lambda_max``.
    batch_size : int
        Rows per batch of the statistics pass (memory: ``batch_size x (p + t)`` floats).
    use_bias : bool
        Fit an unpenalized intercept per target (the seed's ``use_bias``; default True).
    device, engine, dtype : torch.device or str, str, torch.dtype
        Where the statistics and the path are computed. ``engine``: ``"cd"`` (compiled
        coordinate descent, CPU only, float64), ``"fista"`` (torch, any device, in ``dtype``)
        or ``"auto"`` (``cd`` on the CPU, ``fista`` elsewhere).
    tol, max_iter : float, int
        Each lambda is solved until the duality gap is ``<= tol * var(y)``, at most
        ``max_iter`` iterations or sweeps (then :class:`GramConvergenceWarning`).
    min_lambdas, patience : int
        Early stopping along the path (see :class:`~dm_assets.regression.path.PathTracker`;
        default 10, 1: the reference's rule).
    refit : bool
        Refit each target at its chosen lambda on train + validation rows (default True).

    Returns
    -------
    LassoPathResult
        ``solver="gram"``; its ``info`` holds ``stats_seconds`` (both passes of statistics),
        ``path_seconds`` (every path with its validation scores), ``refit_seconds`` and
        ``iterations`` (FISTA iterations or CD sweeps of the slowest target, summed over the
        lambdas and the refit).

    Raises
    ------
    ValueError
        For an unknown ``engine``, ``cd`` off the CPU, or too few rows.
    """
    start = time.perf_counter()
    device = torch.device(device)
    engine = _resolve_engine(engine, device)
    train_rows, val_rows = _check_rows(train_rows, val_rows)
    # the statistics: one pass over the training rows, one over the validation rows
    train = accumulate_stats(source, train_rows, batch_size=batch_size, device=device)
    val = accumulate_stats(source, val_rows, batch_size=batch_size, device=device)
    stats_seconds = time.perf_counter() - start
    standardization = train.standardization()
    problem = train.centered(standardization, fit_intercept=use_bias)
    lam_max = problem.lambda_max()
    # each target's path; the tracker keeps each target's best lambda on validation
    tracker = PathTracker(lambda_grid(lam_max, k, eps), min_lambdas=min_lambdas, patience=patience)
    path_start = time.perf_counter()
    if engine == "cd":
        best, iterations = _solve_path_cd(
            problem, val, standardization, tracker, tol=tol, max_sweeps=max_iter
        )
    else:
        solver = _Engine(engine, problem, dtype, tol, max_iter)
        best, iterations = _solve_path(
            solver, problem, val, standardization, tracker, device=device
        )
    path_seconds = time.perf_counter() - path_start
    final_problem = problem
    refit_start = time.perf_counter()
    if refit:  # at the chosen lambdas, on train + validation
        final_problem = (train + val).centered(standardization, fit_intercept=use_bias)
        refitter = _Engine(engine, final_problem, dtype, tol, max_iter)
        best, its = _refit(refitter, final_problem, tracker.chosen_lambda.to(device), best)
        iterations += its
    refit_seconds = time.perf_counter() - refit_start
    result = LassoPathResult.from_tracker(
        tracker,
        weight=best,
        bias=final_problem.intercept(best),
        lam_max=lam_max,
        standardization=standardization,
        n_train=len(train_rows),
        n_val=len(val_rows),
        solver="gram",
        refit=refit,
    )
    result.seconds = time.perf_counter() - start
    result.info = {
        "stats_seconds": stats_seconds,
        "path_seconds": path_seconds,
        "refit_seconds": refit_seconds,
        "iterations": float(iterations),
    }
    logger.info(
        "gram (%s): %d targets, %d features, %.2f s (statistics %.2f s)",
        engine,
        problem.c.shape[1],
        problem.c.shape[0],
        result.seconds,
        stats_seconds,
    )
    return result


def _resolve_engine(engine: str, device: torch.device) -> str:
    """``engine`` with ``"auto"`` resolved: ``"cd"`` on the CPU, ``"fista"`` elsewhere."""
    if engine == "auto":
        engine = "cd" if device.type == "cpu" else "fista"
    if engine not in ("cd", "fista") or (engine == "cd" and device.type != "cpu"):
        raise ValueError(
            f"engine must be 'auto', 'fista', or 'cd' on the CPU; got {engine!r} on {device}"
        )
    return engine


def _check_rows(
    train_rows: Sequence[int] | np.ndarray, val_rows: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The row positions as arrays, at least 2 training rows and 1 validation row."""
    train_rows, val_rows = np.asarray(train_rows), np.asarray(val_rows)
    if len(train_rows) < 2 or len(val_rows) < 1:
        raise ValueError(
            f"need at least 2 training rows and 1 validation row; got {len(train_rows)} and "
            f"{len(val_rows)}"
        )
    return train_rows, val_rows


def _solve_path(
    solver: _Engine,
    problem: CenteredProblem,
    val: SufficientStats,
    standardization: Standardization,
    tracker: PathTracker,
    *,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Walk every target's lambda path on ``problem``, scoring each step on ``val``.

    Each step solves the targets still active in ``tracker`` at their lambda of that step,
    warm-started from their previous step, and records the training and validation MSE
    (``tracker`` stops a target early and keeps its best step).

    Returns
    -------
    best : float64 tensor, shape (p, t)
        Each target's weights at its best validation step so far (zeros before any).
    iterations : int
        FISTA iterations or CD sweeps of the slowest target, summed over the steps.

    Warns :class:`GramConvergenceWarning` (at the caller of :func:`fit_gram`) when any solve
    stopped at ``max_iter``.
    """
    grid = tracker.lambdas.to(device)
    p, t = problem.c.shape
    weight = torch.zeros(p, t, dtype=torch.float64, device=device)
    best = torch.zeros_like(weight)
    iterations, unconverged = 0, 0
    for step in range(tracker.k):
        ids = torch.nonzero(tracker.active)[:, 0].to(device)
        if ids.numel() == 0:
            break
        lam = grid[ids, step]
        w, converged, its, train_mse = solver.solve(ids, lam, weight[:, ids])
        w = w.to(torch.float64)
        iterations += its
        unconverged += int((~converged).sum())
        weight[:, ids] = w
        bias = problem.intercept(w, ids)  # zeros without an intercept
        sparse = solver.name == "cd"
        val_mse = _validation_mse(val, standardization, w, bias, ids, sparse=sparse)
        improved = tracker.record(step, ids, train_mse, val_mse, (w != 0).sum(0))
        improved = improved.to(device)
        best[:, ids[improved]] = w[:, improved]
    if unconverged:
        warnings.warn(
            f"{unconverged} (target, lambda) solves stopped at max_iter={solver.max_iter} "
            f"before the duality gap reached tol={solver.tol}: raise max_iter, or loosen tol",
            GramConvergenceWarning,
            stacklevel=3,  # the caller of fit_gram
        )
    return best, iterations


def _refit(
    refitter: _Engine, problem: CenteredProblem, lam: torch.Tensor, best: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Every target solved once more at its chosen lambda ``lam`` ``(t,)`` by ``refitter``
    (built on ``problem``: train + validation), warm-started from ``best`` float64 ``(p, t)``.
    Returns the float64 ``(p, t)`` weights and the iterations or sweeps of the slowest target;
    warns :class:`GramConvergenceWarning` when some target did not converge."""
    everyone = torch.arange(problem.c.shape[1], device=best.device)
    best, converged, its, _ = refitter.solve(everyone, lam, best)
    best = best.to(torch.float64)
    if not bool(converged.all()):
        warnings.warn(
            f"the refit of {int((~converged).sum())} targets stopped at "
            f"max_iter={refitter.max_iter}",
            GramConvergenceWarning,
            stacklevel=3,  # the caller of fit_gram
        )
    return best, its


def _solve_path_cd(
    problem: CenteredProblem,
    val: SufficientStats,
    standardization: Standardization,
    tracker: PathTracker,
    *,
    tol: float,
    max_sweeps: int,
) -> tuple[torch.Tensor, int]:
    """:func:`_solve_path` for the ``cd`` engine: every target's whole path in one compiled
    call (:func:`~dm_assets.regression.cd_kernel.solve_paths`: working sets kept from one
    lambda to the next, admission by KKT checks, validation MSE from ``val``'s sums and the
    tracker's early-stopping rule), then the path tables recorded into ``tracker`` step by
    step. Returns the float64 ``(p, t)`` weights at each target's best step, on the CPU, and
    the sweeps of the slowest target summed over the steps; warns like :func:`_solve_path`.
    """
    if problem.gram is None or val.xtx is None:
        raise ValueError("the gram solver needs X^T X (accumulate_stats(gram=True))")

    def host(x: torch.Tensor, dtype: type = np.float64) -> np.ndarray:
        """``x`` as a C-contiguous host array, float64 unless told."""
        return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=dtype)

    # G in float32: the working-set sweeps and gradient updates read half the bytes; the
    # rounding (at most 2^-24 relative) moves the weights by ~1e-8 (test_cd_screening). The
    # validation counts are exact in float32 when they are integers below 2^24 (0/1 masks).
    gram32 = host(problem.gram, np.float32)
    val_xtx = host(val.xtx)
    val_xtx32 = val_xtx.astype(np.float32)
    exact = bool(np.array_equal(val_xtx32, val_xtx))
    best, train_mse, val_mse, nonzeros, sweeps, converged = solve_paths(
        gram32,
        host(problem.c.T),
        host(problem.yy),
        host(tracker.lambdas),
        host(problem.x_bar_std),
        host(problem.y_bar),
        val_xtx32 if exact else val_xtx,
        host(val.xty.T),
        host(val.sum_x),
        host(val.sum_y),
        host(val.sum_y2),
        val.n,
        host(standardization.mean),
        host(1.0 / standardization.std),
        tracker.min_lambdas,
        tracker.patience,
        tol,
        max_sweeps,
        numba.get_num_threads(),
    )
    for step in range(tracker.k):
        ids = torch.nonzero(tracker.active)[:, 0]
        if ids.numel() == 0:
            break
        rows = ids.numpy()
        tracker.record(
            step,
            ids,
            torch.from_numpy(train_mse[rows, step]),
            torch.from_numpy(val_mse[rows, step]),
            torch.from_numpy(nonzeros[rows, step]),
        )
    unconverged = int((~converged).sum())
    if unconverged:
        warnings.warn(
            f"{unconverged} (target, lambda) solves stopped at max_iter={max_sweeps} "
            f"before the duality gap reached tol={tol}: raise max_iter, or loosen tol",
            GramConvergenceWarning,
            stacklevel=3,  # the caller of fit_gram
        )
    return torch.from_numpy(best.T.copy()), int(sweeps.max(axis=0).sum())
