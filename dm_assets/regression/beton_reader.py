"""Reading an FFCV dataset (``.beton``) back: its description, and its rows in batches.

The format is described in :mod:`dm_assets.regression.beton` and the file's layout in
:mod:`dm_assets.regression.beton_format`. Every row's ``mask`` and ``targets`` are fixed-size
byte ranges whose offsets the file's metadata lists, so :class:`BetonSource` maps the file and
copies each batch's ranges out with numpy (no FFCV, numba or torch compilation: the first
batch costs what any other does). It reads any file with these fields, however its pages
were laid out: ours, and those FFCV's own writer makes (the seed's). A shuffled pass visits
the positions in the order of their permutation by ``numpy.random.default_rng(seed)``, which
is the order of FFCV's own ``Loader(order=OrderOption.RANDOM, seed=seed, indices=rows)``.
Batches are gathered by ``num_workers`` threads, ``batches_ahead`` of them ahead of the one
being used, so reading overlaps the solver's work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dm_assets.regression.beton import (
    IDX_FIELD,
    MASK_FIELD,
    TARGETS_FIELD,
    BetonError,
    named_indices,
)
from dm_assets.regression.beton_format import (
    INT_FIELD_ID,
    NDARRAY_FIELD_ID,
    BetonFile,
    FormatError,
    read_head,
)

if TYPE_CHECKING:  # torch is imported when batches are read, not to describe a file
    import torch

    from dm_assets.regression.data import Batch

_WRITE_HINT = (
    "write one with `python -m dm_assets.regression.write_dataset --cfg.data_dir=STORE "
    "--cfg.out_path=OUT.beton`"
)


@dataclass(frozen=True)
class BetonInfo:
    """What a dataset file holds: ``n_rows`` rows of ``mask`` ``(n_features,)`` in
    ``mask_dtype`` and ``targets`` ``(n_targets,)`` in ``targets_dtype``; ``model_indices``
    is the ``idx`` field of every row, int64 ``(n_rows,)``."""

    path: Path
    n_rows: int
    n_features: int
    n_targets: int
    mask_dtype: np.dtype
    targets_dtype: np.dtype
    model_indices: np.ndarray


def _unreadable(path: Path, why: str) -> BetonError:
    return BetonError(
        f"{path} is not a readable FFCV dataset: {why}; write it again with `python -m "
        "dm_assets.regression.write_dataset --cfg.data_dir=STORE --cfg.out_path=OUT.beton`"
    )


def _open_head(path: Path) -> BetonFile:
    """The head of the file at ``path``, after checking it is whole and has our fields."""
    if not path.exists():
        raise BetonError(f"no dataset at {path}: {_WRITE_HINT}")
    if not path.is_file():
        raise BetonError(f"{path} is not a file; pass the .beton file, not its directory")
    try:
        head = read_head(path)
    except (FormatError, ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, str(exc)) from exc
    fields = head.fields
    wanted = {MASK_FIELD: NDARRAY_FIELD_ID, TARGETS_FIELD: NDARRAY_FIELD_ID}
    wanted[IDX_FIELD] = INT_FIELD_ID
    for name, type_id in wanted.items():
        field = fields.get(name)
        if (
            field is None
            or field.type_id != type_id
            or (type_id == NDARRAY_FIELD_ID and (len(field.shape or ()) != 1 or not field.nbytes))
        ):
            kinds = {k: v.kind for k, v in fields.items()}
            raise _unreadable(
                path,
                f"it needs fields mask and targets (1-D NDArrayField) and idx (IntField); "
                f"it has {kinds}",
            )
    return head


def beton_info(path: str | Path) -> BetonInfo:
    """What the dataset at ``path`` holds (reads its header and per-row metadata only)."""
    return _info(_open_head(Path(path)))


def _info(head: BetonFile) -> BetonInfo:
    mask, targets = head.fields[MASK_FIELD], head.fields[TARGETS_FIELD]
    assert mask.shape is not None and targets.shape is not None  # checked by _open_head
    return BetonInfo(
        path=head.path,
        n_rows=head.n_rows,
        n_features=int(mask.shape[0]),
        n_targets=int(targets.shape[0]),
        mask_dtype=np.dtype(mask.dtype),
        targets_dtype=np.dtype(targets.dtype),
        model_indices=np.array(head.column(IDX_FIELD), dtype=np.int64),
    )


class BetonSource:
    """The rows of a dataset, for the solvers (as written by
    :func:`~dm_assets.regression.beton_writer.write_beton`, or by FFCV's writer for the seed).

    Implements :class:`~dm_assets.regression.data.RowSource`: row ``r`` (a position
    ``0 .. n_rows - 1`` in the file) is ``x`` = its ``mask`` as float32 ``(n_features,)`` and
    ``y`` = its ``targets`` columns ``[target_start, target_end)`` as float32
    ``(n_targets,)``. ``target_end=-1`` means to the last column (the seed's
    ``target_start_ind`` / ``target_end_ind``).

    Parameters
    ----------
    path : str or Path
        The dataset file.
    target_start, target_end : int
        The target columns ``[target_start, target_end)`` read (default: all).
    num_workers : int
        Threads that gather batches from the file.
    batches_ahead : int
        Batches gathered ahead of the one being used.

    Raises
    ------
    BetonError
        When the file is missing, unreadable or lacks the ``mask``, ``targets`` and ``idx``
        fields, or when the target range does not fit.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        target_start: int = 0,
        target_end: int = -1,
        num_workers: int = 2,
        batches_ahead: int = 3,
    ) -> None:
        self.path = Path(path)
        head = _open_head(self.path)
        self.info = _info(head)
        total = self.info.n_targets
        end = total if target_end == -1 else target_end
        if not 0 <= target_start < end <= total:
            raise BetonError(
                f"target_start={target_start}, target_end={target_end}: {self.path} has "
                f"{total} targets, so 0 <= target_start < target_end <= {total} (or "
                "target_end=-1 for all the rest)"
            )
        for name, value in (("num_workers", num_workers), ("batches_ahead", batches_ahead)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BetonError(f"{name}={value!r} must be a positive integer")
        self.num_workers = num_workers
        self.batches_ahead = batches_ahead
        self.target_start, self.target_end = target_start, end
        self._mask = _FieldReader(head, MASK_FIELD, slice(None))
        self._targets = _FieldReader(head, TARGETS_FIELD, slice(target_start, end))
        self._data: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return self.info.n_rows

    @property
    def n_features(self) -> int:
        return self.info.n_features

    @property
    def n_targets(self) -> int:
        return self.target_end - self.target_start

    def model_indices(self) -> np.ndarray:
        """The ``idx`` field of every row: each row's model index in the store, int64
        ``(n_rows,)`` (increasing, as
        :func:`~dm_assets.regression.beton_writer.write_beton` writes them)."""
        return self.info.model_indices.copy()

    def _positions(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        positions = np.asarray(rows)
        if positions.size == 0:
            return np.zeros(0, dtype=np.int64)
        if positions.ndim != 1 or positions.dtype.kind not in "iu":
            raise BetonError(
                f"rows must be a 1-D sequence of integer row positions; got shape "
                f"{list(positions.shape)} dtype {positions.dtype.name}"
            )
        positions = positions.astype(np.int64)
        outside = (positions < 0) | (positions >= self.n_rows)
        if outside.any():
            raise BetonError(
                f"rows holds positions outside [0, {self.n_rows}) (e.g. "
                f"{named_indices(positions[outside], int(outside.sum()))}); {self.path} has "
                f"{self.n_rows} rows"
            )
        return positions

    def _gather(self, part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``part``'s masks and targets, float32 ``(b, n_features)`` and
        ``(b, n_targets)``, fresh arrays."""
        data = self._mapped()
        x = np.empty((len(part), self.n_features), dtype=np.float32)
        y = np.empty((len(part), self.n_targets), dtype=np.float32)
        self._mask.gather(data, part, x)
        self._targets.gather(data, part, y)
        return x, y

    def _mapped(self) -> np.ndarray:
        """The file's bytes, mapped read-only (once per source)."""
        if self._data is None:
            # a plain array over the mapping: slicing a memmap makes memmap objects
            self._data = np.asarray(np.memmap(self.path, dtype=np.uint8, mode="r"))
        return self._data

    def batches(
        self,
        rows: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        device: torch.device,
        shuffle: bool = False,
        seed: int = 0,
    ) -> Iterator[Batch]:
        """The row positions ``rows`` in batches, in order or shuffled.

        As :meth:`~dm_assets.regression.data.RowSource.batches`: ``(x, y, rows)`` batches of
        at most ``batch_size`` (the last may be smaller), x float32 ``(b, n_features)``, y
        float32 ``(b, n_targets)``, rows int64 ``(b,)``, all on ``device`` and owned by the
        caller. With ``shuffle`` the rows are permuted by ``default_rng(seed)`` (FFCV's own
        ``OrderOption.RANDOM`` order for ``seed``): the same seed gives the same order.
        Raises :class:`BetonError` for a bad ``batch_size`` or positions outside the file.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BetonError(f"batch_size={batch_size!r} must be a positive integer")
        positions = self._positions(rows)
        if positions.size == 0:
            return
        order = np.random.default_rng(seed).permutation(positions) if shuffle else positions
        parts = [order[a : a + batch_size] for a in range(0, len(order), batch_size)]
        self._mapped()  # here, not in the reading threads
        if len(parts) == 1:
            x, y = self._gather(parts[0])
            yield _batch(x, y, parts[0], device)
            return
        pending: deque[tuple[np.ndarray, Future[tuple[np.ndarray, np.ndarray]]]] = deque()
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="beton-read") as pool:
            try:
                for part in parts:
                    pending.append((part, pool.submit(self._gather, part)))
                    if len(pending) > self.batches_ahead:
                        done, future = pending.popleft()
                        yield _batch(*future.result(), done, device)
                while pending:
                    done, future = pending.popleft()
                    yield _batch(*future.result(), done, device)
            finally:
                for _, future in pending:
                    future.cancel()


def _batch(x: np.ndarray, y: np.ndarray, part: np.ndarray, device: torch.device) -> Batch:
    import torch

    return (
        torch.from_numpy(x).to(device),
        torch.from_numpy(y).to(device),
        torch.from_numpy(part.copy()).to(device),
    )


class _FieldReader:
    """Copies one array field's rows out of the mapped file, as float32, columns ``cols``.

    A row's data is ``nbytes`` bytes at the offset the metadata gives. Rows whose offsets
    advance by the file's usual step (``stride``: consecutive rows of a page) form runs, each
    copied as one strided view; scattered small rows are gathered with one fancy index.
    """

    # Below this many bytes per row, scattered rows are gathered by one fancy index (numpy's
    # per-element copy) rather than one copy per row (about a microsecond of Python each).
    _SMALL_ROW_BYTES = 4096

    def __init__(self, head: BetonFile, name: str, cols: slice) -> None:
        field = head.fields[name]
        assert field.dtype is not None  # an NDArrayField, checked by _open_head
        self.dtype = field.dtype
        self.nbytes = field.nbytes
        self.cols = cols
        self.offsets = head.column(name).astype(np.int64)
        # the most common step between consecutive rows' offsets (row_bytes in our files)
        steps, counts = np.unique(np.diff(self.offsets[:64]), return_counts=True)
        positive = steps > 0
        self.stride = int(steps[positive][counts[positive].argmax()]) if positive.any() else 0
        self._windows: np.ndarray | None = None

    def gather(self, data: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows ``rows``' values into ``out`` (float32 ``(len(rows), n_cols)``)."""
        offsets = self.offsets[rows]
        breaks = np.flatnonzero(np.diff(offsets) != self.stride) + 1
        if self.nbytes < self._SMALL_ROW_BYTES and len(breaks) > len(rows) // 8:
            if self._windows is None:
                self._windows = np.lib.stride_tricks.sliding_window_view(data, self.nbytes)
            raw = self._windows[offsets]
            np.copyto(out, raw.view(self.dtype)[:, self.cols], casting="unsafe")
            return
        starts = [0, *breaks.tolist()]
        stops = [*breaks.tolist(), len(rows)]
        for a, b in zip(starts, stops, strict=True):
            first = int(offsets[a])
            run = np.lib.stride_tricks.as_strided(
                data[first:], shape=(b - a, self.nbytes), strides=(self.stride, 1), writeable=False
            )
            np.copyto(out[a:b], run.view(self.dtype)[:, self.cols], casting="unsafe")
