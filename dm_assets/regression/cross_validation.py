"""K-fold choice of each target's LASSO lambda from sufficient statistics, then a refit on all
rows (:func:`cross_validated_lasso`).

With a fixed validation block the models that choose lambda are models the weights never see.
K-fold cross-validation uses every one of ``N`` models both ways: the rows are split into ``K``
folds; fold ``f``'s path is fitted on the other ``K - 1`` folds and scored on fold ``f``; the
lambda with the lowest squared error summed over the folds is refitted on all ``N`` rows.

Everything here runs on sums. Each fold's :class:`~dm_assets.regression.stats.SufficientStats`
are accumulated once (one pass over the ``N`` rows in all); the training statistics of fold
``f`` are ``total - fold_f`` (sums of 0/1 products in float64: exact), and fold ``f``'s squared
error at weights ``u`` on raw masks with intercept ``a`` expands into its own sums::

    ||y_f - X_f u - a||^2 = y'y - 2 u'X'y - 2 a 1'y + u'X'X u + 2 a 1'X u + n_f a^2

(:func:`~dm_assets.regression.gram._validation_mse`), so no row is read twice.

Standardization: glmnet (and scikit-learn's ``LassoCV`` with a scaler in its pipeline)
standardizes each fold's training rows with their own column statistics. Here every fold uses
the column means and standard deviations of all ``N`` rows, as the final refit does; the held-in
folds therefore see the held-out fold's column means, a negligible leakage for masks whose
column statistics are the same in expectation in every fold (each example is in each mask with
the same probability). The lambda grid is each target's, from all ``N`` rows' ``lambda_max``
(:func:`~dm_assets.regression.path.lambda_grid`), shared by every fold so the folds' errors add
up lambda by lambda.

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dm_assets.regression.config import MIN_LAMBDAS
from dm_assets.regression.data import ArraySource
from dm_assets.regression.gram import (
    GramConvergenceWarning,
    _Engine,
    _resolve_engine,
    _validation_mse,
)
from dm_assets.regression.path import PathTracker, Standardization, lambda_grid
from dm_assets.regression.stats import CenteredProblem, SufficientStats, accumulate_stats

if TYPE_CHECKING:
    from dm_assets.regression.config import RegressionConfig

logger = logging.getLogger(__name__)


@dataclass
class CrossValidatedLasso:
    """Datamodels refitted on all ``n`` rows at each target's K-fold-chosen lambda.

    ``weight`` float32 ``(p, t)`` and ``bias`` float32 ``(t,)`` act on standardized masks:
    ``((x - mean) / std) @ weight + bias`` predicts each target's output for a mask ``x``
    (``mean``, ``std`` float32 ``(p,)``: all ``n`` rows' column statistics). ``lam`` float32
    ``(t,)`` is each target's chosen lambda, ``lam_max`` float32 ``(t,)`` the smallest lambda at
    which all its weights are zero on the ``n`` rows. ``lambdas`` float64 ``(t, k)`` is each
    target's grid (decreasing); ``cv_mse`` float64 ``(t, k)`` the cross-validated mean squared
    error (squared errors summed over the folds' held-out rows, divided by ``n``);
    ``fold_mse`` float64 ``(folds, t, k)`` each fold's own validation MSE (both NaN at lambdas
    a target never reached when early stopping is on); ``chosen_index`` int64 ``(t,)`` the
    argmin of ``cv_mse`` (0: the grid's top, ``lambda_max``, all weights
    zero; ``k - 1``: its smallest lambda). ``fold_of_row`` int64 ``(n,)`` gives each row's fold.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    lam: torch.Tensor
    lam_max: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    lambdas: torch.Tensor
    cv_mse: torch.Tensor
    fold_mse: torch.Tensor
    chosen_index: torch.Tensor
    fold_of_row: np.ndarray
    n: int
    folds: int
    seconds: float = 0.0
    info: dict[str, float] = field(default_factory=dict)

    @property
    def k(self) -> int:
        """Lambdas on each target's grid."""
        return int(self.lambdas.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.weight.shape[1])

    def seed_dict(self) -> dict[str, torch.Tensor]:
        """The weights as ``datamodels.pt`` holds them: ``weight``, ``bias``, ``lam``,
        ``lam_max``, ``mean``, ``std`` (see the class docstring)."""
        return {
            "weight": self.weight,
            "bias": self.bias,
            "lam": self.lam,
            "lam_max": self.lam_max,
            "mean": self.mean,
            "std": self.std,
        }


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """int64 ``(n,)``: the fold (``0 .. folds - 1``) of each of ``n`` rows.

    A permutation of the rows by ``numpy.random.default_rng(seed)`` cut into ``folds``
    consecutive parts whose sizes differ by at most one: the same ``(n, folds, seed)`` always
    gives the same folds, and every fold holds ``n // folds`` or ``n // folds + 1`` rows.
    """
    order = np.random.default_rng(seed).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    for f, part in enumerate(np.array_split(order, folds)):
        fold[part] = f
    return fold


def _minus(total: SufficientStats, part: SufficientStats) -> SufficientStats:
    """The sums over the rows of ``total`` not in ``part`` (``part``'s rows a subset)."""
    xtx = None
    if total.xtx is not None and part.xtx is not None:
        xtx = total.xtx - part.xtx
    return SufficientStats(
        n=total.n - part.n,
        sum_x=total.sum_x - part.sum_x,
        sum_x2=total.sum_x2 - part.sum_x2,
        sum_y=total.sum_y - part.sum_y,
        sum_y2=total.sum_y2 - part.sum_y2,
        xty=total.xty - part.xty,
        xtx=xtx,
    )


def _check(x: np.ndarray, y: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """``x``, ``y`` with ``y`` as ``(n, t)``; raises ValueError naming every problem."""
    problems = []
    shape_x = getattr(x, "shape", None)
    if shape_x is None or len(shape_x) != 2:
        problems.append(f"x must be (n, p) 0/1 masks; got shape {shape_x}")
    y = np.asarray(y) if not hasattr(y, "shape") else y
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or (shape_x is not None and y.shape[0] != shape_x[0]):
        problems.append(f"y must be (n, t) with one row per row of x; got shape {y.shape}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        problems.append(f"folds={folds!r}: K-fold cross-validation needs an integer >= 2")
    elif shape_x is not None and len(shape_x) == 2 and shape_x[0] < 2 * folds:
        problems.append(
            f"{shape_x[0]} rows for folds={folds}: every fold needs at least 2 rows "
            f"(n >= 2 * folds = {2 * folds}); use fewer folds or more rows"
        )
    if problems:
        raise ValueError("cannot cross-validate:\n" + "\n".join(f"  - {m}" for m in problems))
    return x, y


def cross_validated_lasso(
    x: np.ndarray,
    y: np.ndarray,
    *,
    folds: int = 5,
    k: int,
    eps: float,
    seed: int = 0,
    use_bias: bool = True,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    engine: str = "auto",
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-6,
    max_iter: int = 5000,
    min_lambdas: int = MIN_LAMBDAS,
    patience: int | None = None,
) -> CrossValidatedLasso:
    """Choose each target's lambda by K-fold cross-validation and refit on all rows.

    Objective per target ``j`` on a set of ``m`` rows, ``X_std = (X - mean) / std`` with all
    ``n`` rows' column statistics::

        (1 / (2 m)) * ||y_j - X_std w_j - b_j||^2 + lambda * ||w_j||_1

    For each fold ``f`` the grid is solved on the other folds' rows, warm-started lambda to
    lambda, every target at once (the folds in step: all folds solve lambda ``i`` before any
    solves ``i + 1``; by default the whole grid, see ``patience``); ``cv_mse[j, i] = sum_f
    ||y_fj - X_std,f w_fj(lambda_ji) - b_fj||^2 / n``; ``chosen_index[j] = argmin_i
    cv_mse[j, i]`` (the larger lambda on ties); then each target is solved on all ``n`` rows at
    ``lambda_j, chosen_index[j]``, walking its grid from ``lambda_max`` down to it with warm
    starts.

    Parameters
    ----------
    x : array, shape (n, p)
        0/1 (or bool) masks, one row per model; a memory map is read in batches.
    y : array, shape (n, t) or (n,)
        Each model's outputs on the ``t`` targets.
    folds : int
        ``K``, at least 2, with ``n >= 2 K`` (every fold at least 2 rows).
    k, eps : int, float
        ``k`` lambdas per target, geometric from its ``lambda_max`` on all ``n`` rows down to
        ``eps * lambda_max`` (``cfg.k``, ``cfg.eps``).
    seed : int
        Seeds the rows' permutation into folds (:func:`fold_assignment`).
    use_bias : bool
        Fit an unpenalized intercept per target.
    batch_size : int
        Rows per batch of the statistics pass (memory: ``batch_size x (p + t)`` float32).
    device, engine, dtype, tol, max_iter
        As for :func:`~dm_assets.regression.gram.fit_gram`: where the sums and solves run,
        ``"cd"`` / ``"fista"`` / ``"auto"``, FISTA's precision, and each solve's stopping rule
        (duality gap ``<= tol * var(y)``, at most ``max_iter`` iterations or sweeps; a
        :class:`~dm_assets.regression.gram.GramConvergenceWarning` otherwise).
    min_lambdas, patience : int, int or None
        ``patience=None`` (the default): every target walks the whole grid in every fold.
        Otherwise the main fit's early-stopping rule
        (:class:`~dm_assets.regression.path.PathTracker`) applied to the *summed* CV error: a
        target leaves the path (in all folds at once) when its CV error has not improved for
        ``patience`` lambdas, once ``min_lambdas`` are done; its ``cv_mse`` and ``fold_mse``
        are NaN at the lambdas it never reached. Where ``p`` exceeds the rows of a fold this
        matters: the small-lambda end of the grid is by far the slowest to solve there.

    Returns
    -------
    CrossValidatedLasso
        The refitted weights, the grid, the fold and total CV errors and the choices; its
        ``info`` holds ``stats_seconds`` and ``iterations`` (of the slowest target, summed).

    Raises
    ------
    ValueError
        Bad shapes, ``folds < 2``, fewer than ``2 * folds`` rows, or an unknown ``engine``.
    """
    start = time.perf_counter()
    x, y = _check(x, y, folds)
    device = torch.device(device)
    engine = _resolve_engine(engine, device)
    n = int(x.shape[0])
    fold_of_row = fold_assignment(n, folds, seed)
    source = ArraySource(x, y)
    parts = [
        accumulate_stats(
            source, np.flatnonzero(fold_of_row == f), batch_size=batch_size, device=device
        )
        for f in range(folds)
    ]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    stats_seconds = time.perf_counter() - start
    standardization = total.standardization()
    full = total.centered(standardization, fit_intercept=use_bias)
    lam_max = full.lambda_max()
    grid = lambda_grid(lam_max, k, eps)
    t = int(lam_max.shape[0])
    fold_mse, cv_mse, chosen, iterations = _cross_validate(
        [_minus(total, held).centered(standardization, fit_intercept=use_bias) for held in parts],
        parts,
        standardization,
        grid,
        engine=engine,
        dtype=dtype,
        tol=tol,
        max_iter=max_iter,
        min_lambdas=k if patience is None else min_lambdas,
        patience=k if patience is None else patience,
        device=device,
    )
    weight, its = _refit_path(
        _Engine(engine, full, dtype, tol, max_iter),
        grid.to(device),
        chosen.to(device),
        int(x.shape[1]),
    )
    iterations += its
    seconds = time.perf_counter() - start
    logger.info(
        "%d-fold lambda choice and refit: %d rows, %d features, %d targets, %.2f s "
        "(statistics %.2f s)",
        folds,
        n,
        int(x.shape[1]),
        t,
        seconds,
        stats_seconds,
    )
    return CrossValidatedLasso(
        weight=weight.detach().to("cpu", torch.float32),
        bias=full.intercept(weight).detach().to("cpu", torch.float32),
        lam=grid.gather(1, chosen.to(grid.device)[:, None])[:, 0].to("cpu", torch.float32),
        lam_max=lam_max.detach().to("cpu", torch.float32),
        mean=standardization.mean.detach().to("cpu", torch.float32),
        std=standardization.std.detach().to("cpu", torch.float32),
        lambdas=grid.detach().to("cpu", torch.float64),
        cv_mse=cv_mse,
        fold_mse=fold_mse,
        chosen_index=chosen,
        fold_of_row=fold_of_row,
        n=n,
        folds=folds,
        seconds=seconds,
        info={"stats_seconds": stats_seconds, "iterations": float(iterations)},
    )


def _cross_validate(
    problems: list[CenteredProblem],
    parts: list[SufficientStats],
    standardization: Standardization,
    grid: torch.Tensor,
    *,
    engine: str,
    dtype: torch.dtype,
    tol: float,
    max_iter: int,
    min_lambdas: int,
    patience: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Walk every fold's path in step, lambda by lambda, scoring each fold on its own rows.

    ``problems[f]``: fold ``f``'s training problem (the other folds' rows); ``parts[f]``: fold
    ``f``'s own sums. A :class:`~dm_assets.regression.path.PathTracker` on the summed error
    decides which targets go on (``min_lambdas = patience = k``: all of them, to the end).

    Returns ``fold_mse`` float64 ``(folds, t, k)``, ``cv_mse`` float64 ``(t, k)`` (NaN where a
    target stopped), ``chosen`` int64 ``(t,)`` (the first argmin), and the iterations or sweeps
    of the slowest target, summed over folds and steps. Warns
    :class:`~dm_assets.regression.gram.GramConvergenceWarning` when a solve hit ``max_iter``.
    """
    t, k = grid.shape
    n = sum(part.n for part in parts)
    p = int(problems[0].c.shape[0])
    solvers = [_Engine(engine, problem, dtype, tol, max_iter) for problem in problems]
    tracker = PathTracker(grid, min_lambdas=min_lambdas, patience=patience)
    fold_mse = torch.full((len(parts), t, k), float("nan"), dtype=torch.float64)
    weights = [torch.zeros(p, t, dtype=torch.float64, device=device) for _ in parts]
    sparse = engine == "cd"
    iterations, unconverged = 0, 0
    grid_d = grid.to(device)
    for step in range(k):
        ids = torch.nonzero(tracker.active)[:, 0].to(device)
        if ids.numel() == 0:
            break
        lam = grid_d[ids, step]
        squared = torch.zeros(ids.numel(), dtype=torch.float64, device=device)
        train = torch.zeros_like(squared)
        nonzeros = torch.zeros(ids.numel(), dtype=torch.int64, device=device)
        for f, (solver, problem, held) in enumerate(zip(solvers, problems, parts, strict=True)):
            w, converged, its, train_mse = solver.solve(ids, lam, weights[f][:, ids])
            w = w.to(torch.float64)
            weights[f][:, ids] = w
            iterations += its
            unconverged += int((~converged).sum())
            bias = problem.intercept(w, ids)
            val = _validation_mse(held, standardization, w, bias, ids, sparse=sparse)
            fold_mse[f, ids.cpu(), step] = val.cpu()
            squared += val * held.n
            train += train_mse.to(torch.float64) * problem.n
            nonzeros += (w != 0).sum(0)
        # the tracker's "validation MSE" is the CV error; "training MSE" the folds' mean
        tracker.record(step, ids, train / (n * (len(parts) - 1)), squared / n, nonzeros)
    if unconverged:
        warnings.warn(
            f"{unconverged} (fold, target, lambda) solves stopped at max_iter={max_iter} before "
            f"the duality gap reached tol={tol}: raise max_iter, or loosen tol",
            GramConvergenceWarning,
            stacklevel=3,  # the caller of cross_validated_lasso
        )
    return fold_mse, tracker.val_mse.clone(), tracker.best_step.clone(), iterations


def _refit_path(
    solver: _Engine, grid: torch.Tensor, chosen: torch.Tensor, p: int
) -> tuple[torch.Tensor, int]:
    """float64 ``(p, t)``: each target solved at ``grid[j, chosen[j]]`` on ``solver``'s problem
    (all rows), walking its grid from the top with warm starts (a target leaves once it reaches
    its lambda); and the iterations or sweeps of the slowest target, summed over the steps.
    Warns :class:`~dm_assets.regression.gram.GramConvergenceWarning` when a solve stopped at
    ``max_iter``."""
    t = int(grid.shape[0])
    weight = torch.zeros(p, t, dtype=torch.float64, device=grid.device)
    final = torch.zeros_like(weight)
    iterations, unconverged = 0, 0
    for step in range(int(chosen.max()) + 1 if t else 0):
        ids = torch.nonzero(chosen >= step)[:, 0]
        w, converged, its, _ = solver.solve(ids, grid[ids, step], weight[:, ids])
        weight[:, ids] = w.to(torch.float64)
        iterations += its
        unconverged += int((~converged).sum())
        done = ids[chosen[ids] == step]
        final[:, done] = weight[:, done]
    if unconverged:
        warnings.warn(
            f"the refit on all rows: {unconverged} (target, lambda) solves stopped at "
            f"max_iter={solver.max_iter} before the duality gap reached tol={solver.tol}: "
            "raise max_iter, or loosen tol",
            GramConvergenceWarning,
            stacklevel=3,  # the caller of cross_validated_lasso
        )
    return final, iterations


def lasso_cv_options(config: RegressionConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`cross_validated_lasso` that a regression config sets:
    ``k``, ``eps``, ``use_bias``, ``batch_size``, ``tol`` (default 1e-6), ``max_iter`` (default
    5000) from ``cfg``, ``device`` (``cfg.device``, ``auto`` resolved), ``seed``
    (``data.seed``), and the main fit's early stopping (``early_stopping.min_lambdas``,
    ``early_stopping.patience``), applied to the summed CV error. ``cfg.solver`` does not
    apply: cross-validation always runs on sufficient statistics (it needs ``p x p`` sums per
    fold); the split keys of ``data`` do not either."""
    from dm_assets.regression.compute_datamodels import resolve_device

    c = config["cfg"]
    return {
        "k": int(c["k"]),
        "eps": float(c["eps"]),
        "use_bias": bool(c["use_bias"]),
        "batch_size": int(c["batch_size"]),
        "tol": float(c["tol"] or 1e-6),
        "max_iter": int(c["max_iter"] or 5000),
        "device": resolve_device(str(c["device"])),
        "seed": int(config["data"]["seed"]),
        "min_lambdas": int(config["early_stopping"]["min_lambdas"]),
        "patience": int(config["early_stopping"]["patience"]),
    }
