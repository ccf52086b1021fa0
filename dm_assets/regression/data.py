"""Where regression rows come from: arrays in memory (or memory-mapped) or an FFCV dataset.

A row source holds ``n_rows`` rows, each a mask ``x`` (``n_features`` values, 0/1) and targets
``y`` (``n_targets`` floats). Solvers address rows by position ``0 .. n_rows - 1``; with the
seed's layout positions ``[0, num_train)`` train, the next ``num_val`` validate, the rest are
held out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(x, y, rows)``: x float32 ``(b, n_features)``, y float32 ``(b, n_targets)`` on the device
asked for, and the row positions int64 ``(b,)`` (on the same device)."""


@runtime_checkable
class RowSource(Protocol):
    """Rows of masks and targets that solvers read in batches."""

    @property
    def n_rows(self) -> int: ...

    @property
    def n_features(self) -> int: ...

    @property
    def n_targets(self) -> int: ...

    def batches(
        self,
        rows: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        device: torch.device,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[Batch]:
        """The given row positions in batches, in order or shuffled.

        Parameters
        ----------
        rows : int array-like, shape (n,)
            Row positions, ``0 .. n_rows - 1``.
        batch_size : int
            Rows per batch; the last batch may be smaller.
        device : torch.device
            Where the yielded tensors live.
        shuffle : bool
            Permute the rows first (default False: in the given order).
        seed : int
            Seeds the permutation: the same seed gives the same order.

        Yields
        ------
        Batch
            ``(x, y, rows)``; every tensor is owned by the caller (safe to keep past the next
            iteration).
        """
        ...


class ArraySource:
    """Rows from arrays: ``x`` ``(n, n_features)`` bool or 0/1 integers, ``y`` ``(n, n_targets)``
    (or ``(n,)`` for one target) floats. Memory maps work; nothing is copied up front."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        if y.ndim == 1:
            y = y[:, None]
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x must be (n, n_features) and y (n, n_targets) with the same n; got x "
                f"{x.shape} and y {y.shape}"
            )
        self.x, self.y = x, y

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_targets(self) -> int:
        return int(self.y.shape[1])

    def batches(
        self,
        rows: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        device: torch.device,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[Batch]:
        """As :meth:`RowSource.batches`; shuffled passes permute by ``default_rng(seed)``."""
        rows = np.asarray(rows, dtype=np.int64)
        if shuffle:
            rows = np.random.default_rng(seed).permutation(rows)
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            # sorted reads are much faster on memory maps; the order inside a batch is free
            part = np.sort(part)
            x = torch.from_numpy(np.asarray(self.x[part], dtype=np.float32))
            y = torch.from_numpy(np.asarray(self.y[part], dtype=np.float32))
            yield x.to(device), y.to(device), torch.from_numpy(part).to(device)
