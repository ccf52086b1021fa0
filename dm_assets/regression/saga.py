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

Algorithm (per epoch, one shuffled pass over the fitting rows in minibatches ``b`` of size
``B``, all active targets at once; ``r_i = z_i . w - u_i`` the residual, ``table_i`` the residual
row ``i`` had when last visited, ``g = (1/n) Z^T table`` the average gradient)::

    d   = Z_b^T (r_b - table_b) / B + (|b| / B) * g     (the SAGA estimate, times |b| / B)
    w   = soft_threshold(w - lr * d, lr * (|b| / B) * lambda)
    g  += Z_b^T (r_b - table_b) / n;   table_b = r_b

The ``|b| / B`` factor gives a smaller last batch a proportionally smaller step, so every row
carries the same weight in an epoch. The table starts as the exact residuals at the warm start
(upstream: zeros, which biases the first epoch).

Rows: when the fitting rows fit in ``cache_bytes`` (``4 * n * (p + t)``), one pass over the
source stores them standardized on the device, in an order shuffled once (by ``seed``); the
minibatches are then its fixed contiguous blocks, visited in a new order each epoch: SAGA over
the ``n / B`` block means, with no per-batch copy, conversion or standardization. Otherwise every
pass streams from the source, whose shuffled passes draw new minibatches each epoch. Both
converge at the same rate per epoch; the cached epochs run at the speed of the two matrix
products per minibatch.

Step size (``lr=None``): ``1 / (3 L_B)`` (Defazio et al., 2014), ``L_B`` the minibatch
smoothness, the largest eigenvalue of ``Z_b^T Z_b / B``: it lies between the full-data
smoothness (``B = n``) and ``max_i ||z_i||^2`` (``B = 1``; for 0/1 masks at most
``sum_j max((1 - m_j)^2, m_j^2) / s_j^2``, which caps the estimate). It is estimated by power
iteration on a few shuffled minibatches, before the first epoch. On random masks the step at
which SAGA diverges is 10 to 30 times larger.

Convergence: a target has converged at its lambda when its duality gap at its weights is at
most ``tol * mean(u^2)``, the criterion of scikit-learn's coordinate descent (independent of the
step size, unlike upstream's weight-change test). The gap needs the exact residuals and gradient
``Z^T r / n``, one pass over the fitting rows; it runs inside an epoch: the target is frozen
there (no step; its table column and gradient average zeroed first), so the epoch's products
leave exactly those in its table and average, and the pass costs no more than the target's
share of an epoch (it also refreshes the table, removing float32 drift). Which targets to check:
after every ``check_every`` epochs at its lambda, each target's gap is estimated for free from
the epoch's own residuals (the residuals it met, at the weights of their time, and the running
average ``g``); a target is checked in the next epoch when the estimate is within its ``gate``
times the tolerance (learned from the ratio of estimated to exact gap at its checks), at its
epoch cap, and at least every ``EXACT_EVERY`` epochs. The first epoch checks every target. At
``lambda >= lambda_max`` the solution is ``w = 0`` exactly (no iteration runs there).

Full-gradient steps: the check leaves a target's exact gradient in ``g``; a target that goes
on (to its next lambda, or at the same one, not converged) first takes a proximal gradient step
with it, ``w = soft_threshold(w - eta * g, eta * lambda)`` (``FULL_STEP``), free of passes. On
standardized columns ``eta = 1`` solves an orthogonal design exactly: as the warm start at the
next lambda it follows the path to first order, and between SAGA epochs it moves the
directions of small curvature, where SAGA is slow, a full step (SAGA settles the others in the
next epochs). The table and average stay those of the weights before the step, consistent as
SAGA needs. A target's ``eta`` halves when its gap grows between checks (strongly correlated
columns).

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
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from dm_assets.regression.data import RowSource
from dm_assets.regression.path import LassoPathResult, PathTracker, Standardization, lambda_grid
from dm_assets.regression.stats import CenteredProblem, SufficientStats, accumulate_stats

logger = logging.getLogger(__name__)

DEVICE_TABLE_FRACTION = 0.5
"""On CUDA the SAGA table stays on the device when it needs at most this fraction of the free
device memory (``torch.cuda.mem_get_info``); otherwise it lives in pinned host memory."""

DIVERGENCE_FACTOR = 1e3
"""An objective above this multiple of its value at ``w = 0`` means the iteration diverged."""

STEP_SAFETY = 3.0
"""The derived step is ``1 / (STEP_SAFETY * L_B)`` (Defazio et al., 2014: 1 / (3 L))."""

CACHE_BYTES = 2**30
"""Default ``cache_bytes``: the fitting rows, standardized, stay in memory on the device when
their ``4 * n * (p + t)`` bytes fit in this (1 GiB); otherwise every pass reads the source."""

ESTIMATE_GATE = 1.5
"""A target gets an exact convergence check when its duality gap estimated from the last
epoch's own residuals is at most its ``gate`` times its tolerance. This is each target's first
gate; it then follows the ratio of estimated to exact gap at the target's checks (geometric
moving average, weight ``GATE_UPDATE``), within ``GATE_RANGE``. That ratio depends on the step:
about 1.3 with the derived step on datamodels-shaped problems, 0.7 to 0.9 with twice that step
(the estimate stale residuals overstate the gap, large steps make them understate it)."""

GATE_RANGE = (0.5, 2.0)
GATE_UPDATE = 0.5

EXACT_EVERY = 5
"""Epochs after which a target gets an exact check whatever its estimate says: bounds the
float32 drift of the SAGA table and the epochs lost should the estimate stay high, and gives
slowly converging targets a full-gradient step (``FULL_STEP``) that often."""

FULL_STEP = 1.0
"""After its exact check a target that goes on (not converged, or moved to its next lambda)
takes one proximal full-gradient step with the exact gradient the check left:
``w = soft_threshold(w - eta * g, eta * lambda)``, ``eta`` this at first. For standardized
columns (a unit Gram diagonal) it solves an orthogonal design exactly: the directions SAGA is
slow in (small curvature) get a full step, those of large curvature SAGA settles in the next
epochs. A target's ``eta`` halves whenever its exact gap grew more than ``STALL_FACTOR``-fold
between two checks at the same lambda: where columns are strongly correlated (curvature far
above 1) the step overshoots, and the smaller one found this way still speeds SAGA up there."""

STALL_FACTOR = 4.0


class SagaConvergenceWarning(UserWarning):
    """Some (target, lambda) fits reached ``max_epochs`` before their duality gap met ``tol``."""


class SagaDivergedError(RuntimeError):
    """The iterates blew up: the step size is too large for the data."""


@dataclass(frozen=True)
class SagaSolution:
    """What :func:`saga_fixed_lambda` returns; tensors on the CPU.

    ``weight`` float32 ``(p, t)`` and ``bias`` float32 ``(t,)`` act on masks standardized by
    ``mean``/``std`` (float32 ``(p,)``); ``lam`` float64 ``(t,)``; ``gap`` float64 ``(t,)``
    each target's final duality gap and ``objective`` its final objective; ``epochs`` int64
    ``(t,)`` epochs run per target; ``converged`` bool ``(t,)``: ``gap <= tol * var(y)``.
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


# --------------------------------------------------------------------------------------------
# The problem: rows, coordinates, the residual table


@dataclass(frozen=True)
class _Frame:
    """Coordinates of one least-squares problem: ``z = (x - shift) * inv_std``,
    ``u = y - offset``, with ``problem`` the same problem's statistics (its ``lambda_max()``,
    ``yy`` = ``mean(u^2)``, ``intercept(w)``). ``shift``, ``inv_std`` ``(p,)`` and ``offset``
    ``(t,)`` float64 on the solver's device, with float32 versions for the batches."""

    problem: CenteredProblem
    shift: torch.Tensor
    inv_std: torch.Tensor
    lam_max: torch.Tensor
    scale: torch.Tensor
    z_offset32: torch.Tensor
    inv_std32: torch.Tensor
    offset32: torch.Tensor

    @classmethod
    def of(cls, stats: SufficientStats, std: Standardization, *, use_bias: bool) -> _Frame:
        problem = stats.centered(std, fit_intercept=use_bias)
        device = stats.sum_x.device
        shift = stats.sum_x / stats.n if use_bias else std.mean.to(device)
        inv_std = 1.0 / std.std.to(device)
        return cls(
            problem=problem,
            shift=shift,
            inv_std=inv_std,
            lam_max=problem.lambda_max(),
            scale=problem.yy,
            z_offset32=(-shift * inv_std).float(),
            inv_std32=inv_std.float(),
            offset32=problem.y_bar.float(),
        )

    def z_(self, x: torch.Tensor) -> torch.Tensor:
        """The batch ``x`` float32 ``(b, p)`` standardized in place: ``x * inv_std - shift *
        inv_std``."""
        x = x if x.dtype == torch.float32 else x.float()
        return x.mul_(self.inv_std32).add_(self.z_offset32)

    def bias(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """float64 ``(a,)``: the intercept of ``weight`` ``(p, a)`` (targets ``ids``) in the
        training standardization: ``offset - ((shift - mean) / std) . w``."""
        return self.problem.intercept(weight.to(torch.float64), ids)

    def row_norm_bound(self) -> float:
        """An upper bound on ``||z_i||^2`` for 0/1 masks: each coordinate is ``(1 - shift)``
        or ``-shift`` times ``inv_std``."""
        worst = torch.maximum((1 - self.shift).square(), self.shift.square())
        return float((worst * self.inv_std.square()).sum())


_Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(z, u, index)`` on the solver's device: standardized masks float32 ``(b, p)``, centered
targets float32 ``(b, t)`` (every target), and int64 ``(b,)`` the rows' rows in the SAGA
table. Read-only: they may be views of the cache."""


@dataclass(frozen=True)
class _Rows:
    """Row positions of a source in one frame, read in minibatches, from a cache on the device
    when it was built, else streamed from the source on every pass.

    ``lookup`` int64 ``(n_rows,)`` on the device maps a source row to its index in
    ``positions`` (-1 for the others), which is its row in the SAGA table when streaming.
    ``cache``: ``z`` float32 ``(n, p)``, ``u`` float32 ``(n, t)`` (every target) and ``index``
    int64 ``arange(n)``; cached, a row's table row is its row in the cache."""

    source: RowSource
    positions: np.ndarray
    batch_size: int
    frame: _Frame
    lookup: torch.Tensor
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(
        cls,
        source: RowSource,
        positions: np.ndarray,
        batch_size: int,
        frame: _Frame,
        cache_bytes: int,
        *,
        seed: int | None = None,
    ) -> _Rows:
        """The rows, cached on the device when their ``4 * n * (p + t)`` bytes are at most
        ``cache_bytes`` (one pass over the source builds it). With ``seed`` (rows SAGA fits
        on), the cache holds them in an order shuffled by ``seed`` (see :meth:`batches`)."""
        device = frame.shift.device
        n, p, t = len(positions), source.n_features, source.n_targets
        lookup = torch.full((source.n_rows,), -1, dtype=torch.int64)
        lookup[torch.from_numpy(positions)] = torch.arange(n)
        rows = cls(source, positions, batch_size, frame, lookup.to(device))
        if _cache_bytes(n, source) > cache_bytes:
            return rows
        slot = torch.arange(n) if seed is None else torch.from_numpy(_permutation(seed, n))
        slot = slot.to(device)
        z = torch.empty((n, p), dtype=torch.float32, device=device)
        u = torch.empty((n, t), dtype=torch.float32, device=device)
        for zb, ub, index in rows._stream(shuffle=False, seed=0):
            z.index_copy_(0, slot[index], zb)
            u.index_copy_(0, slot[index], ub)
        return replace(rows, cache=(z, u, torch.arange(n, device=device)))

    @property
    def n(self) -> int:
        return len(self.positions)

    @property
    def device(self) -> torch.device:
        return self.frame.shift.device

    def batches(self, *, shuffle: bool = False, seed: int = 0) -> Iterator[_Batch]:
        """The rows in minibatches of ``batch_size`` (the last may be smaller), in order or
        shuffled (a different order for each ``seed``).

        Streamed, a shuffled pass is the source's (ArraySource: a new permutation of the rows
        each time). Cached, the minibatches are the fixed blocks of the once-shuffled layout,
        visited in a shuffled order: views of the cache, no copies (minibatch SAGA over a
        fixed partition of the rows is SAGA over ``n / B`` functions, each the mean of a
        block)."""
        if self.cache is None:
            yield from self._stream(shuffle=shuffle, seed=seed)
            return
        z, u, index = self.cache
        n, size = self.n, self.batch_size
        blocks = range(-(-n // size))
        for block in _permutation(seed, len(blocks)).tolist() if shuffle else blocks:
            part = slice(block * size, min(block * size + size, n))
            yield z[part], u[part], index[part]

    def _stream(self, *, shuffle: bool, seed: int) -> Iterator[_Batch]:
        for x, y, pos in self.source.batches(
            self.positions, self.batch_size, device=self.device, shuffle=shuffle, seed=seed
        ):
            index = self.lookup[pos.to(self.device)]
            # the source's tensors are ours: standardized and centered in place
            y = y if y.dtype == torch.float32 else y.float()
            yield self.frame.z_(x), y.sub_(self.frame.offset32), index


def _permutation(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def _cache_bytes(n: int, source: RowSource) -> int:
    """Bytes the cache of ``n`` rows of ``source`` needs: float32 ``z`` and ``u``."""
    return 4 * n * (source.n_features + source.n_targets)


class _ResidualTable:
    """Each fitting row's residual when it was last visited: float32 ``(n, a)``, on the device
    or in pinned host memory (then gathered and scattered per minibatch)."""

    def __init__(self, n: int, a: int, device: torch.device, on_host: bool) -> None:
        self.device = device
        self.on_host = on_host and device.type != "cpu"
        values = torch.zeros((n, a), dtype=torch.float32, device="cpu" if self.on_host else device)
        self.values = values.pin_memory() if self.on_host else values

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        if self.on_host:
            return self.values.index_select(0, rows.cpu()).to(self.device)
        return self.values.index_select(0, rows)

    def scatter(self, rows: torch.Tensor, residual: torch.Tensor) -> None:
        if self.on_host:
            self.values.index_copy_(0, rows.cpu(), residual.cpu())
        else:
            self.values.index_copy_(0, rows, residual)

    def zero_columns(self, columns: torch.Tensor) -> None:
        self.values.index_fill_(1, columns.to(self.values.device), 0.0)

    def keep(self, columns: torch.Tensor) -> None:
        kept = self.values[:, columns.to(self.values.device)].contiguous()
        self.values = kept.pin_memory() if self.on_host else kept


def _table_on_host(choice: bool | None, device: torch.device, n: int, t: int) -> bool:
    """Where the ``4 * n * t``-byte table lives; None decides from the free device memory."""
    if device.type != "cuda":
        return False
    if choice is not None:
        return choice
    free, _ = torch.cuda.mem_get_info(device)
    on_host = 4 * n * t > DEVICE_TABLE_FRACTION * free
    logger.info(
        "SAGA table %d x %d (%.2f GB) %s (%.2f GB free on %s)",
        n,
        t,
        4 * n * t / 1e9,
        "in pinned host memory" if on_host else "on the device",
        free / 1e9,
        device,
    )
    return on_host


# --------------------------------------------------------------------------------------------
# The iterate and its passes


@dataclass
class _Active:
    """The targets still being solved: ``ids`` int64 ``(a,)`` (original target ids, in
    increasing order, on the device; ``ids_cpu`` the same on the CPU), ``weight`` and
    ``avg_grad`` float32 ``(p, a)``; float64 ``(a,)``: ``lam``, ``log_gate`` (the log of each
    target's ``gate``, see ``ESTIMATE_GATE``), ``eta`` (its full-gradient step, see
    ``FULL_STEP``) and ``last_gap`` (its exact gap at the last check at this lambda, inf when
    none); int64 ``(a,)`` on the CPU: ``epochs`` (steps) run at the current lambda, ``stale``
    epochs since the last exact check."""

    ids: torch.Tensor
    ids_cpu: torch.Tensor
    weight: torch.Tensor
    lam: torch.Tensor
    avg_grad: torch.Tensor
    table: _ResidualTable
    epochs: torch.Tensor
    stale: torch.Tensor
    log_gate: torch.Tensor
    eta: torch.Tensor
    last_gap: torch.Tensor
    n_targets: int

    @property
    def size(self) -> int:
        return int(self.ids_cpu.numel())

    def targets(self, u: torch.Tensor) -> torch.Tensor:
        """The active targets' columns of ``u`` ``(b, t)`` (``u`` itself when all are)."""
        return u if self.size == self.n_targets else u.index_select(1, self.ids)

    def keep(self, mask: torch.Tensor) -> None:
        """Drop the columns where ``mask`` (bool ``(a,)``, CPU) is False."""
        on_device = mask.to(self.weight.device)
        self.ids, self.ids_cpu = self.ids[on_device], self.ids_cpu[mask]
        self.weight = self.weight[:, on_device].contiguous()
        self.avg_grad = self.avg_grad[:, on_device].contiguous()
        self.lam, self.log_gate = self.lam[on_device], self.log_gate[on_device]
        self.eta, self.last_gap = self.eta[on_device], self.last_gap[on_device]
        self.epochs, self.stale = self.epochs[mask], self.stale[mask]
        self.table.keep(mask)

    def learn_gate(
        self, checked: torch.Tensor, estimate: torch.Tensor, gap: torch.Tensor
    ) -> torch.Tensor:
        """Move the ``checked`` targets' gates (bool ``(a,)`` on the device) towards the
        ratio of their gap ``estimate`` before the check to the exact ``gap``; returns the
        log ratios observed."""
        ok = checked & (gap > 0) & (estimate > 0) & torch.isfinite(estimate)
        log_ratio = torch.log(estimate / gap)
        low, high = math.log(GATE_RANGE[0]), math.log(GATE_RANGE[1])
        moved = torch.lerp(self.log_gate, log_ratio, GATE_UPDATE).clamp(low, high)
        self.log_gate = torch.where(ok, moved, self.log_gate)
        return log_ratio[ok]

    def full_step(self, going_on: torch.Tensor, moved: torch.Tensor, gap: torch.Tensor) -> None:
        """The proximal full-gradient step of ``FULL_STEP`` for the targets ``going_on`` (bool
        ``(a,)`` on the device) after their check, ``avg_grad`` then being their exact
        gradient; ``moved`` (bool ``(a,)`` on the device) those now at a new lambda, ``gap``
        the others' exact gap. The table and average stay consistent (the residuals and
        gradient at the weights before the step), as SAGA needs."""
        same = going_on & ~moved
        stalled = same & (gap > STALL_FACTOR * self.last_gap)
        self.eta = torch.where(stalled, self.eta / 2, self.eta)
        self.last_gap = torch.where(same, gap, self.last_gap)
        self.last_gap = torch.where(moved, math.inf, self.last_gap)
        columns = going_on.nonzero()[:, 0]
        if not columns.numel():
            return
        eta = self.eta[columns].float()
        stepped = self.weight[:, columns] - eta * self.avg_grad[:, columns]
        _soft_threshold_(stepped, eta * self.lam[columns].float())
        self.weight[:, columns] = stepped


@dataclass
class _Check:
    """What an epoch leaves to judge the targets by: ``rss`` float64 ``(a,)``, the sum of the
    squared residuals it met; for the targets ``checked`` (bool ``(a,)`` on the device, frozen
    in it) their exact residual sum of squares at their weights, with their average gradient
    ``Z^T r / n`` exact in ``_Active.avg_grad``. ``gap`` and ``primal`` float64 ``(a,)`` at the
    current lambdas are set by the driver (meaningful where checked), ``val_mse`` float64
    ``(a,)`` filled on demand by the path (NaN where not computed)."""

    checked: torch.Tensor
    rss: torch.Tensor
    gap: torch.Tensor | None = None
    primal: torch.Tensor | None = None
    val_mse: torch.Tensor | None = None

    def keep(self, mask: torch.Tensor) -> _Check:
        on_device = mask.to(self.rss.device)
        return _Check(
            self.checked[on_device],
            self.rss[on_device],
            *(None if v is None else v[on_device] for v in (self.gap, self.primal, self.val_mse)),
        )


def _mean_squared_error(rows: _Rows, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 ``(a,)``: ``mean_i (z_i w + offset - y_i)^2`` over ``rows``."""
    rss = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for z, u, _ in rows.batches():
        rss += torch.addmm(u.index_select(1, ids), z, weight, beta=-1).square().sum(0)
    return rss / rows.n


def _soft_threshold_(weight: torch.Tensor, threshold: torch.Tensor) -> None:
    """In place: ``sign(w) * max(|w| - threshold, 0)``, ``threshold`` ``(a,)`` per column,
    written ``w - clip(w, -threshold, threshold)``: one temporary, and exact zeros."""
    weight.sub_(torch.clamp(weight, min=-threshold, max=threshold))


def _saga_epoch(
    rows: _Rows, active: _Active, lr: float, seed: int, frozen: torch.Tensor
) -> torch.Tensor:
    """One shuffled pass of proximal SAGA steps over the fitting rows (see the module doc);
    returns float64 ``(a,)`` the sum of the squared residuals it met, each row's at the
    weights it was visited with.

    The targets ``frozen`` (bool ``(a,)``, CPU) take no step; their table columns
    and gradient averages are zeroed first, so that the pass leaves them exact: the residuals
    at their weights, ``Z^T r / n``, and their exact ``||r||^2`` returned. The pass is their
    exact check, at the price of their share of the matrix products.
    """
    nominal, n = rows.batch_size, rows.n
    weight, avg, table = active.weight, active.avg_grad, active.table
    step = torch.where(frozen, 0.0, lr).to(weight.device, torch.float32)
    threshold = step * active.lam.float()
    if bool(frozen.any()):
        columns = frozen.nonzero()[:, 0].to(weight.device)
        table.zero_columns(columns)
        avg.index_fill_(1, columns, 0.0)
    rss = torch.zeros(active.size, dtype=torch.float64, device=weight.device)
    for z, u, index in rows.batches(shuffle=True, seed=seed):
        r = torch.addmm(active.targets(u), z, weight, beta=-1)
        rss += r.square().sum(0)
        correction = z.T @ (r - table.gather(index))
        table.scatter(index, r)
        fraction = z.shape[0] / nominal
        weight.addcmul_(correction, step, value=-1.0 / nominal)
        weight.addcmul_(avg, step, value=-fraction)
        _soft_threshold_(weight, threshold * fraction)
        avg.add_(correction, alpha=1.0 / n)
    return rss


def _duality_gap(
    rss: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gap, primal)`` float64 ``(a,)`` of ``(1/(2n)) ||r||^2 + lam ||w||_1``, from the
    residual sum of squares ``rss`` ``(a,)`` and ``grad = Z^T r / n`` ``(p, a)``.

    The dual point is the residual scaled into the feasible set: with
    ``s = min(1, lam / ||grad||_inf)``, ``gap = (1 + s^2) ||r||^2 / (2n) + lam ||w||_1
    - s (||r||^2 / n - w . grad)``; zero exactly at the optimum, an upper bound on the
    suboptimality everywhere.
    """
    l1 = weight.abs().sum(0, dtype=torch.float64)
    w_dot_g = (weight * grad).sum(0, dtype=torch.float64)
    dual_norm = grad.abs().amax(0).to(torch.float64)
    s = torch.where(dual_norm > lam, lam / dual_norm, torch.ones_like(lam))
    half_mse = rss / (2 * n)
    primal = half_mse + lam * l1
    gap = (1 + s * s) * half_mse + lam * l1 - s * (2 * half_mse - w_dot_g)
    return gap, primal


# --------------------------------------------------------------------------------------------
# The driver: epochs between checks, convergence, divergence, the epoch cap


@dataclass
class _Schedule:
    """Step size, stopping rule, and counters shared by the path and the refit."""

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
        return (self.seed * 1_000_003 + self.epochs_run) % 2**32


OnDone = Callable[[_Active, torch.Tensor, _Check], torch.Tensor]
"""Called with the active set, the targets done at their lambda (bool ``(a,)``, CPU) and the
check they were judged on; may move targets to a new lambda (setting ``lam``, ``epochs``);
returns which targets leave (bool ``(a,)``, CPU)."""


def _raise_if_diverged(primal: torch.Tensor, frame: _Frame, active: _Active, lr: float) -> None:
    """Raise when an objective (``primal`` ``(a,)``, exact or estimated) is not finite or far
    above its value at ``w = 0``."""
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


def _judge(
    rows: _Rows, active: _Active, check: _Check, sched: _Schedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(converged, capped)`` bool ``(a,)`` on the CPU, among the targets ``check`` covered,
    at their current lambdas; sets ``check.gap`` and ``check.primal``."""
    frame = rows.frame
    gap, primal = _duality_gap(check.rss, active.avg_grad, active.weight, active.lam, rows.n)
    check.gap, check.primal = gap, primal
    converged = (gap <= sched.tol * frame.scale[active.ids]) | (
        active.lam >= frame.lam_max[active.ids]
    )
    converged = (converged & check.checked).cpu()
    capped = (active.epochs >= sched.max_epochs) & check.checked.cpu() & ~converged
    return converged, capped


def _drive(rows: _Rows, active: _Active, sched: _Schedule, on_done: OnDone) -> None:
    """Iterate until every target has left through ``on_done``.

    A target is done at its lambda when its duality gap is at most ``tol * mean(u^2)``, when
    ``lambda >= lambda_max`` (then ``w = 0`` is the exact solution), or when it has run
    ``max_epochs`` epochs there (counted in ``sched.capped``). The gap is computed exactly in
    an epoch where the target is frozen (:func:`_saga_epoch`): the first one, and the one
    after a test where its gap estimated from the epoch's own residuals came within its gate
    (``ESTIMATE_GATE``) times the tolerance, where it reached the epoch cap, or where it went
    ``EXACT_EVERY`` epochs without an exact check.
    """
    frame, device = rows.frame, active.weight.device
    at_max = (active.lam >= frame.lam_max[active.ids]).to(device)
    active.weight[:, at_max] = 0
    frozen = torch.ones(active.size, dtype=torch.bool)  # the first pass checks every target
    estimate: torch.Tensor | None = None
    while active.size:
        frozen_dev = frozen.to(device)
        rss = _saga_epoch(rows, active, sched.lr, sched.epoch_seed(), frozen)
        sched.epochs_run += 1
        active.epochs += (~frozen).long()
        active.stale = torch.where(frozen, 0, active.stale + 1)
        gap, primal = _duality_gap(rss, active.avg_grad, active.weight, active.lam, rows.n)
        _raise_if_diverged(primal, frame, active, sched.lr)
        if estimate is not None and bool(frozen.any()):
            observed = active.learn_gate(frozen_dev, estimate, gap).tolist()
            sched.log_ratios = (sched.log_ratios + observed)[-4096:]  # for info: the last ones
        check = _Check(checked=frozen_dev, rss=rss)
        if bool(frozen.any()):
            sched.checks += 1
            sched.checked_targets += int(frozen.sum())
            moved = torch.zeros(active.size, dtype=torch.bool)
            while True:  # targets moved to a new lambda may be done there already
                converged, capped = _judge(rows, active, check, sched)
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
                    return
            assert check.gap is not None
            active.full_step(check.checked, moved.to(device), check.gap)
        estimate, _ = _duality_gap(check.rss, active.avg_grad, active.weight, active.lam, rows.n)
        tested = (active.epochs % sched.check_every == 0) & ~check.checked.cpu()
        gate = active.log_gate.exp()
        near = (estimate <= gate * sched.tol * frame.scale[active.ids]).cpu()
        frozen = (tested & near) | (active.epochs >= sched.max_epochs)
        frozen |= active.stale >= EXACT_EVERY
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "epoch %d: %d targets active, %d checked next",
                sched.epochs_run,
                active.size,
                int(frozen.sum()),
            )


def _start(
    rows: _Rows, weight: torch.Tensor, lam: torch.Tensor, table_on_host: bool | None
) -> _Active:
    device = weight.device
    t = weight.shape[1]
    on_host = _table_on_host(table_on_host, device, rows.n, t)
    return _Active(
        ids=torch.arange(t, device=device),
        ids_cpu=torch.arange(t),
        weight=weight.clone(),
        lam=lam.to(device, torch.float64).clone(),
        avg_grad=torch.zeros_like(weight),
        table=_ResidualTable(rows.n, t, device, on_host),
        epochs=torch.zeros(t, dtype=torch.int64),
        stale=torch.zeros(t, dtype=torch.int64),
        log_gate=torch.full((t,), math.log(ESTIMATE_GATE), dtype=torch.float64, device=device),
        eta=torch.full((t,), FULL_STEP, dtype=torch.float64, device=device),
        last_gap=torch.full((t,), math.inf, dtype=torch.float64, device=device),
        n_targets=t,
    )


# --------------------------------------------------------------------------------------------
# The path


@dataclass
class _PathRecorder:
    """``on_done`` for the path: records each done target's step in the tracker, keeps its
    weights when validation improved, and moves it to its next lambda or out."""

    tracker: PathTracker
    lambdas: torch.Tensor  # float64 (t, k) on the device
    val_rows: _Rows
    n_train: int
    best_weight: torch.Tensor  # float32 (p, t) on the device
    steps: torch.Tensor  # int64 (t,) CPU: each target's current step
    bar: tqdm | None

    def __call__(self, active: _Active, done: torch.Tensor, check: _Check) -> torch.Tensor:
        device = active.weight.device
        if check.val_mse is None:
            check.val_mse = torch.full_like(check.rss, math.nan)
        # one validation pass for the done targets that have none at these weights yet
        need = (done.to(device) & check.val_mse.isnan()).nonzero()[:, 0]
        if need.numel():
            check.val_mse[need] = _mean_squared_error(
                self.val_rows, active.weight.index_select(1, need), active.ids[need]
            )
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


@dataclass
class _Solutions:
    """``on_done`` for fixed lambdas: every done target leaves with its weights float32
    ``(p, t)``, its epochs int64 ``(t,)`` (CPU), and its final duality gap and objective
    float64 ``(t,)`` (CPU)."""

    weight: torch.Tensor
    epochs: torch.Tensor
    gap: torch.Tensor
    objective: torch.Tensor

    def __call__(self, active: _Active, done: torch.Tensor, check: _Check) -> torch.Tensor:
        cols = done.to(active.weight.device)
        self.weight[:, active.ids[cols]] = active.weight[:, cols]
        ids = active.ids_cpu[done]
        self.epochs[ids] = active.epochs[done]
        if check.gap is not None and check.primal is not None:
            self.gap[ids] = check.gap[cols].cpu()
            self.objective[ids] = check.primal[cols].cpu()
        return done


def _solve_fixed(
    rows: _Rows,
    lam: torch.Tensor,
    weight: torch.Tensor,
    sched: _Schedule,
    table_on_host: bool | None,
) -> _Solutions:
    """Each target at its own fixed lambda, warm-started from ``weight`` ``(p, t)``."""
    active = _start(rows, weight, lam, table_on_host)
    t = weight.shape[1]
    nan = torch.full((t,), float("nan"), dtype=torch.float64)
    out = _Solutions(
        weight=weight.clone(),
        epochs=torch.zeros(t, dtype=torch.int64),
        gap=nan.clone(),
        objective=nan.clone(),
    )
    _drive(rows, active, sched, out)
    return out


def _step_size(rows: _Rows, seed: int) -> tuple[float, float]:
    """``(lr, L_B)``: ``lr = 1 / (3 L_B)``.

    ``L_B`` estimates the minibatch smoothness, the largest eigenvalue of ``Z_b^T Z_b / B``
    (``B`` the nominal batch size: a smaller last batch takes a proportionally smaller step):
    between the full-data ``L`` (``B = n``) and ``max_i ||z_i||^2`` (``B = 1``), the constant
    minibatch SAGA's step size theory uses. It is the largest of 30 power iterations on each of
    up to 4 shuffled minibatches (its expectation over batches bounds ``L`` from above, the
    largest eigenvalue being convex), times 1.1 because power iteration approaches from below,
    capped by the exact bound on ``||z_i||^2`` for 0/1 masks. On random masks the step that
    diverges is 10 to 30 times larger.
    """
    generator = torch.Generator().manual_seed(seed)
    estimate = 0.0
    for i, (z, _, _) in enumerate(rows.batches(shuffle=True, seed=seed)):
        if i == 4:
            break
        v = torch.randn(z.shape[1], generator=generator).to(z.device)
        top = 0.0
        for _ in range(30):
            v = z.T @ (z @ v) / rows.batch_size
            top = float(v.norm())
            if top == 0.0:
                break
            v = v / top
        estimate = max(estimate, top)
    smoothness = min(1.1 * estimate, rows.frame.row_norm_bound())
    if not smoothness > 0:  # every column constant: any step is exact
        smoothness = 1.0
    return 1.0 / (STEP_SAFETY * smoothness), smoothness


# --------------------------------------------------------------------------------------------
# Public entry points


def _as_rows(
    name: str, rows: Sequence[int] | np.ndarray, n_rows: int, errors: list[str]
) -> np.ndarray:
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


def _check_settings(
    *,
    batch_size: int,
    lr: float | None,
    tol: float,
    check_every: int,
    max_epochs: int,
    cache_bytes: int,
    errors: list[str],
) -> None:
    if batch_size < 1:
        errors.append(f"batch_size must be at least 1; got {batch_size}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        errors.append(f"lr must be a positive finite step size or None (derived); got {lr}")
    if not tol > 0:
        errors.append(f"tol (duality gap / var(y)) must be positive; got {tol}")
    if check_every < 1:
        errors.append(f"check_every must be at least 1 epoch; got {check_every}")
    if max_epochs < 1:
        errors.append(f"max_epochs must be at least 1; got {max_epochs}")
    if cache_bytes < 0:
        errors.append(f"cache_bytes must be at least 0 (0: never cache); got {cache_bytes}")


def _raise_errors(errors: list[str]) -> None:
    if errors:
        raise ValueError("invalid SAGA arguments:\n  " + "\n  ".join(errors))


def _warn_capped(sched: _Schedule, what: str, stacklevel: int) -> None:
    if sched.capped:
        warnings.warn(
            f"SAGA {what}: {sched.capped} (target, lambda) fit(s) reached max_epochs="
            f"{sched.max_epochs} before the duality gap met tol={sched.tol:g} x var(y). Raise "
            f"max_epochs, raise lr (now {sched.lr:.3g}) if the problem is far from diverging, "
            "or loosen tol.",
            SagaConvergenceWarning,
            stacklevel=stacklevel,
        )


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

    Minimizes ``(1/(2n)) ||y_t - X_std w_t - b_t||^2 + lam_t ||w_t||_1`` over the ``n``
    ``rows`` of ``source`` (module doc for the algorithm). Arguments as :func:`fit_saga`, and:

    - ``rows``: int ``(n,)`` distinct row positions to fit on.
    - ``lam``: float or float ``(t,)``, each target's lambda (one float: all targets).
    - ``standardization``: the column statistics ``X_std`` uses (default: those of ``rows``).
    - ``weight``: float ``(p, t)`` warm start in the standardized coordinates (default 0).
    - ``cache_bytes``: as :func:`fit_saga`, for the ``rows``.

    Targets whose lambda is at least their ``lambda_max`` get ``w = 0`` exactly. Emits
    :class:`SagaConvergenceWarning` for targets that reach ``max_epochs``; raises
    :class:`SagaDivergedError` when the iterates blow up.
    """
    start = time.perf_counter()
    device = torch.device(device)
    errors: list[str] = []
    positions = _as_rows("rows", rows, source.n_rows, errors)
    _check_settings(
        batch_size=batch_size,
        lr=lr,
        tol=tol,
        check_every=check_every,
        max_epochs=max_epochs,
        cache_bytes=cache_bytes,
        errors=errors,
    )
    p, t = source.n_features, source.n_targets
    lam_t = torch.as_tensor(lam, dtype=torch.float64).reshape(-1).cpu()
    if lam_t.numel() == 1:
        lam_t = lam_t.expand(t).clone()
    if lam_t.numel() != t or not bool((lam_t >= 0).all()):
        errors.append(f"lam must be one or {t} non-negative values; got {lam_t.numel()} values")
    if weight is not None and tuple(weight.shape) != (p, t):
        errors.append(f"weight must have shape ({p}, {t}); got {tuple(weight.shape)}")
    _raise_errors(errors)

    stats = accumulate_stats(source, positions, batch_size=batch_size, device=device, gram=False)
    std = standardization if standardization is not None else stats.standardization()
    frame = _Frame.of(stats, std, use_bias=use_bias)
    fit_rows = _Rows.of(source, positions, batch_size, frame, cache_bytes, seed=seed)
    if lr is None:
        lr, _ = _step_size(fit_rows, seed)
    sched = _Schedule(lr, tol, check_every, max_epochs, seed)
    init = torch.zeros((p, t)) if weight is None else weight.detach()
    init = init.to(device, torch.float32)
    out = _solve_fixed(fit_rows, lam_t, init, sched, table_on_host)
    _warn_capped(sched, "fixed-lambda fit", stacklevel=2)
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
    min_lambdas: int = 5,
    patience: int = 3,
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
    standardization. The module doc has the algorithm.

    Memory: the SAGA table holds ``4 * n * t`` bytes (float32, ``n`` = training rows, then
    train + validation rows for the refit), plus ``3 * 4 * p * t`` for the weights, gradient
    average and best weights. On CUDA the table stays on the device when it fits in half the
    free memory, else in pinned host memory (slower: a gather and scatter over PCIe per batch).
    The rows themselves are cached on the device, standardized, when their ``4 * n * (p + t)``
    bytes fit in ``cache_bytes`` (the validation rows too when both fit); else streamed.

    Parameters:

    - ``source``: the rows (``n_rows`` masks of ``p`` 0/1 features, ``t`` targets).
    - ``train_rows``, ``val_rows``: int ``(n,)`` / ``(n_val,)``, distinct and disjoint row
      positions to fit on / to choose lambda on; both non-empty.
    - ``k``: number of lambdas per target (``k == 1``: ``eps * lambda_max`` alone).
    - ``eps``: smallest lambda over ``lambda_max``, in ``(0, 1]``.
    - ``batch_size``: rows per minibatch ``B`` (also the batch of the statistics passes).
    - ``lr``: step size; None (default) derives ``1 / (3 L_B)`` from the data, ``L_B`` an
      estimate of the minibatch smoothness (module doc); reported in ``info["lr"]``.
    - ``use_bias``: fit an unpenalized intercept (default True); False fixes ``b = 0``.
    - ``device``: where the arithmetic runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
    - ``tol``: duality gap over ``var(y)`` at which a lambda counts as solved (default 1e-4,
      as scikit-learn's ``Lasso``); step-size independent.
    - ``check_every``: epochs at a lambda between a target's convergence tests (default 1).
      A test estimates the duality gap from the epoch's own residuals at no cost; a target
      whose estimate is near ``tol`` is checked exactly in the next epoch, where it takes no
      step (module doc), then validated (one pass over the validation rows, for the targets
      done). Larger values only delay the tests.
    - ``max_epochs``: epochs per (target, lambda) before giving up on that lambda with a
      :class:`SagaConvergenceWarning` (default 200).
    - ``min_lambdas``, ``patience``: the early-stopping rule (default 5, 3).
    - ``refit``: refit at the chosen lambda on train + validation rows (default True).
    - ``seed``: seeds the minibatch order (epoch ``e`` uses a seed from ``seed`` and ``e``)
      and the layout of the cached rows.
    - ``table_on_host``: force the SAGA table to host (True) or device (False) memory on CUDA;
      None decides from the free memory. Ignored on CPU.
    - ``cache_bytes``: memory on ``device`` for the cached rows (default 1 GiB; 0: always
      stream from ``source``).
    - ``progress``: show a tqdm bar of targets finished.

    Returns a :class:`~dm_assets.regression.path.LassoPathResult` (``solver="saga"``); its
    ``info`` holds ``lr``, ``batch_smoothness`` (0 when ``lr`` was given), ``epochs_path`` and
    ``epochs_refit`` (passes over the fitting rows), ``checks`` (passes with exact checks),
    ``checked_targets`` (exact checks), ``estimate_ratio`` (median of estimated over exact gap,
    last 4096 checks), ``cached`` (1 when the training rows were cached),
    ``epochs_per_lambda_mean``/``_max`` (steps per target and lambda), ``capped_fits`` and
    ``seconds_stats``/``_path``/``_refit``.

    Raises ``ValueError`` for invalid arguments (all problems at once) and
    :class:`SagaDivergedError` when the iterates blow up (lower ``lr``).
    """
    start = time.perf_counter()
    device = torch.device(device)
    errors: list[str] = []
    train = _as_rows("train_rows", train_rows, source.n_rows, errors)
    val = _as_rows("val_rows", val_rows, source.n_rows, errors)
    if np.intersect1d(train, val).size:
        errors.append("train_rows and val_rows share row positions; they must be disjoint")
    _check_settings(
        batch_size=batch_size,
        lr=lr,
        tol=tol,
        check_every=check_every,
        max_epochs=max_epochs,
        cache_bytes=cache_bytes,
        errors=errors,
    )
    if k < 1:
        errors.append(f"k (the number of lambdas) must be at least 1; got {k}")
    if min_lambdas < 1 or patience < 1:
        errors.append(
            f"min_lambdas and patience must be at least 1; got {min_lambdas} and {patience}"
        )
    if not 0 < eps <= 1:
        errors.append(f"eps (smallest lambda / lambda_max) must be in (0, 1]; got {eps}")
    _raise_errors(errors)

    stats = accumulate_stats(source, train, batch_size=batch_size, device=device, gram=False)
    standardization = stats.standardization()
    frame = _Frame.of(stats, standardization, use_bias=use_bias)
    train_fit = _Rows.of(source, train, batch_size, frame, cache_bytes, seed=seed)
    val_budget = cache_bytes - _cache_bytes(len(train), source) if train_fit.cache else 0
    val_eval = _Rows.of(source, val, batch_size, frame, val_budget)
    smoothness = 0.0
    if lr is None:
        lr, smoothness = _step_size(train_fit, seed)
    sched = _Schedule(lr, tol, check_every, max_epochs, seed)
    seconds_stats = time.perf_counter() - start
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
    weight = _run_path(train_fit, val_eval, lambdas, tracker, sched, table_on_host, progress)
    cached = train_fit.cache is not None
    del train_fit, val_eval  # the caches: the refit builds its own
    ids = torch.arange(source.n_targets, device=device)
    bias = frame.bias(weight, ids)
    epochs_path, seconds_path = sched.epochs_run, time.perf_counter() - start - seconds_stats
    _warn_capped(sched, "path", stacklevel=2)
    capped_path = sched.capped

    if refit:
        sched.capped = 0
        weight, bias = _refit(
            source,
            train,
            val,
            stats,
            standardization,
            weight,
            tracker,
            sched,
            table_on_host,
            batch_size=batch_size,
            use_bias=use_bias,
            cache_bytes=cache_bytes,
        )
        _warn_capped(sched, "refit", stacklevel=2)
    result = LassoPathResult.from_tracker(
        tracker,
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
    per_lambda = sched.epochs_per_lambda or [0]
    result.info = {
        "lr": lr,
        "batch_smoothness": smoothness,
        "epochs_path": float(epochs_path),
        "epochs_refit": float(sched.epochs_run - epochs_path),
        "checks": float(sched.checks),
        "checked_targets": float(sched.checked_targets),
        "estimate_ratio": math.exp(float(np.median(sched.log_ratios or [0.0]))),
        "cached": float(cached),
        "epochs_per_lambda_mean": float(np.mean(per_lambda)),
        "epochs_per_lambda_max": float(np.max(per_lambda)),
        "capped_fits": float(capped_path + (sched.capped if refit else 0)),
        "seconds_stats": seconds_stats,
        "seconds_path": seconds_path,
        "seconds_refit": result.seconds - seconds_stats - seconds_path,
    }
    logger.info(
        "SAGA done in %.1f s: %d path epochs, %d refit epochs",
        result.seconds,
        epochs_path,
        sched.epochs_run - epochs_path,
    )
    return result


def _run_path(
    train_fit: _Rows,
    val_eval: _Rows,
    lambdas: torch.Tensor,
    tracker: PathTracker,
    sched: _Schedule,
    table_on_host: bool | None,
    progress: bool,
) -> torch.Tensor:
    """Walk every target's path; returns the weights at each target's best validation MSE,
    float32 ``(p, t)`` on the device."""
    p, t = train_fit.frame.shift.shape[0], lambdas.shape[0]
    device = train_fit.device
    zeros = torch.zeros((p, t), dtype=torch.float32, device=device)
    active = _start(train_fit, zeros, lambdas[:, 0], table_on_host)
    bar = tqdm(total=t, desc="SAGA path: targets done", disable=not progress)
    recorder = _PathRecorder(
        tracker=tracker,
        lambdas=lambdas,
        val_rows=val_eval,
        n_train=train_fit.n,
        best_weight=zeros.clone(),
        steps=torch.zeros(t, dtype=torch.int64),
        bar=bar,
    )
    try:
        _drive(train_fit, active, sched, recorder)
    finally:
        bar.close()
    return recorder.best_weight


def _refit(
    source: RowSource,
    train: np.ndarray,
    val: np.ndarray,
    train_stats: SufficientStats,
    standardization: Standardization,
    weight: torch.Tensor,
    tracker: PathTracker,
    sched: _Schedule,
    table_on_host: bool | None,
    *,
    batch_size: int,
    use_bias: bool,
    cache_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target at its chosen lambda on train + validation rows, warm-started from
    ``weight``; returns ``(weight (p, t), bias (t,))`` in the training standardization."""
    device = weight.device
    val_stats = accumulate_stats(source, val, batch_size=batch_size, device=device, gram=False)
    frame = _Frame.of(train_stats + val_stats, standardization, use_bias=use_bias)
    rows = np.concatenate([train, val])
    fit_rows = _Rows.of(source, rows, batch_size, frame, cache_bytes, seed=sched.seed)
    refit_weight = _solve_fixed(
        fit_rows, tracker.chosen_lambda, weight, sched, table_on_host
    ).weight
    ids = torch.arange(weight.shape[1], device=device)
    return refit_weight, frame.bias(refit_weight, ids)
