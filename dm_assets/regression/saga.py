"""Minibatch proximal SAGA for the LASSO path of many targets at once (the fast_l1 algorithm).

Objective per target ``t`` over ``n`` fitting rows (masks ``x_i``, outputs ``y_it``)::

    (1 / (2 n)) * sum_i (y_it - x_std_i . w_t - b_t)^2 + lambda_t * ||w_t||_1
    x_std = (x - mean) / std,   mean, std: column statistics of the TRAINING rows

The intercept ``b_t`` is not penalized. It is eliminated exactly rather than learned by SAGA:
the solver works in a frame centered on the fitting rows (``z = (x - shift) / std``,
``u = y - offset`` with ``shift``, ``offset`` the fitting rows' means), where the best intercept
is zero for every ``w``; afterwards ``b = offset - ((shift - mean) / std) . w``. On the training
rows ``shift == mean`` and ``b = mean(y)``; for the refit on train + validation rows the bias
absorbs the shift of the column means. This is what scikit-learn does for ``fit_intercept``,
and removes the noise a stochastic intercept update would add.

This module is the entry points and their argument checks; the solver's parts live in:

- :mod:`~dm_assets.regression.saga_rows`: the frame, the rows (cached on the device or
  streamed) and the SAGA residual table (on the device or in pinned host memory);
- :mod:`~dm_assets.regression.saga_kernel`: one SAGA epoch, the duality gap, the step size,
  the full-gradient step;
- :mod:`~dm_assets.regression.saga_driver`: epochs until each target is done (convergence
  checks, divergence, the epoch cap), and a solve at fixed lambdas;
- :mod:`~dm_assets.regression.saga_path`: the path with early stopping, and the refit.

Differences from upstream ``fast_l1.train_saga``: lambda_max on standardized features (upstream
used raw 0/1 masks, about half the true value, so the path did not start at w = 0); the SAGA
table initialized with the true residuals (upstream: zeros, a biased first epoch); a duality-gap
stopping test, checked inside the epochs, and a proximal full-gradient step after each check;
an epoch cap with a warning and a divergence error instead of endless loops; a step size
derived from the data; the refit warm-started at the chosen lambda instead of from a dense
``lambda = 0`` fit; the rows cached on the device when they fit; torch only (no cupy), on CPU
or CUDA.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dm_assets.regression.config import MIN_LAMBDAS, PATIENCE
from dm_assets.regression.data import RowSource
from dm_assets.regression.path import LassoPathResult, Standardization
from dm_assets.regression.saga_driver import SagaSettings, solve_fixed, warn_capped
from dm_assets.regression.saga_kernel import step_size
from dm_assets.regression.saga_path import PathWalk, refit_targets, walk_path
from dm_assets.regression.saga_rows import CACHE_BYTES, Frame, Rows
from dm_assets.regression.stats import accumulate_stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SagaSolution:
    """What :func:`saga_fixed_lambda` returns; tensors on the CPU.

    ``weight`` float32 ``(p, t)`` and ``bias`` float32 ``(t,)`` act on masks standardized by
    ``mean``/``std`` (float32 ``(p,)``); ``lam`` float64 ``(t,)``; ``gap`` float64 ``(t,)``
    each target's final duality gap and ``objective`` its final objective; ``epochs`` int64
    ``(t,)`` epochs run per target; ``converged`` bool ``(t,)``: ``gap <= tol * var(y)``;
    ``lr`` the step size used; ``seconds`` the wall time.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    lam: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    gap: torch.Tensor
    objective: torch.Tensor
    epochs: torch.Tensor
    converged: torch.Tensor
    lr: float
    seconds: float


def saga_fixed_lambda(
    source: RowSource,
    rows: Sequence[int] | np.ndarray,
    lam: torch.Tensor | float,
    *,
    batch_size: int,
    standardization: Standardization | None = None,
    weight: torch.Tensor | None = None,
    lr: float | None = None,
    use_bias: bool = True,
    device: torch.device | str = "cpu",
    tol: float = 1e-4,
    check_every: int = 1,
    max_epochs: int = 200,
    seed: int = 0,
    table_on_host: bool | None = None,
    cache_bytes: int = CACHE_BYTES,
) -> SagaSolution:
    """Solve the LASSO of every target at one fixed lambda each, by proximal SAGA.

    Minimizes, per target ``t`` over the ``n`` ``rows`` of ``source``::

        (1 / (2 n)) * ||y_t - X_std w_t - b_t||^2 + lam_t * ||w_t||_1

    Targets whose lambda is at least their ``lambda_max`` get ``w = 0`` exactly.

    Parameters
    ----------
    source : RowSource
        The rows (``n_rows`` masks of ``p`` 0/1 features, ``t`` targets).
    rows : int array-like, shape (n,)
        Distinct row positions to fit on.
    lam : float or float tensor, shape (t,)
        Each target's lambda (one float: all targets).
    standardization : Standardization, optional
        The column statistics ``X_std`` uses (default: those of ``rows``).
    weight : float tensor, shape (p, t), optional
        Warm start in the standardized coordinates (default 0).
    batch_size, lr, use_bias, device, tol, check_every, max_epochs, seed, table_on_host, cache_bytes
        As :func:`fit_saga`'s (``cache_bytes`` for the ``rows``).

    Returns
    -------
    SagaSolution
        The weights, biases, duality gaps and objectives, on the CPU.

    Raises
    ------
    ValueError
        For invalid arguments, all problems at once.
    ~dm_assets.regression.saga_driver.SagaDivergedError
        When the iterates blow up (lower ``lr``). Targets that reach ``max_epochs`` emit a
        :class:`~dm_assets.regression.saga_driver.SagaConvergenceWarning`.
    """
    start = time.perf_counter()
    device = torch.device(device)
    settings = SagaSettings(
        batch_size, lr, tol, check_every, max_epochs, seed, table_on_host, cache_bytes
    )
    positions, lam_t = _checked_fixed_arguments(source, rows, lam, weight, settings)
    p, t = source.n_features, source.n_targets
    stats = accumulate_stats(source, positions, batch_size=batch_size, device=device, gram=False)
    std = standardization if standardization is not None else stats.standardization()
    frame = Frame.of(stats, std, use_bias=use_bias)
    fit_rows = Rows.of(source, positions, batch_size, frame, cache_bytes, seed=seed)
    if lr is None:
        lr, _ = step_size(fit_rows, seed)
    sched = settings.schedule(lr)
    init = torch.zeros((p, t)) if weight is None else weight.detach()
    init = init.to(device, torch.float32)
    out = solve_fixed(fit_rows, lam_t, init, sched, table_on_host)
    warn_capped(sched, "fixed-lambda fit", stacklevel=2)
    ids = torch.arange(t, device=device)
    return SagaSolution(
        weight=out.weight.cpu(),
        bias=frame.bias(out.weight, ids).to("cpu", torch.float32),
        lam=lam_t,
        mean=std.mean.to("cpu", torch.float32),
        std=std.std.to("cpu", torch.float32),
        gap=out.gap,
        objective=out.objective,
        epochs=out.epochs,
        converged=(out.gap <= tol * frame.scale.cpu()) | (lam_t >= frame.lam_max.cpu()),
        lr=lr,
        seconds=time.perf_counter() - start,
    )


def fit_saga(
    source: RowSource,
    train_rows: Sequence[int] | np.ndarray,
    val_rows: Sequence[int] | np.ndarray,
    *,
    k: int,
    eps: float,
    batch_size: int,
    lr: float | None = None,
    use_bias: bool = True,
    device: torch.device | str = "cpu",
    tol: float = 1e-4,
    check_every: int = 1,
    max_epochs: int = 200,
    min_lambdas: int = MIN_LAMBDAS,
    patience: int = PATIENCE,
    refit: bool = True,
    seed: int = 0,
    table_on_host: bool | None = None,
    cache_bytes: int = CACHE_BYTES,
    progress: bool = False,
) -> LassoPathResult:
    """The LASSO path of every target by minibatch proximal SAGA, lambda chosen on validation.

    Objective per target ``t`` on the ``n`` training rows, ``X_std = (X - mean) / std`` with
    the training rows' column statistics::

        (1 / (2 n)) * ||y_t - X_std w_t - b_t||^2 + lambda_t * ||w_t||_1

    Each target walks its own geometric grid of ``k`` lambdas from its ``lambda_max`` (the
    smallest lambda with ``w = 0``: ``max |X_std^T (y - mean(y))| / n``) down to
    ``eps * lambda_max``, warm-started from the previous lambda. A target moves on when its
    duality gap is at most ``tol * var(y)``, and leaves the computation when the
    :class:`~dm_assets.regression.path.PathTracker` stops it (validation MSE not improved for
    ``patience`` lambdas after ``min_lambdas``, or the grid's end); its weights at the best
    validation MSE are kept. With ``refit``, each target is then re-solved at its chosen lambda
    on train + validation rows, warm-started from those weights, with the same (training)
    standardization. The module docs of :mod:`~dm_assets.regression.saga_kernel` and
    :mod:`~dm_assets.regression.saga_driver` have the algorithm.

    Memory: the SAGA table holds ``4 * n * t`` bytes (float32, ``n`` = training rows, then
    train + validation rows for the refit), plus ``3 * 4 * p * t`` for the weights, gradient
    average and best weights. On CUDA the table stays on the device when it fits in half the
    free memory, else in pinned host memory (slower: a gather and scatter over PCIe per batch).
    The rows themselves are cached on the device, standardized, when their ``4 * n * (p + t)``
    bytes fit in ``cache_bytes`` (the validation rows too when both fit); else streamed.

    Parameters
    ----------
    source : RowSource
        The rows (``n_rows`` masks of ``p`` 0/1 features, ``t`` targets).
    train_rows, val_rows : int array-like, shapes (n,) and (n_val,)
        Distinct and disjoint row positions to fit on / to choose lambda on; both non-empty.
    k : int
        Number of lambdas per target (``k == 1``: ``eps * lambda_max`` alone).
    eps : float
        Smallest lambda over ``lambda_max``, in ``(0, 1]``.
    batch_size : int
        Rows per minibatch ``B`` (also the batch of the statistics passes).
    lr : float, optional
        Step size; None (default) derives ``1 / (3 L_B)`` from the data, ``L_B`` an estimate of
        the minibatch smoothness (:func:`~dm_assets.regression.saga_kernel.step_size`);
        reported in ``info["lr"]``.
    use_bias : bool
        Fit an unpenalized intercept (default True); False fixes ``b = 0``.
    device : torch.device or str
        Where the arithmetic runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
    tol : float
        Duality gap over ``var(y)`` at which a lambda counts as solved (default 1e-4, as
        scikit-learn's ``Lasso``); step-size independent.
    check_every : int
        Epochs at a lambda between a target's convergence tests (default 1). A test estimates
        the duality gap from the epoch's own residuals at no cost; a target whose estimate is
        near ``tol`` is checked exactly in the next epoch, where it takes no step, then
        validated (one pass over the validation rows, for the targets done). Larger values
        only delay the tests.
    max_epochs : int
        Epochs per (target, lambda) before giving up on that lambda with a
        :class:`~dm_assets.regression.saga_driver.SagaConvergenceWarning` (default 200).
    min_lambdas, patience : int
        The early-stopping rule (default 10, 1: the reference's rule).
    refit : bool
        Refit at the chosen lambda on train + validation rows (default True).
    seed : int
        Seeds the minibatch order (epoch ``e`` uses a seed from ``seed`` and ``e``) and the
        layout of the cached rows.
    table_on_host : bool, optional
        Force the SAGA table to host (True) or device (False) memory on CUDA; None decides
        from the free memory. Ignored on CPU.
    cache_bytes : int
        Memory on ``device`` for the cached rows (default 1 GiB; 0: always stream from
        ``source``).
    progress : bool
        Show a tqdm bar of targets finished.

    Returns
    -------
    LassoPathResult
        ``solver="saga"``; its ``info`` holds ``lr``, ``batch_smoothness`` (0 when ``lr`` was
        given), ``epochs_path`` and ``epochs_refit`` (passes over the fitting rows), ``checks``
        (passes with exact checks), ``checked_targets`` (exact checks), ``estimate_ratio``
        (median of estimated over exact gap, last 4096 checks), ``cached`` (1 when the
        training rows were cached), ``epochs_per_lambda_mean``/``_max`` (steps per target and
        lambda), ``capped_fits`` and ``seconds_stats``/``_path``/``_refit``.

    Raises
    ------
    ValueError
        For invalid arguments, all problems at once.
    ~dm_assets.regression.saga_driver.SagaDivergedError
        When the iterates blow up (lower ``lr``).
    """
    start = time.perf_counter()
    device = torch.device(device)
    settings = SagaSettings(
        batch_size, lr, tol, check_every, max_epochs, seed, table_on_host, cache_bytes
    )
    train, val = _checked_path_arguments(
        source, train_rows, val_rows, settings, k, eps, min_lambdas, patience
    )
    stats = accumulate_stats(source, train, batch_size=batch_size, device=device, gram=False)
    standardization = stats.standardization()
    frame = Frame.of(stats, standardization, use_bias=use_bias)
    walk = walk_path(
        source,
        train,
        val,
        frame,
        settings,
        k=k,
        eps=eps,
        min_lambdas=min_lambdas,
        patience=patience,
        progress=progress,
    )
    seconds_stats, sched = walk.started - start, walk.sched
    ids = torch.arange(source.n_targets, device=device)
    weight, bias = walk.weight, frame.bias(walk.weight, ids)
    epochs_path, seconds_path = sched.epochs_run, time.perf_counter() - walk.started
    warn_capped(sched, "path", stacklevel=2)
    capped_path = sched.capped
    if refit:
        sched.capped = 0
        chosen = walk.tracker.chosen_lambda
        args = (source, train, val, stats, standardization, weight, chosen, sched, settings)
        weight, bias = refit_targets(*args, use_bias=use_bias)
        warn_capped(sched, "refit", stacklevel=2)
    result = LassoPathResult.from_tracker(
        walk.tracker,
        weight=weight,
        bias=bias,
        lam_max=frame.lam_max,
        standardization=standardization,
        n_train=len(train),
        n_val=len(val),
        solver="saga",
        refit=refit,
    )
    result.seconds = time.perf_counter() - start
    result.info = _path_info(walk, epochs_path, capped_path, refit)
    result.info.update(
        seconds_stats=seconds_stats,
        seconds_path=seconds_path,
        seconds_refit=result.seconds - seconds_stats - seconds_path,
    )
    logger.info(
        "SAGA done in %.1f s: %d path epochs, %d refit epochs",
        result.seconds,
        epochs_path,
        sched.epochs_run - epochs_path,
    )
    return result


def _path_info(walk: PathWalk, epochs_path: int, capped_path: int, refit: bool) -> dict[str, float]:
    """``LassoPathResult.info`` of a SAGA fit (its counters, the seconds aside)."""
    sched = walk.sched
    per_lambda = sched.epochs_per_lambda or [0]
    return {
        "lr": sched.lr,
        "batch_smoothness": walk.smoothness,
        "epochs_path": float(epochs_path),
        "epochs_refit": float(sched.epochs_run - epochs_path),
        "checks": float(sched.checks),
        "checked_targets": float(sched.checked_targets),
        "estimate_ratio": math.exp(float(np.median(sched.log_ratios or [0.0]))),
        "cached": float(walk.cached),
        "epochs_per_lambda_mean": float(np.mean(per_lambda)),
        "epochs_per_lambda_max": float(np.max(per_lambda)),
        "capped_fits": float(capped_path + (sched.capped if refit else 0)),
    }


def _checked_fixed_arguments(
    source: RowSource,
    rows: Sequence[int] | np.ndarray,
    lam: torch.Tensor | float,
    weight: torch.Tensor | None,
    settings: SagaSettings,
) -> tuple[np.ndarray, torch.Tensor]:
    """``(positions int64 (n,), lam float64 (t,) on the CPU)`` for :func:`saga_fixed_lambda`;
    raises ``ValueError`` listing every problem."""
    errors: list[str] = []
    positions = _as_rows("rows", rows, source.n_rows, errors)
    errors += settings.problems()
    p, t = source.n_features, source.n_targets
    lam_t = torch.as_tensor(lam, dtype=torch.float64).reshape(-1).cpu()
    if lam_t.numel() == 1:
        lam_t = lam_t.expand(t).clone()
    if lam_t.numel() != t or not bool((lam_t >= 0).all()):
        errors.append(f"lam must be one or {t} non-negative values; got {lam_t.numel()} values")
    if weight is not None and tuple(weight.shape) != (p, t):
        errors.append(f"weight must have shape ({p}, {t}); got {tuple(weight.shape)}")
    _raise_errors(errors)
    return positions, lam_t


def _checked_path_arguments(
    source: RowSource,
    train_rows: Sequence[int] | np.ndarray,
    val_rows: Sequence[int] | np.ndarray,
    settings: SagaSettings,
    k: int,
    eps: float,
    min_lambdas: int,
    patience: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` int64 row positions for :func:`fit_saga`; raises ``ValueError``
    listing every problem."""
    errors: list[str] = []
    train = _as_rows("train_rows", train_rows, source.n_rows, errors)
    val = _as_rows("val_rows", val_rows, source.n_rows, errors)
    if np.intersect1d(train, val).size:
        errors.append("train_rows and val_rows share row positions; they must be disjoint")
    errors += settings.problems()
    if k < 1:
        errors.append(f"k (the number of lambdas) must be at least 1; got {k}")
    if min_lambdas < 1 or patience < 1:
        errors.append(
            f"min_lambdas and patience must be at least 1; got {min_lambdas} and {patience}"
        )
    if not 0 < eps <= 1:
        errors.append(f"eps (smallest lambda / lambda_max) must be in (0, 1]; got {eps}")
    _raise_errors(errors)
    return train, val


def _as_rows(
    name: str, rows: Sequence[int] | np.ndarray, n_rows: int, errors: list[str]
) -> np.ndarray:
    """``rows`` as int64 ``(n,)``; appends to ``errors`` when empty, out of range or
    repeated."""
    arr = np.asarray(rows, dtype=np.int64).reshape(-1)
    if arr.size == 0:
        errors.append(f"{name} is empty; it needs at least one row position")
    elif arr.min() < 0 or arr.max() >= n_rows:
        errors.append(
            f"{name} holds positions outside [0, {n_rows}) (min {arr.min()}, max {arr.max()})"
        )
    elif np.unique(arr).size != arr.size:
        errors.append(f"{name} repeats row positions; pass each row once")
    return arr


def _raise_errors(errors: list[str]) -> None:
    if errors:
        raise ValueError("invalid SAGA arguments:\n  " + "\n  ".join(errors))
