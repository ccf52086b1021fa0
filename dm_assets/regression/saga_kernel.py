"""The minibatch proximal SAGA epoch, the duality gap, the step size, and the iterate.

All active targets are solved at once, each at its own lambda, in the frame of
:mod:`dm_assets.regression.saga_rows` (``z`` standardized masks, ``u`` centered targets): per
target ``(1/(2n)) ||u - Z w||^2 + lambda ||w||_1``.

One epoch is a shuffled pass over the ``n`` fitting rows in minibatches ``b`` of nominal size
``B``; with ``r_i = z_i . w - u_i`` the residual, ``table_i`` the residual row ``i`` had when
last visited and ``g = (1/n) Z^T table`` the average gradient::

    d   = Z_b^T (r_b - table_b) / B + (|b| / B) * g     (the SAGA estimate, times |b| / B)
    w   = soft_threshold(w - lr * d, lr * (|b| / B) * lambda)
    g  += Z_b^T (r_b - table_b) / n;   table_b = r_b

The ``|b| / B`` factor gives a smaller last batch a proportionally smaller step, so every row
carries the same weight in an epoch. The table starts as the exact residuals at the warm start
(upstream: zeros, which biases the first epoch).

Frozen targets: a target frozen in an epoch takes no step, and its table column and gradient
average are zeroed first, so the epoch's products leave exactly its residuals in the table and
its gradient ``Z^T r / n`` in ``g``: its exact duality gap at the price of its share of an
epoch (the pass also refreshes its table, removing float32 drift).

Full-gradient step (:meth:`Active.full_step`): a target whose exact gradient the check left in
``g`` and that goes on (to its next lambda, or at the same one, not converged) takes
``w = soft_threshold(w - eta * g, eta * lambda)``, free of passes. On standardized columns (a
unit Gram diagonal) ``eta = 1`` solves an orthogonal design exactly: as the warm start at the
next lambda it follows the path to first order, and between SAGA epochs it moves the
directions of small curvature, where SAGA is slow, a full step (SAGA settles those of large
curvature in the next epochs). The table and average stay those of the weights before the
step, consistent as SAGA needs. A target's ``eta`` halves when its exact gap grew more than
``STALL_FACTOR``-fold between two checks at the same lambda: where columns are strongly
correlated (curvature far above 1) the step overshoots, and the smaller one found this way
still speeds SAGA up there.

Step size (:func:`step_size`): ``1 / (3 L_B)`` (Defazio et al., 2014), ``L_B`` the minibatch
smoothness, the largest eigenvalue of ``Z_b^T Z_b / B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dm_assets.regression.saga_rows import ResidualTable, Rows, table_on_host

# A target's first gate: the estimated gap overstates the exact one about 1.3-fold with the
# derived step (benchmarks/README.md, "SAGA's constants").
ESTIMATE_GATE = 1.5
# The learned gate stays within these bounds: the ratio measured 0.7 to 1.3 across step sizes.
GATE_RANGE = (0.5, 2.0)
# Weight of the newest ratio in the gate's geometric moving average: three quarters of the
# gate follow a new ratio after two checks.
GATE_UPDATE = 0.5
# The first full-gradient step: exact for an orthogonal design on standardized columns.
FULL_STEP = 1.0
# A gap grown this much between two checks means the full step overshot (correlated columns).
STALL_FACTOR = 4.0
# lr = 1 / (STEP_SAFETY * L_B), Defazio et al. (2014); on random masks SAGA diverges only at
# steps 10 to 30 times larger.
STEP_SAFETY = 3.0


@dataclass
class Active:
    """The targets still being solved and their SAGA state.

    ``ids`` int64 ``(a,)``: original target ids, in increasing order, on the device
    (``ids_cpu`` the same on the CPU). ``weight`` and ``avg_grad`` float32 ``(p, a)``: the
    weights in the standardized frame and the SAGA gradient average ``g``. ``table``: the
    residual table ``(n, a)``. Float64 ``(a,)`` on the device: ``lam``, ``log_gate`` (the log of
    each target's gate: it is checked exactly when its estimated gap is within ``gate * tol``),
    ``eta`` (its full-gradient step) and ``last_gap`` (its exact gap at the last check at this
    lambda, inf when none). int64 ``(a,)`` on the CPU: ``epochs`` (steps) run at the current
    lambda, ``stale`` epochs since the last exact check. ``n_targets``: ``t``, all targets.
    """

    ids: torch.Tensor
    ids_cpu: torch.Tensor
    weight: torch.Tensor
    lam: torch.Tensor
    avg_grad: torch.Tensor
    table: ResidualTable
    epochs: torch.Tensor
    stale: torch.Tensor
    log_gate: torch.Tensor
    eta: torch.Tensor
    last_gap: torch.Tensor
    n_targets: int

    @classmethod
    def start(
        cls, rows: Rows, weight: torch.Tensor, lam: torch.Tensor, table_choice: bool | None
    ) -> Active:
        """Every target, from ``weight`` float32 ``(p, t)`` (copied) at ``lam`` ``(t,)``, with a
        zero table (the first epoch, which checks every target, fills it exactly)."""
        device = weight.device
        t = weight.shape[1]
        on_host = table_on_host(table_choice, device, rows.n, t)
        return cls(
            ids=torch.arange(t, device=device),
            ids_cpu=torch.arange(t),
            weight=weight.clone(),
            lam=lam.to(device, torch.float64).clone(),
            avg_grad=torch.zeros_like(weight),
            table=ResidualTable(rows.n, t, device, on_host),
            epochs=torch.zeros(t, dtype=torch.int64),
            stale=torch.zeros(t, dtype=torch.int64),
            log_gate=torch.full((t,), math.log(ESTIMATE_GATE), dtype=torch.float64, device=device),
            eta=torch.full((t,), FULL_STEP, dtype=torch.float64, device=device),
            last_gap=torch.full((t,), math.inf, dtype=torch.float64, device=device),
            n_targets=t,
        )

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
        ratio of their gap ``estimate`` before the check to the exact ``gap`` (geometric moving
        average, weight ``GATE_UPDATE``, within ``GATE_RANGE``); returns the log ratios
        observed."""
        ok = checked & (gap > 0) & (estimate > 0) & torch.isfinite(estimate)
        log_ratio = torch.log(estimate / gap)
        low, high = math.log(GATE_RANGE[0]), math.log(GATE_RANGE[1])
        moved = torch.lerp(self.log_gate, log_ratio, GATE_UPDATE).clamp(low, high)
        self.log_gate = torch.where(ok, moved, self.log_gate)
        return log_ratio[ok]

    def full_step(self, going_on: torch.Tensor, moved: torch.Tensor, gap: torch.Tensor) -> None:
        """The proximal full-gradient step (module doc) for the targets ``going_on`` (bool
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
        soft_threshold_(stepped, eta * self.lam[columns].float())
        self.weight[:, columns] = stepped


def soft_threshold_(weight: torch.Tensor, threshold: torch.Tensor) -> None:
    """In place: ``sign(w) * max(|w| - threshold, 0)``, ``threshold`` ``(a,)`` per column,
    written ``w - clip(w, -threshold, threshold)``: one temporary, and exact zeros."""
    weight.sub_(torch.clamp(weight, min=-threshold, max=threshold))


def saga_epoch(
    rows: Rows, active: Active, lr: float, seed: int, frozen: torch.Tensor
) -> torch.Tensor:
    """One shuffled pass of proximal SAGA steps over the fitting rows (module doc).

    Returns float64 ``(a,)``: the sum of the squared residuals the pass met, each row's at the
    weights it was visited with. The targets ``frozen`` (bool ``(a,)``, CPU) take no step;
    their table columns and gradient averages are zeroed first, so that the pass leaves them
    exact: the residuals at their weights, ``Z^T r / n``, and their exact ``||r||^2``
    returned. The pass is their exact check, at the price of their share of the matrix
    products.
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
        soft_threshold_(weight, threshold * fraction)
        avg.add_(correction, alpha=1.0 / n)
    return rss


def duality_gap(
    rss: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gap, primal)`` float64 ``(a,)`` of ``(1/(2n)) ||r||^2 + lam ||w||_1``.

    From the residual sum of squares ``rss`` ``(a,)``, ``grad = Z^T r / n`` float32 ``(p, a)``,
    the weights ``weight`` float32 ``(p, a)`` and ``lam`` float64 ``(a,)``. The dual point is
    the residual scaled into the feasible set: with ``s = min(1, lam / ||grad||_inf)``,
    ``gap = (1 + s^2) ||r||^2 / (2n) + lam ||w||_1 - s (||r||^2 / n - w . grad)``; zero
    exactly at the optimum, an upper bound on the suboptimality everywhere.
    """
    l1 = weight.abs().sum(0, dtype=torch.float64)
    w_dot_g = (weight * grad).sum(0, dtype=torch.float64)
    dual_norm = grad.abs().amax(0).to(torch.float64)
    s = torch.where(dual_norm > lam, lam / dual_norm, torch.ones_like(lam))
    half_mse = rss / (2 * n)
    primal = half_mse + lam * l1
    gap = (1 + s * s) * half_mse + lam * l1 - s * (2 * half_mse - w_dot_g)
    return gap, primal


def mean_squared_error(rows: Rows, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 ``(a,)``: ``mean_i (z_i w + offset - y_i)^2`` over ``rows``, for the weights
    ``weight`` float32 ``(p, a)`` of the targets ``ids`` int64 ``(a,)``."""
    rss = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for z, u, _ in rows.batches():
        rss += torch.addmm(u.index_select(1, ids), z, weight, beta=-1).square().sum(0)
    return rss / rows.n


def step_size(rows: Rows, seed: int) -> tuple[float, float]:
    """``(lr, L_B)``: ``lr = 1 / (STEP_SAFETY * L_B)``.

    ``L_B`` estimates the minibatch smoothness, the largest eigenvalue of ``Z_b^T Z_b / B``
    (``B`` the nominal batch size: a smaller last batch takes a proportionally smaller step):
    between the full-data ``L`` (``B = n``) and ``max_i ||z_i||^2`` (``B = 1``), the constant
    minibatch SAGA's step size theory uses. It is the largest of 30 power iterations on each of
    up to 4 shuffled minibatches (its expectation over batches bounds ``L`` from above, the
    largest eigenvalue being convex), times 1.1 because power iteration approaches from below,
    capped by the exact bound on ``||z_i||^2`` for 0/1 masks
    (``sum_j max((1 - m_j)^2, m_j^2) / s_j^2``).
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
