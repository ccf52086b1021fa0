"""Sufficient statistics of a set of rows, in one streaming pass.

For masks ``X`` (``n x p``, 0/1) and targets ``Y`` (``n x t``) the LASSO path of every target
depends only on ``n``, ``X^T 1``, ``X^T X``, ``Y^T 1``, ``X^T Y`` and the per-target ``y^T y``.
They are accumulated in float64 across batches from float32 products within a batch; ``X^T y``
is a sum of at most ``batch_size`` terms per entry (relative error about ``1e-7``). ``X^T X`` of
0/1 masks is counted exactly in integers: from bit-packed columns on the CPU, by an int8 matrix
product on CUDA (:mod:`dm_assets.regression.bit_stats`). Masks with other values fall back to
float32 products (exact for 0/1 values in batches under 2^24 rows, approximate otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dm_assets.regression.bit_stats import PackedGram, int8_gram, is_binary
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

    def centered(
        self, standardization: Standardization, *, fit_intercept: bool = True
    ) -> CenteredProblem:
        """The least-squares problem of these rows in standardized coordinates.

        With ``fit_intercept`` the problem is centered on these rows' means (the intercept is
        then exact); without, it is taken around the origin of the standardized coordinates.
        """
        n = self.n
        inv_std = 1.0 / standardization.std.to(self.sum_x.device)
        mean = standardization.mean.to(self.sum_x.device)
        x_bar = self.sum_x / n  # raw column means of these rows
        y_bar = self.sum_y / n
        # second moments about (a, b): a = x_bar, b = y_bar when centering, else a = mean, b = 0
        a = x_bar if fit_intercept else mean
        b = y_bar if fit_intercept else torch.zeros_like(y_bar)
        c = self.xty / n - a[:, None] * y_bar[None, :] - x_bar[:, None] * b[None, :]
        c = (c + a[:, None] * b[None, :]) * inv_std[:, None]
        gram = None
        if self.xtx is not None:
            # xtx / n - x_bar a^T - a x_bar^T + a a^T, scaled by inv_std on both sides: with
            # rank-one updates in place (three passes over p x p when centering, where
            # a = x_bar and the terms reduce to one update; was seven with temporaries)
            if fit_intercept:
                gram = torch.addr(self.xtx, x_bar, x_bar, beta=1.0 / n, alpha=-1.0)
            else:
                gram = torch.addr(self.xtx, x_bar, a, beta=1.0 / n, alpha=-1.0)
                gram.addr_(a, x_bar, alpha=-1.0)
                gram.addr_(a, a)
            gram.mul_(torch.outer(inv_std, inv_std))
        yy = (self.sum_y2 / n - 2 * y_bar * b + b * b).clamp_min(0)
        return CenteredProblem(
            n=n,
            gram=gram,
            c=c,
            yy=yy,
            x_bar_std=(x_bar - mean) * inv_std if fit_intercept else torch.zeros_like(mean),
            y_bar=b,
        )


@dataclass
class CenteredProblem:
    """``min_w (1/2) w^T G w - c^T w + yy / 2 + lambda |w|_1`` per target, which equals
    ``(1/(2n)) ||y - X_std w - b||^2 + lambda |w|_1`` at the best intercept
    ``b = y_bar - x_bar_std^T w``.

    ``gram`` ``(p, p)`` (None when not computed), ``c`` ``(p, t)``, ``yy`` ``(t,)`` (the
    variance of y; its mean square without an intercept), ``x_bar_std`` ``(p,)``, ``y_bar``
    ``(t,)`` (zeros without an intercept); float64.
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

    def intercept(self, weight: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The best bias for ``weight`` ``(p, t)`` (or ``(p, a)`` for the target ids
        ``targets``): ``y_bar - x_bar_std^T w``."""
        y_bar = self.y_bar if targets is None else self.y_bar[targets]
        return y_bar.to(weight.dtype) - self.x_bar_std.to(weight.dtype) @ weight


def accumulate_stats(
    source: RowSource,
    rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    gram: bool = True,
) -> SufficientStats:
    """The sums over ``rows`` of ``source`` that the LASSO path depends on, in one pass.

    Parameters
    ----------
    source : RowSource
        The rows: ``p`` 0/1 features, ``t`` targets.
    rows : int array-like, shape (n,)
        Row positions to sum over (at least one).
    batch_size : int
        Rows per batch (memory: ``batch_size x (p + t)`` float32 values).
    device : torch.device
        Where the products run and the sums live.
    gram : bool
        Also sum ``X^T X`` (float64 ``(p, p)``); False skips it (``xtx`` is then None).

    Returns
    -------
    SufficientStats
        float64 sums on ``device``.
    """
    p, t = source.n_features, source.n_targets

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float64, device=device)

    sum_x, sum_x2, sum_y, sum_y2 = zeros(p), zeros(p), zeros(t), zeros(t)
    xty = zeros(p, t)
    # X^T X of the batches summed as floats, allocated at the first one (None while every
    # batch is counted from bits: the counts become the float64 sums once, at the end)
    xtx: torch.Tensor | None = None
    # 0/1 masks on the CPU: counted from bit-packed columns until a batch is not 0/1
    # (the packing buffer: at most 64 MiB, 64 * chunk_words rows per count)
    chunk_words = max(16, min(512, (1 << 23) // max(p, 1)))
    packed = PackedGram(p, chunk_words=chunk_words) if gram and device.type == "cpu" else None
    n = 0
    for x, y, _ in source.batches(rows, batch_size, device=device):
        n += int(x.shape[0])
        y64 = y.to(torch.float64)
        sum_y += y64.sum(0)
        sum_y2 += y64.square().sum(0)
        # float32 products within a batch, float64 across batches
        xty += (x.T @ y).to(torch.float64)
        # float32 batches go straight to the packing pass, which also checks the values and
        # counts the column sums; other dtypes are checked first (a cast to float32 could
        # round a value near 1 to 1)
        ones = None
        if packed is not None and (x.dtype == torch.float32 or is_binary(x)):
            ones = packed.try_add(x.numpy())
        if ones is not None:
            column_sums = torch.from_numpy(ones).to(torch.float64)
            sum_x += column_sums
            sum_x2 += column_sums
            continue
        binary = packed is None and is_binary(x)
        column_sums = x.sum(0).to(torch.float64)
        sum_x += column_sums
        sum_x2 += column_sums if binary else (x * x).sum(0).to(torch.float64)
        if not gram:
            continue
        if packed is not None:  # the first batch that is not 0/1: the counts so far, then floats
            xtx = _counts_to_float64(packed.result())
            packed = None
        if xtx is None:
            xtx = zeros(p, p)
        if binary and device.type == "cuda":  # int8 tensor cores, exact int32 sums
            xtx += int8_gram(x).to(torch.float64)
        else:
            xtx += (x.T @ x).to(torch.float64)
    if n == 0:
        raise ValueError("no rows to accumulate statistics over")
    if packed is not None:  # every batch was 0/1: the counts are the sums
        xtx = _counts_to_float64(packed.result())
    return SufficientStats(n, sum_x, sum_x2, sum_y, sum_y2, xty, xtx)


def _counts_to_float64(counts: np.ndarray) -> torch.Tensor:
    """The int64 counts of :class:`PackedGram` as a float64 tensor (exact below 2^53)."""
    return torch.from_numpy(counts.astype(np.float64))
