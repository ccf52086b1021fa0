"""The SAGA epochs until every target is done: convergence checks, divergence, the epoch cap.

Convergence: a target has converged at its lambda when its duality gap at its weights is at
most ``tol * mean(u^2)``, the criterion of scikit-learn's coordinate descent (independent of the
step size, unlike upstream's weight-change test). The gap needs the exact residuals and gradient
``Z^T r / n``, one pass over the fitting rows; it runs inside an epoch, where the target is
frozen (:func:`~dm_assets.regression.saga_kernel.saga_epoch`), for no more than the target's
share of that epoch.

Which targets to check: after every ``check_every`` epochs at its lambda, each target's gap is
estimated for free from the epoch's own residuals (the residuals it met, at the weights of
their time, and the running average ``g``); a target is checked in the next epoch when the
estimate is within its gate times the tolerance (the gate learned from the ratio of estimated
to exact gap at its checks), at its epoch cap, and at least every ``EXACT_EVERY`` epochs. The
first epoch checks every target. At ``lambda >= lambda_max`` the solution is ``w = 0`` exactly
(no iteration runs there).

What happens to a target done at its lambda is the caller's ``on_done``: the path moves it to
its next lambda or out (:mod:`dm_assets.regression.saga_path`); a fixed-lambda solve
(:func:`solve_fixed`) takes its weights out. A target that goes on takes a full-gradient step.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dm_assets.regression.saga_kernel import Active, duality_gap, saga_epoch
from dm_assets.regression.saga_rows import Frame, Rows

logger = logging.getLogger(__name__)

# An objective 1000 times its value at w = 0 is far beyond any float32 noise: the step diverged.
DIVERGENCE_FACTOR = 1e3
# An exact check at least every 5 epochs bounds the table's float32 drift, the epochs lost to a
# gap estimate that stays high, and gives slow targets a full-gradient step that often.
EXACT_EVERY = 5


class SagaConvergenceWarning(UserWarning):
    """Some (target, lambda) fits reached ``max_epochs`` before their duality gap met ``tol``."""


class SagaDivergedError(RuntimeError):
    """The iterates blew up: the step size is too large for the data."""


@dataclass(frozen=True)
class SagaSettings:
    """The iteration's settings, as :func:`~dm_assets.regression.saga.fit_saga`'s arguments of
    the same names (``lr`` None: derived from the data)."""

    batch_size: int
    lr: float | None
    tol: float
    check_every: int
    max_epochs: int
    seed: int
    table_on_host: bool | None
    cache_bytes: int

    def problems(self) -> list[str]:
        """What is wrong with the settings, one message each (empty when nothing is)."""
        errors = []
        if self.batch_size < 1:
            errors.append(f"batch_size must be at least 1; got {self.batch_size}")
        lr = self.lr
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            errors.append(f"lr must be a positive finite step size or None (derived); got {lr}")
        if not self.tol > 0:
            errors.append(f"tol (duality gap / var(y)) must be positive; got {self.tol}")
        if self.check_every < 1:
            errors.append(f"check_every must be at least 1 epoch; got {self.check_every}")
        if self.max_epochs < 1:
            errors.append(f"max_epochs must be at least 1; got {self.max_epochs}")
        if self.cache_bytes < 0:
            errors.append(
                f"cache_bytes must be at least 0 (0: never cache); got {self.cache_bytes}"
            )
        return errors

    def schedule(self, lr: float) -> Schedule:
        """A fresh schedule (counters at zero) with the step size ``lr``."""
        return Schedule(lr, self.tol, self.check_every, self.max_epochs, self.seed)


@dataclass
class Schedule:
    """Step size, stopping rule, and counters shared by the path and the refit.

    ``lr``, ``tol``, ``check_every``, ``max_epochs`` and ``seed`` as :func:`fit_saga`'s. The
    counters: ``epochs_run`` passes over the fitting rows, ``checks`` passes with exact checks,
    ``checked_targets`` exact checks, ``capped`` (target, lambda) fits stopped at
    ``max_epochs``, ``epochs_per_lambda`` the steps of each (target, lambda) fit done, and
    ``log_ratios`` the last 4096 logs of estimated over exact gap.
    """

    lr: float
    tol: float
    check_every: int
    max_epochs: int
    seed: int
    epochs_run: int = 0
    checks: int = 0
    checked_targets: int = 0
    capped: int = 0
    epochs_per_lambda: list[int] = field(default_factory=list)
    log_ratios: list[float] = field(default_factory=list)

    def epoch_seed(self) -> int:
        """The seed of the next epoch's minibatch order, from ``seed`` and ``epochs_run``."""
        return (self.seed * 1_000_003 + self.epochs_run) % 2**32


@dataclass
class Check:
    """What an epoch leaves to judge the targets by.

    ``rss`` float64 ``(a,)``: the sum of the squared residuals the epoch met; for the targets
    ``checked`` (bool ``(a,)`` on the device, frozen in it) their exact residual sum of squares
    at their weights, with their average gradient ``Z^T r / n`` exact in ``Active.avg_grad``.
    ``gap`` and ``primal`` float64 ``(a,)`` at the current lambdas are set by :func:`judge`
    (meaningful where checked), ``val_mse`` float64 ``(a,)`` filled on demand by the path (NaN
    where not computed).
    """

    checked: torch.Tensor
    rss: torch.Tensor
    gap: torch.Tensor | None = None
    primal: torch.Tensor | None = None
    val_mse: torch.Tensor | None = None

    def keep(self, mask: torch.Tensor) -> Check:
        """The check of the targets where ``mask`` (bool ``(a,)``, CPU) is True."""
        on_device = mask.to(self.rss.device)
        return Check(
            self.checked[on_device],
            self.rss[on_device],
            *(None if v is None else v[on_device] for v in (self.gap, self.primal, self.val_mse)),
        )


OnDone = Callable[[Active, torch.Tensor, Check], torch.Tensor]
"""Called with the active set, the targets done at their lambda (bool ``(a,)``, CPU) and the
check they were judged on; may move targets to a new lambda (setting ``lam``, ``epochs``);
returns which targets leave (bool ``(a,)``, CPU)."""


def raise_if_diverged(primal: torch.Tensor, frame: Frame, active: Active, lr: float) -> None:
    """Raise :class:`SagaDivergedError` when an objective (``primal`` float64 ``(a,)``, exact
    or estimated) is not finite or above ``DIVERGENCE_FACTOR`` times its value at ``w = 0``."""
    start = frame.scale[active.ids] / 2  # the objective at w = 0
    bad = ~torch.isfinite(primal) | ((primal > DIVERGENCE_FACTOR * start) & (start > 0))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise SagaDivergedError(
            f"SAGA diverged for {int(bad.sum())} target(s) (target {int(active.ids_cpu[first])}:"
            f" objective {float(primal[first]):.3g}, {float(start[first]):.3g} at w = 0) after "
            f"{int(active.epochs[first])} epoch(s) at its lambda with lr={lr:.3g}. Lower lr (e.g. "
            f"lr={lr / 10:.3g}), or pass lr=None for the step size derived from the data."
        )


def judge(
    rows: Rows, active: Active, check: Check, sched: Schedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(converged, capped)`` bool ``(a,)`` on the CPU, among the targets ``check`` covered,
    at their current lambdas; sets ``check.gap`` and ``check.primal``."""
    frame = rows.frame
    gap, primal = duality_gap(check.rss, active.avg_grad, active.weight, active.lam, rows.n)
    check.gap, check.primal = gap, primal
    converged = (gap <= sched.tol * frame.scale[active.ids]) | (
        active.lam >= frame.lam_max[active.ids]
    )
    converged = (converged & check.checked).cpu()
    capped = (active.epochs >= sched.max_epochs) & check.checked.cpu() & ~converged
    return converged, capped


def drive(rows: Rows, active: Active, sched: Schedule, on_done: OnDone) -> None:
    """Iterate until every target has left through ``on_done``.

    A target is done at its lambda when its duality gap is at most ``tol * mean(u^2)``, when
    ``lambda >= lambda_max`` (then ``w = 0`` is the exact solution), or when it has run
    ``max_epochs`` epochs there (counted in ``sched.capped``). The gap is computed exactly in
    an epoch where the target is frozen: the first one, then those :func:`_next_checks` picks.
    """
    frame, device = rows.frame, active.weight.device
    at_max = (active.lam >= frame.lam_max[active.ids]).to(device)
    active.weight[:, at_max] = 0
    frozen = torch.ones(active.size, dtype=torch.bool)  # the first pass checks every target
    estimate: torch.Tensor | None = None
    while active.size:
        frozen_dev = frozen.to(device)
        rss = saga_epoch(rows, active, sched.lr, sched.epoch_seed(), frozen)
        sched.epochs_run += 1
        active.epochs += (~frozen).long()
        active.stale = torch.where(frozen, 0, active.stale + 1)
        gap, primal = duality_gap(rss, active.avg_grad, active.weight, active.lam, rows.n)
        raise_if_diverged(primal, frame, active, sched.lr)
        if estimate is not None and bool(frozen.any()):
            observed = active.learn_gate(frozen_dev, estimate, gap).tolist()
            sched.log_ratios = (sched.log_ratios + observed)[-4096:]  # for info: the last ones
        check = Check(checked=frozen_dev, rss=rss)
        if bool(frozen.any()):
            sched.checks += 1
            sched.checked_targets += int(frozen.sum())
            settled = _settle(rows, active, check, sched, on_done)
            if settled is None:
                return
            check = settled
        estimate, frozen = _next_checks(rows, active, check, sched)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "epoch %d: %d targets active, %d checked next",
                sched.epochs_run,
                active.size,
                int(frozen.sum()),
            )


def _settle(
    rows: Rows, active: Active, check: Check, sched: Schedule, on_done: OnDone
) -> Check | None:
    """Hand the checked targets done at their lambda to ``on_done`` until none is (a target
    moved to a new lambda may be done there already), then give the checked targets that go on
    their full-gradient step. Returns ``check`` for the targets left, None when none is."""
    device = active.weight.device
    moved = torch.zeros(active.size, dtype=torch.bool)
    while True:
        converged, capped = judge(rows, active, check, sched)
        done = converged | capped
        if not bool(done.any()):
            break
        sched.capped += int(capped.sum())
        sched.epochs_per_lambda.extend(active.epochs[done].tolist())
        leaving = on_done(active, done, check)
        moved |= done & ~leaving
        if bool(leaving.any()):
            active.keep(~leaving)
            check = check.keep(~leaving)
            moved = moved[~leaving]
        if not active.size:
            return None
    assert check.gap is not None
    active.full_step(check.checked, moved.to(device), check.gap)
    return check


def _next_checks(
    rows: Rows, active: Active, check: Check, sched: Schedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(estimate, frozen)``: each target's duality gap estimated from the epoch's own
    residuals (float64 ``(a,)``), and which targets the next epoch checks exactly (bool
    ``(a,)``, CPU): those tested (every ``check_every`` epochs) whose estimate is within their
    gate times the tolerance, those at the epoch cap, and those ``EXACT_EVERY`` epochs since
    their last check."""
    frame = rows.frame
    estimate, _ = duality_gap(check.rss, active.avg_grad, active.weight, active.lam, rows.n)
    tested = (active.epochs % sched.check_every == 0) & ~check.checked.cpu()
    gate = active.log_gate.exp()
    near = (estimate <= gate * sched.tol * frame.scale[active.ids]).cpu()
    frozen = (tested & near) | (active.epochs >= sched.max_epochs)
    frozen |= active.stale >= EXACT_EVERY
    return estimate, frozen


def warn_capped(sched: Schedule, what: str, stacklevel: int) -> None:
    """Emit :class:`SagaConvergenceWarning` when ``sched.capped`` fits of the ``what`` (path,
    refit) reached ``max_epochs``; ``stacklevel`` as :func:`warnings.warn`'s, counted from
    here (2: the caller)."""
    if sched.capped:
        warnings.warn(
            f"SAGA {what}: {sched.capped} (target, lambda) fit(s) reached max_epochs="
            f"{sched.max_epochs} before the duality gap met tol={sched.tol:g} x var(y). Raise "
            f"max_epochs, raise lr (now {sched.lr:.3g}) if the problem is far from diverging, "
            "or loosen tol.",
            SagaConvergenceWarning,
            stacklevel=stacklevel,
        )


@dataclass
class Solutions:
    """``on_done`` for fixed lambdas: every done target leaves with its weights float32
    ``(p, t)``, its epochs int64 ``(t,)`` (CPU), and its final duality gap and objective
    float64 ``(t,)`` (CPU)."""

    weight: torch.Tensor
    epochs: torch.Tensor
    gap: torch.Tensor
    objective: torch.Tensor

    def __call__(self, active: Active, done: torch.Tensor, check: Check) -> torch.Tensor:
        cols = done.to(active.weight.device)
        self.weight[:, active.ids[cols]] = active.weight[:, cols]
        ids = active.ids_cpu[done]
        self.epochs[ids] = active.epochs[done]
        if check.gap is not None and check.primal is not None:
            self.gap[ids] = check.gap[cols].cpu()
            self.objective[ids] = check.primal[cols].cpu()
        return done


def solve_fixed(
    rows: Rows,
    lam: torch.Tensor,
    weight: torch.Tensor,
    sched: Schedule,
    table_choice: bool | None,
) -> Solutions:
    """Each target at its own fixed lambda (``lam`` float64 ``(t,)``), warm-started from
    ``weight`` float32 ``(p, t)`` on the device; ``table_choice`` as ``fit_saga``'s
    ``table_on_host``."""
    active = Active.start(rows, weight, lam, table_choice)
    t = weight.shape[1]
    nan = torch.full((t,), float("nan"), dtype=torch.float64)
    out = Solutions(
        weight=weight.clone(),
        epochs=torch.zeros(t, dtype=torch.int64),
        gap=nan.clone(),
        objective=nan.clone(),
    )
    drive(rows, active, sched, out)
    return out
