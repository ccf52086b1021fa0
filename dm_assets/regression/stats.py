"""Sufficient statistics of a set of rows, in one streaming pass.

For masks ``X`` (``n x p``, 0/1) and targets ``Y`` (``n x t``) the LASSO path of every target
depends only on ``n``, ``X^T 1``, ``X^T X``, ``Y^T 1``, ``X^T Y`` and the per-target ``y^T y``.
They are accumulated in float64 (exact for 0/1 masks) from float32 batch products: ``X^T X`` of
0/1 values is exact in float32 within a batch of fewer than 2^24 rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dm_assets.regression.data import RowSource
from dm_assets.regression.path import Standardization


@dataclass
class SufficientStats:
    """Raw (unstandardized) sums over ``n`` rows, float64 on the device they were made on.

    ``sum_x`` ``(p,)``, ``sum_x2`` ``(p,)``, ``sum_y`` ``(t,)``, ``sum_y2`` ``(t,)``, ``xty``
    ``(p, t)``, and ``xtx`` ``(p, p)`` when asked for (None otherwise).
    """

    n: int
    sum_x: torch.Tensor
    sum_x2: torch.Tensor
    sum_y: torch.Tensor
    sum_y2: torch.Tensor
    xty: torch.Tensor
    xtx: torch.Tensor | None

    def __add__(self, other: SufficientStats) -> SufficientStats:
        xtx = None
        if self.xtx is not None and other.xtx is not None:
            xtx = self.xtx + other.xtx
        return SufficientStats(
            n=self.n + other.n,
            sum_x=self.sum_x + other.sum_x,
            sum_x2=self.sum_x2 + other.sum_x2,
            sum_y=self.sum_y + other.sum_y,
            sum_y2=self.sum_y2 + other.sum_y2,
            xty=self.xty + other.xty,
            xtx=xtx,
        )

    def standardization(self) -> Standardization:
        """Column means and standard deviations of these rows' masks."""
        return Standardization.from_sums(self.n, self.sum_x, self.sum_x2)

    def centered(self, standardization: Standardization) -> CenteredProblem:
        """The least-squares problem of these rows in standardized, centered coordinates."""
        n = self.n
        inv_std = 1.0 / standardization.std.to(self.sum_x.device)
        mean = standardization.mean.to(self.sum_x.device)
        x_bar = self.sum_x / n  # raw column means of these rows
        y_bar = self.sum_y / n
        # covariances, then scaled: the standardized columns' covariance with y and each other
        c = (self.xty / n - x_bar[:, None] * y_bar[None, :]) * inv_std[:, None]
        gram = None
        if self.xtx is not None:
            gram = (self.xtx / n - x_bar[:, None] * x_bar[None, :]) * inv_std[:, None]
            gram *= inv_std[None, :]
        yy = (self.sum_y2 / n - y_bar * y_bar).clamp_min(0)
        return CenteredProblem(
            n=n,
            gram=gram,
            c=c,
            yy=yy,
            x_bar_std=(x_bar - mean) * inv_std,
            y_bar=y_bar,
        )


@dataclass
class CenteredProblem:
    """``min_w (1/2) w^T G w - c^T w + yy / 2 + lambda |w|_1`` per target, which equals
    ``(1/(2n)) ||y - X_std w - b||^2 + lambda |w|_1`` at the best intercept
    ``b = y_bar - x_bar_std^T w``.

    ``gram`` ``(p, p)`` (None when not computed), ``c`` ``(p, t)``, ``yy`` ``(t,)`` (the
    variance of y), ``x_bar_std`` ``(p,)``, ``y_bar`` ``(t,)``; float64.
    """

    n: int
    gram: torch.Tensor | None
    c: torch.Tensor
    yy: torch.Tensor
    x_bar_std: torch.Tensor
    y_bar: torch.Tensor

    def lambda_max(self) -> torch.Tensor:
        """float64 ``(t,)``: ``max_j |X_std[:, j]^T (y - y_bar)| / n``, the smallest lambda at
        which every weight of the target is zero."""
        return self.c.abs().amax(dim=0)

    def intercept(self, weight: torch.Tensor) -> torch.Tensor:
        """The best bias for ``weight`` ``(p, t)``: ``y_bar - x_bar_std^T w``."""
        return self.y_bar - self.x_bar_std.to(weight.dtype) @ weight


def accumulate_stats(
    source: RowSource,
    rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    gram: bool = True,
) -> SufficientStats:
    """One pass over ``rows`` of ``source``; ``gram=False`` skips ``X^T X`` (``p x p``)."""
    p, t = source.n_features, source.n_targets

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=device)

    sum_x, sum_x2, sum_y, sum_y2 = zeros(p), zeros(p), zeros(t), zeros(t)
    xty = zeros(p, t)
    xtx = zeros(p, p) if gram else None
    n = 0
    for x, y, _ in source.batches(rows, batch_size, device=device):
        n += int(x.shape[0])
        x64 = x.to(torch.float64)
        y64 = y.to(torch.float64)
        sum_x += x64.sum(0)
        sum_x2 += (x64 * x64).sum(0)
        sum_y += y64.sum(0)
        sum_y2 += (y64 * y64).sum(0)
        xty += x64.T @ y64
        if xtx is not None:
            xtx += (x.T @ x).to(torch.float64)  # 0/1 products: exact in float32
    if n == 0:
        raise ValueError("no rows to accumulate statistics over")
    return SufficientStats(n, sum_x, sum_x2, sum_y, sum_y2, xty, xtx)
