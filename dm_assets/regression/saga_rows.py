"""The SAGA solver's rows: their coordinates, where they live, and the residual table.

One least-squares problem (the training rows for the path; train + validation rows for the
refit) is solved in a frame centered on its own rows: ``z = (x - shift) / std`` and
``u = y - offset``, ``shift`` and ``offset`` the fitting rows' means, ``std`` the training
rows' standard deviations. There the best intercept is zero for every ``w``, so SAGA never
updates one (:class:`Frame`).

Memory, the two choices the solver makes:

- The rows (:class:`Rows`). When the fitting rows fit in ``cache_bytes`` (``4 * n * (p + t)``
  bytes), one pass over the source stores them standardized on the device, in an order
  shuffled once (by ``seed``); the minibatches are then its fixed contiguous blocks, visited in
  a new order each epoch: SAGA over the ``n / B`` block means, with no per-batch copy,
  conversion or standardization. Otherwise every pass streams from the source, whose shuffled
  passes draw new minibatches each epoch. Both converge at the same rate per epoch; the cached
  epochs run at the speed of the two matrix products per minibatch.
- The SAGA table (:class:`ResidualTable`), ``4 * n * t`` bytes: on CUDA it stays on the device
  when it fits in ``DEVICE_TABLE_FRACTION`` of the free memory, else in pinned host memory
  (then a gather and a scatter over PCIe per minibatch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from dm_assets.regression.data import RowSource
from dm_assets.regression.path import Standardization
from dm_assets.regression.stats import CenteredProblem, SufficientStats

logger = logging.getLogger(__name__)

# Half the free CUDA memory for the table leaves the other half to the weights, the cached rows
# and the minibatch products.
DEVICE_TABLE_FRACTION = 0.5

# Default cache_bytes (1 GiB): datamodels-sized training rows fit on any GPU and most hosts.
CACHE_BYTES = 2**30


@dataclass(frozen=True)
class Frame:
    """Coordinates of one least-squares problem.

    ``z = (x - shift) * inv_std`` and ``u = y - offset``; ``problem`` is the same problem's
    statistics (its ``lambda_max()``, ``yy`` = ``mean(u^2)``, ``intercept(w)``). Float64 on
    the solver's device: ``shift``, ``inv_std`` ``(p,)``, ``lam_max`` and ``scale``
    (``mean(u^2)``, the objective's scale) ``(t,)``. Float32 for the batches: ``z_offset32``
    (``-shift * inv_std``) and ``inv_std32`` ``(p,)``, ``offset32`` ``(t,)``.
    """

    problem: CenteredProblem
    shift: torch.Tensor
    inv_std: torch.Tensor
    lam_max: torch.Tensor
    scale: torch.Tensor
    z_offset32: torch.Tensor
    inv_std32: torch.Tensor
    offset32: torch.Tensor

    @classmethod
    def of(cls, stats: SufficientStats, std: Standardization, *, use_bias: bool) -> Frame:
        """The frame of the rows summed in ``stats``, standardized by ``std``; without
        ``use_bias`` centered on ``std.mean`` and ``offset = 0`` (no intercept)."""
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


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(z, u, index)`` on the solver's device: standardized masks float32 ``(b, p)``, centered
targets float32 ``(b, t)`` (every target), and int64 ``(b,)`` the rows' rows in the SAGA
table. Read-only: they may be views of the cache."""


@dataclass(frozen=True)
class Rows:
    """Row positions of a source in one frame, read in minibatches: from a cache on the device
    when it was built, else streamed from the source on every pass.

    ``positions`` int64 ``(n,)`` the source rows; ``lookup`` int64 ``(n_rows,)`` on the device
    maps a source row to its index in ``positions`` (-1 for the others), which is its row in
    the SAGA table when streaming. ``cache``: ``z`` float32 ``(n, p)``, ``u`` float32 ``(n, t)``
    (every target) and ``index`` int64 ``arange(n)``; cached, a row's table row is its row in
    the cache.
    """

    source: RowSource
    positions: np.ndarray
    batch_size: int
    frame: Frame
    lookup: torch.Tensor
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(
        cls,
        source: RowSource,
        positions: np.ndarray,
        batch_size: int,
        frame: Frame,
        cache_bytes: int,
        *,
        seed: int | None = None,
    ) -> Rows:
        """The rows, cached on the device when their ``4 * n * (p + t)`` bytes are at most
        ``cache_bytes`` (one pass over the source builds it). With ``seed`` (rows SAGA fits
        on), the cache holds them in an order shuffled by ``seed`` (see :meth:`batches`)."""
        device = frame.shift.device
        n, p, t = len(positions), source.n_features, source.n_targets
        lookup = torch.full((source.n_rows,), -1, dtype=torch.int64)
        lookup[torch.from_numpy(positions)] = torch.arange(n)
        rows = cls(source, positions, batch_size, frame, lookup.to(device))
        if cache_size(n, source) > cache_bytes:
            return rows
        slot = torch.arange(n) if seed is None else torch.from_numpy(permutation(seed, n))
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

    def batches(self, *, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """The rows in minibatches of ``batch_size`` (the last may be smaller), in order or
        shuffled (a different order for each ``seed``).

        Streamed, a shuffled pass is the source's (ArraySource: a new permutation of the rows
        each time). Cached, the minibatches are the fixed blocks of the once-shuffled layout,
        visited in a shuffled order: views of the cache, no copies (minibatch SAGA over a
        fixed partition of the rows is SAGA over ``n / B`` functions, each the mean of a
        block).
        """
        if self.cache is None:
            yield from self._stream(shuffle=shuffle, seed=seed)
            return
        z, u, index = self.cache
        n, size = self.n, self.batch_size
        blocks = range(-(-n // size))
        for block in permutation(seed, len(blocks)).tolist() if shuffle else blocks:
            part = slice(block * size, min(block * size + size, n))
            yield z[part], u[part], index[part]

    def _stream(self, *, shuffle: bool, seed: int) -> Iterator[Batch]:
        for x, y, pos in self.source.batches(
            self.positions, self.batch_size, device=self.device, shuffle=shuffle, seed=seed
        ):
            index = self.lookup[pos.to(self.device)]
            # the source's tensors are ours: standardized and centered in place
            y = y if y.dtype == torch.float32 else y.float()
            yield self.frame.z_(x), y.sub_(self.frame.offset32), index


def permutation(seed: int, n: int) -> np.ndarray:
    """int64 ``(n,)``: the permutation of ``range(n)`` drawn by ``default_rng(seed)``."""
    return np.random.default_rng(seed).permutation(n)


def cache_size(n: int, source: RowSource) -> int:
    """Bytes the cache of ``n`` rows of ``source`` needs: float32 ``z`` and ``u``."""
    return 4 * n * (source.n_features + source.n_targets)


class ResidualTable:
    """Each fitting row's residual when it was last visited: float32 ``(n, a)``, on the device
    or in pinned host memory (then gathered and scattered per minibatch)."""

    def __init__(self, n: int, a: int, device: torch.device, on_host: bool) -> None:
        self.device = device
        self.on_host = on_host and device.type != "cpu"
        values = torch.zeros((n, a), dtype=torch.float32, device="cpu" if self.on_host else device)
        self.values = values.pin_memory() if self.on_host else values

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``(b, a)`` on the device: the residuals of the table rows ``rows``."""
        if self.on_host:
            return self.values.index_select(0, rows.cpu()).to(self.device)
        return self.values.index_select(0, rows)

    def scatter(self, rows: torch.Tensor, residual: torch.Tensor) -> None:
        """Store ``residual`` float32 ``(b, a)`` as the table rows ``rows``."""
        if self.on_host:
            self.values.index_copy_(0, rows.cpu(), residual.cpu())
        else:
            self.values.index_copy_(0, rows, residual)

    def zero_columns(self, columns: torch.Tensor) -> None:
        self.values.index_fill_(1, columns.to(self.values.device), 0.0)

    def keep(self, columns: torch.Tensor) -> None:
        """Keep the columns where ``columns`` (bool ``(a,)``) is True."""
        kept = self.values[:, columns.to(self.values.device)].contiguous()
        self.values = kept.pin_memory() if self.on_host else kept


def table_on_host(choice: bool | None, device: torch.device, n: int, t: int) -> bool:
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
