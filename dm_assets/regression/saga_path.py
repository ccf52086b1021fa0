"""The SAGA solver's two phases: each target's path with early stopping, then the refit.

The path: each target walks its own geometric grid of ``k`` lambdas from its ``lambda_max``
down to ``eps * lambda_max``, warm-started from the previous lambda (and, on the way, from the
full-gradient step its last check gave it). When it is done at a lambda its validation MSE is
computed (one pass over the validation rows for the targets done together) and recorded in the
:class:`~dm_assets.regression.path.PathTracker`; its weights are kept when they improved, and it
leaves the computation when the tracker stops it (``patience`` lambdas without improvement
after ``min_lambdas``, or the grid's end). Finished targets are dropped from every array.

The refit: each target at its chosen lambda on train + validation rows, warm-started from its
best path weights, with the training standardization (the frame centered on the new rows, the
bias absorbing the shift of the column means).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from dm_assets.regression.data import RowSource
from dm_assets.regression.path import PathTracker, Standardization, lambda_grid
from dm_assets.regression.saga_driver import Check, SagaSettings, Schedule, drive, solve_fixed
from dm_assets.regression.saga_kernel import Active, mean_squared_error, step_size
from dm_assets.regression.saga_rows import Frame, Rows, cache_size
from dm_assets.regression.stats import SufficientStats, accumulate_stats

logger = logging.getLogger(__name__)


@dataclass
class PathRecorder:
    """``on_done`` for the path: records each done target's step in the tracker, keeps its
    weights when validation improved, and moves it to its next lambda or out.

    ``lambdas`` float64 ``(t, k)`` on the device; ``val_rows`` the validation rows in the
    training frame; ``n_train`` the training rows; ``best_weight`` float32 ``(p, t)`` on the
    device, each target's weights at its best validation MSE; ``steps`` int64 ``(t,)`` on the
    CPU, each target's current step; ``bar`` counts the targets that left.
    """

    tracker: PathTracker
    lambdas: torch.Tensor
    val_rows: Rows
    n_train: int
    best_weight: torch.Tensor
    steps: torch.Tensor
    bar: tqdm | None

    def __call__(self, active: Active, done: torch.Tensor, check: Check) -> torch.Tensor:
        device = active.weight.device
        if check.val_mse is None:
            check.val_mse = torch.full_like(check.rss, math.nan)
        # one validation pass for the done targets that have none at these weights yet
        need = (done.to(device) & check.val_mse.isnan()).nonzero()[:, 0]
        if need.numel():
            check.val_mse[need] = mean_squared_error(
                self.val_rows, active.weight.index_select(1, need), active.ids[need]
            )
        self._record(active, done, check)
        leaving = done & ~self.tracker.active[active.ids_cpu]
        moving = done & ~leaving
        self.steps[active.ids_cpu[moving]] += 1
        moving_dev = moving.to(device)
        next_step = self.steps[active.ids_cpu[moving]].to(device)
        active.lam[moving_dev] = self.lambdas[active.ids[moving_dev], next_step]
        active.epochs[moving] = 0
        if self.bar is not None:
            self.bar.update(int(leaving.sum()))
        return leaving

    def _record(self, active: Active, done: torch.Tensor, check: Check) -> None:
        """The done targets' MSEs and nonzeros in the tracker, step by step; their weights to
        ``best_weight`` where validation improved."""
        assert check.val_mse is not None
        device = active.weight.device
        train_mse = check.rss / self.n_train
        nonzeros = (active.weight != 0).sum(0)
        steps = self.steps[active.ids_cpu]
        for step in steps[done].unique().tolist():
            cols = (done & (steps == step)).nonzero()[:, 0]
            on_device = cols.to(device)
            improved = self.tracker.record(
                step,
                active.ids_cpu[cols],
                train_mse[on_device],
                check.val_mse[on_device],
                nonzeros[on_device],
            )
            better = on_device[improved.to(device)]
            self.best_weight[:, active.ids[better]] = active.weight[:, better]


@dataclass
class PathWalk:
    """What the path leaves: ``weight`` float32 ``(p, t)`` on the device, each target's
    weights at its best validation MSE; the ``tracker`` (the path's tables, the chosen
    lambdas); the schedule ``sched`` (its ``lr`` and counters); ``smoothness`` the estimated
    minibatch smoothness (0 when ``lr`` was given); ``cached`` whether the training rows were
    cached; ``started`` the ``time.perf_counter()`` at which the path itself started (after the
    caches and the step size)."""

    weight: torch.Tensor
    tracker: PathTracker
    sched: Schedule
    smoothness: float
    cached: bool
    started: float


def walk_path(
    source: RowSource,
    train: np.ndarray,
    val: np.ndarray,
    frame: Frame,
    settings: SagaSettings,
    *,
    k: int,
    eps: float,
    min_lambdas: int,
    patience: int,
    progress: bool,
) -> PathWalk:
    """Every target's path on the ``train`` rows of ``source`` in ``frame``, scored on the
    ``val`` rows (int64 positions); arguments as :func:`~dm_assets.regression.saga.fit_saga`'s.
    The training rows are cached first, then the validation rows in what budget is left; the
    caches are freed on return."""
    batch_size, cache_bytes, seed = settings.batch_size, settings.cache_bytes, settings.seed
    train_fit = Rows.of(source, train, batch_size, frame, cache_bytes, seed=seed)
    val_budget = cache_bytes - cache_size(len(train), source) if train_fit.cache else 0
    val_eval = Rows.of(source, val, batch_size, frame, val_budget)
    lr, smoothness = settings.lr, 0.0
    if lr is None:
        lr, smoothness = step_size(train_fit, seed)
    sched = settings.schedule(lr)
    started = time.perf_counter()
    logger.info(
        "SAGA path: %d train / %d validation rows, %d features, %d targets, k=%d, lr=%.3g",
        len(train),
        len(val),
        source.n_features,
        source.n_targets,
        k,
        lr,
    )
    lambdas = lambda_grid(frame.lam_max, k, eps)
    tracker = PathTracker(lambdas, min_lambdas=min_lambdas, patience=patience)
    weight = _run(train_fit, val_eval, lambdas, tracker, sched, settings.table_on_host, progress)
    return PathWalk(weight, tracker, sched, smoothness, train_fit.cache is not None, started)


def _run(
    train_fit: Rows,
    val_eval: Rows,
    lambdas: torch.Tensor,
    tracker: PathTracker,
    sched: Schedule,
    table_choice: bool | None,
    progress: bool,
) -> torch.Tensor:
    """Walk every target's path from ``w = 0`` on the grid ``lambdas`` float64 ``(t, k)``;
    returns the weights at each target's best validation MSE, float32 ``(p, t)`` on the
    device."""
    p, t = train_fit.frame.shift.shape[0], lambdas.shape[0]
    device = train_fit.device
    zeros = torch.zeros((p, t), dtype=torch.float32, device=device)
    active = Active.start(train_fit, zeros, lambdas[:, 0], table_choice)
    bar = tqdm(total=t, desc="SAGA path: targets done", disable=not progress)
    recorder = PathRecorder(
        tracker=tracker,
        lambdas=lambdas,
        val_rows=val_eval,
        n_train=train_fit.n,
        best_weight=zeros.clone(),
        steps=torch.zeros(t, dtype=torch.int64),
        bar=bar,
    )
    try:
        drive(train_fit, active, sched, recorder)
    finally:
        bar.close()
    return recorder.best_weight


def refit_targets(
    source: RowSource,
    train: np.ndarray,
    val: np.ndarray,
    train_stats: SufficientStats,
    standardization: Standardization,
    weight: torch.Tensor,
    chosen_lambda: torch.Tensor,
    sched: Schedule,
    settings: SagaSettings,
    *,
    use_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target at ``chosen_lambda`` (float64 ``(t,)``) on the ``train`` + ``val`` rows,
    warm-started from ``weight`` float32 ``(p, t)`` on the device. Returns ``(weight float32
    (p, t), bias float64 (t,))`` in the training ``standardization``; ``train_stats`` are the
    training rows' sums (the validation rows' are added)."""
    device, batch_size = weight.device, settings.batch_size
    val_stats = accumulate_stats(source, val, batch_size=batch_size, device=device, gram=False)
    frame = Frame.of(train_stats + val_stats, standardization, use_bias=use_bias)
    rows = np.concatenate([train, val])
    fit_rows = Rows.of(source, rows, batch_size, frame, settings.cache_bytes, seed=sched.seed)
    refit_weight = solve_fixed(
        fit_rows, chosen_lambda, weight, sched, settings.table_on_host
    ).weight
    ids = torch.arange(weight.shape[1], device=device)
    return refit_weight, frame.bias(refit_weight, ids)
