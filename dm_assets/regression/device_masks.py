"""Datamodels-shaped rows made on the device from a seed, and exact mask statistics in int8.

The paper's CIFAR-10 regression (300,000 models x 50,000 training examples x 10,000 targets)
is 1.5e10 mask entries: 1.9 GB packed, 15 GB as int8. :class:`SeededMasks` makes any row
from ``(seed, row)`` alone, on whichever device asks, so a benchmark at that scale needs no
file and no host-to-device copy; :func:`accumulate_mask_stats` sums ``X^T X`` with int8
matrix products and int32 accumulation, exact for 0/1 masks, at the tensor cores' integer rate.

**Masks.** Entry ``(i, j)`` of the mask matrix ``X`` (models x training examples) is::

    x_ij = [ h(i, j) < round(alpha * 2^24) ],   h(i, j) = mix(r_i XOR mix(j)) >> 8,
    r_i = mix((mix(seed) + i) mod 2^32)

with ``mix`` a 32-bit integer hash (Wellons' "lowbias32" shape, multipliers below 2^31 so
every product fits int64): each entry is an independent Bernoulli(``alpha``) draw, up to
``2^-24`` in ``alpha``. Integer arithmetic only, so the CPU and CUDA make the same bits, and a
row does not depend on the batch it comes in. (The paper's masks hold exactly
``alpha * p`` ones each; for the regression's cost and conditioning the difference is nil.)

**Targets.** Planted sparse datamodels plus noise, per target ``k``::

    y_ik = sum_j ((x_ij - alpha) / sqrt(alpha (1 - alpha))) * W*_jk + sigma * e_ik

``W*`` ``(p, t)`` has ``support`` nonzeros per target at hashed positions, each ``+-a`` with
``a^2 = r2 / support`` (the signal's variance is ``r2``), ``sigma^2 = 1 - r2`` and ``e_ik``
standard normal (Box-Muller on two hashes). So ``var(y) ~ 1`` and the best possible R^2 is
``r2``. A LASSO fit on masks standardized by the sample statistics recovers about ``W*``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dm_assets.regression.bit_stats import int8_gram
from dm_assets.regression.data import Batch, RowSource
from dm_assets.regression.stats import SufficientStats

_M32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97  # odd, < 2^31: x * mul < 2^63 for x < 2^32
_STREAM_MASK, _STREAM_SUPPORT, _STREAM_SIGN, _STREAM_NOISE = (
    0x1B873593,
    0x2C1B3C6D,
    0x297A2D39,
    0x5F356495,
)
_UNIT = 1 << 24  # hashes are cut to 24 bits: uniform on {0, ..., 2^24 - 1}
_ELEMENTS_PER_CHUNK = 1 << 25  # int64 temporaries of 256 MiB at most while hashing


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, elementwise: int64 ``x`` in ``[0, 2^32)`` to int64 in the same
    range (xor-shift, multiply, xor-shift, multiply, xor-shift). A bijection on 32-bit values,
    so distinct inputs never collide."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 15)


def _key(*values: int) -> int:
    """One 32-bit hash of a few nonnegative integers, folded in order."""
    h = 0
    for v in values:
        h = int(mix32(torch.tensor([(h + v) & _M32], dtype=torch.int64))[0])
    return h


class SeededMasks:
    """Rows ``0 .. n_rows - 1`` of 0/1 masks and planted targets, computed from a seed on the
    device that asks for them (module doc: the formulas). A :class:`RowSource`.

    Parameters
    ----------
    n_rows, n_features, n_targets : int
        Models, training examples (mask length ``p``), targets ``t``; each at least 1, and
        ``n_rows < 2^31``.
    alpha : float
        The probability that a mask holds an example, in ``(0, 1)`` (0.5: the paper's CIFAR-10).
    support : int
        Nonzero planted weights per target, ``1 .. n_features``.
    r2 : float
        The variance of each target explained by its planted weights, in ``[0, 1]``.
    seed : int
        Everything (masks, weights, noise) follows from it; ``0 <= seed < 2^32``.
    """

    def __init__(
        self,
        n_rows: int,
        n_features: int,
        n_targets: int,
        *,
        alpha: float = 0.5,
        support: int = 20,
        r2: float = 0.5,
        seed: int = 0,
    ) -> None:
        problems = []
        for name, value in (("n_rows", n_rows), ("n_features", n_features)):
            if not 1 <= value < 2**31:
                problems.append(f"{name}={value} must be in [1, 2^31)")
        if n_targets < 1:
            problems.append(f"n_targets={n_targets} must be at least 1")
        if not 0 < alpha < 1:
            problems.append(f"alpha={alpha!r} must be in (0, 1): the fraction of examples kept")
        if not 1 <= support <= max(1, n_features):
            problems.append(f"support={support} must be in [1, n_features={n_features}]")
        if not 0 <= r2 <= 1:
            problems.append(f"r2={r2!r} must be in [0, 1]: the signal's share of var(y)")
        if not 0 <= seed <= _M32:
            problems.append(f"seed={seed} must be in [0, 2^32)")
        if problems:
            raise ValueError("SeededMasks: " + "; ".join(problems))
        self._n_rows, self._p, self._t = n_rows, n_features, n_targets
        self.alpha, self.support, self.r2, self.seed = alpha, support, r2, seed
        self.threshold = round(alpha * _UNIT)
        self._weights: dict[torch.device, torch.Tensor] = {}

    @property
    def n_rows(self) -> int:
        return self._n_rows

    @property
    def n_features(self) -> int:
        return self._p

    @property
    def n_targets(self) -> int:
        return self._t

    def _hash(self, stream: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """24-bit hashes int64 ``(len(rows), len(cols))`` of ``(seed, stream, row, col)``."""
        row_keys = mix32((rows + _key(self.seed, stream)) & _M32)
        return mix32(row_keys[:, None] ^ mix32(cols)[None, :]) >> 8

    def _rows_tensor(self, rows: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
        if idx.ndim != 1 or (
            idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < self._n_rows
        ):
            raise ValueError(f"rows must be a 1-D sequence of positions in [0, {self._n_rows})")
        return idx

    def masks(
        self,
        rows: Sequence[int] | np.ndarray,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The masks of ``rows``: ``dtype`` ``(len(rows), n_features)``, 0 or 1, on ``device``;
        hashed in chunks of at most 2^25 entries (256 MiB int64 temporaries)."""
        device = torch.device(device)
        idx = self._rows_tensor(rows, device)
        out = torch.empty(len(idx), self._p, dtype=dtype, device=device)
        cols = torch.arange(self._p, dtype=torch.int64, device=device)
        col_keys = mix32(cols)
        row_keys = mix32((idx + _key(self.seed, _STREAM_MASK)) & _M32)
        step = max(1, _ELEMENTS_PER_CHUNK // self._p)
        for start in range(0, len(idx), step):
            h = mix32(row_keys[start : start + step, None] ^ col_keys[None, :]) >> 8
            out[start : start + step] = h < self.threshold
        return out

    def planted_weights(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``W*`` float32 ``(n_features, n_targets)``: ``support`` entries ``+-sqrt(r2 /
        support)`` per column at hashed positions (module doc), zeros elsewhere."""
        device = torch.device(device)
        if device not in self._weights:
            targets = torch.arange(self._t, dtype=torch.int64, device=device)
            # the support: the `support` smallest hashes of each target's column
            ranks = self._hash(_STREAM_SUPPORT, targets, torch.arange(self._p, device=device))
            where = ranks.topk(self.support, dim=1, largest=False).indices  # (t, support)
            signs = self._hash(_STREAM_SIGN, targets, torch.arange(self.support, device=device))
            value = math.sqrt(self.r2 / self.support)
            w = torch.zeros(self._p, self._t, dtype=torch.float32, device=device)
            w[where, targets[:, None]] = torch.where(signs & 1 == 1, value, -value).float()
            self._weights[device] = w
        return self._weights[device]

    def targets(
        self, rows: Sequence[int] | np.ndarray, x: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The targets of ``rows``: float32 ``(len(rows), n_targets)`` on ``x``'s device
        (``x``: those rows' masks, float32, when already made; else on the CPU)."""
        device = x.device if x is not None else torch.device("cpu")
        if x is None:
            x = self.masks(rows, device=device)
        idx = self._rows_tensor(rows, device)
        scale = 1.0 / math.sqrt(self.alpha * (1 - self.alpha))
        w = self.planted_weights(device)
        signal = (x @ w - self.alpha * w.sum(0)) * scale
        targets = torch.arange(self._t, dtype=torch.int64, device=device)
        u1 = (self._hash(_STREAM_NOISE, idx, 2 * targets).double() + 0.5) / _UNIT
        u2 = self._hash(_STREAM_NOISE, idx, 2 * targets + 1).double() / _UNIT
        noise = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return signal + (math.sqrt(1 - self.r2) * noise).float()

    def batches(
        self,
        rows: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        device: torch.device,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[Batch]:
        """As :meth:`RowSource.batches`: ``(x, y, rows)`` made on ``device``; shuffled passes
        permute by ``default_rng(seed)``."""
        positions = np.asarray(rows, dtype=np.int64)
        if shuffle:
            positions = np.random.default_rng(seed).permutation(positions)
        device = torch.device(device)
        for start in range(0, len(positions), batch_size):
            part = positions[start : start + batch_size]
            x = self.masks(part, device=device)
            yield x, self.targets(part, x), torch.from_numpy(part).to(device)


def accumulate_mask_stats(
    source: RowSource,
    rows: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    device: torch.device | str,
    gram: bool = True,
) -> SufficientStats:
    """The sums of :func:`~dm_assets.regression.stats.accumulate_stats`, with ``X^T X`` and the
    column sums exact in integers.

    ``X^T X`` is summed as int32 (:func:`int8_gram` per batch; exact while ``n < 2^31``), then
    returned as float64; ``X^T 1`` in float64 (integer counts: exact). ``X^T Y``, ``Y^T 1``
    and ``y^T y`` are summed as ``accumulate_stats`` sums them (float32 products within a
    batch, float64 across batches).
    Memory: ``p x p`` int32 plus ``p x p`` float64 at the end, and a batch of ``b x p`` int8.

    Parameters
    ----------
    source : RowSource
        The rows; their masks must be 0/1 (checked per batch).
    rows : int array-like, shape (n,)
        Row positions to sum over (``1 <= n < 2^31``).
    batch_size : int
        Rows per batch.
    device : torch.device or str
        Where the products run and the sums live.
    gram : bool
        Also sum ``X^T X`` (False: ``xtx`` is None).

    Returns
    -------
    SufficientStats
        float64 sums on ``device``, equal to ``accumulate_stats``'s (``xtx`` and the column
        sums bit for bit).

    Raises
    ------
    ValueError
        When a batch holds a mask value other than 0 or 1, or ``n`` is 0 or ``>= 2^31``.
    """
    device = torch.device(device)
    rows = np.asarray(rows, dtype=np.int64)
    if not 1 <= len(rows) < 2**31:
        raise ValueError(f"need between 1 and 2^31 - 1 rows for int32 sums; got {len(rows)}")
    p, t = source.n_features, source.n_targets
    sum_x = torch.zeros(p, dtype=torch.float64, device=device)  # integer counts: exact
    xtx = torch.zeros(p, p, dtype=torch.int32, device=device) if gram else None
    sum_y = torch.zeros(t, dtype=torch.float64, device=device)
    sum_y2 = torch.zeros(t, dtype=torch.float64, device=device)
    xty = torch.zeros(p, t, dtype=torch.float64, device=device)
    n = 0
    for x, y, _ in source.batches(rows, batch_size, device=device):
        if bool(((x != 0) & (x != 1)).any()):
            raise ValueError(
                "int8 statistics need 0/1 masks; this source gave other values: use "
                "accumulate_stats for non-binary features"
            )
        n += int(x.shape[0])
        sum_x += x.sum(0, dtype=torch.float64)
        sum_y += y.to(torch.float64).sum(0)
        sum_y2 += y.to(torch.float64).square().sum(0)
        xty += (x.T @ y).to(torch.float64)
        if xtx is not None:
            xtx += int8_gram(x)
    return SufficientStats(
        n,
        sum_x,
        sum_x.clone(),  # x^2 = x for 0/1
        sum_y,
        sum_y2,
        xty,
        None if xtx is None else xtx.to(torch.float64),
    )


__all__ = ["SeededMasks", "accumulate_mask_stats", "mix32"]
