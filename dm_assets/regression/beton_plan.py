"""What :func:`~dm_assets.regression.beton_writer.write_beton` writes, checked first.

:func:`plan_write` checks everything that needs no row data (the keys' shapes and dtypes,
``y_slice``, the output directory, the completion flags) and reports every problem at once. The
row values (masks must hold only 0 and 1, targets must be finite once cast to float32) are
checked by the writer as it copies them, with a :class:`ValueChecks` per block of rows whose
problems :func:`value_problems` merges into one error. The :class:`WritePlan` holds a
:class:`StoreRows`, where the rows to write are in the store's files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dm_assets.regression.beton import (
    MAX_NAMED,
    SEED_BETON_NAME,
    BetonError,
    named_indices,
)
from dm_assets.store.spec import COMPLETED_KEY
from dm_assets.store.store import Store, StoreError


@dataclass(frozen=True)
class ArrayRef:
    """Where a store array lives in its ``.npy`` file: ``shape`` ``(num_models, *row)`` of
    ``dtype`` from byte ``offset``; row ``i`` is the ``row_bytes`` bytes at
    ``offset + i * row_bytes``."""

    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, array: np.memmap) -> ArrayRef:
        return cls(str(array.filename), int(array.offset), array.dtype, tuple(array.shape))

    @property
    def row_items(self) -> int:
        """Values per row (1 for a scalar per model)."""
        return int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        return self.row_items * self.dtype.itemsize


@dataclass(frozen=True)
class StoreRows:
    """The rows to write: model ``indices`` (int64, increasing) of the masks ``x`` and the
    targets ``y``, whose columns ``y_cols`` are written (cast to float32)."""

    x: ArrayRef
    y: ArrayRef
    indices: np.ndarray
    y_cols: slice


@dataclass(frozen=True)
class WritePlan:
    """The checked rows to write (``rows``) from keys ``x_key`` and ``y_key``: masks of
    ``n_features`` values in ``mask_dtype``, ``n_targets`` targets (float32 once written)."""

    rows: StoreRows
    x_key: str
    y_key: str
    n_features: int
    n_targets: int
    mask_dtype: np.dtype


def open_store(store_dir: Path) -> Store:
    """The store at ``store_dir``, or a :class:`BetonError` that says which directory to pass."""
    try:
        return Store.open(store_dir)
    except StoreError as exc:
        raise BetonError(
            f"cannot read the store at {store_dir}: {exc}\nPass the store directory (the one "
            "holding _completed.npy and the key files) as store_dir / --cfg.data_dir"
        ) from exc


def _completed_flags(store: Store, completed_name: str) -> np.ndarray:
    """The completion flags as bool ``(num_models,)``: the store's own, or ``<name>.npy``."""
    if completed_name == COMPLETED_KEY:
        return store.completed_mask()
    path = store.path / f"{completed_name}.npy"
    if not path.is_file():
        raise BetonError(
            f"completed_name={completed_name!r}: there is no {path}; pass the name of the "
            f"store's completion flags ({COMPLETED_KEY!r}, the default), or ignore_completed "
            "to write every row"
        )
    try:
        flags = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise BetonError(f"completed_name={completed_name!r}: {path} is unreadable: {exc}") from exc
    if flags.shape != (store.spec.num_models,) or flags.dtype.kind not in "biu":
        raise BetonError(
            f"completed_name={completed_name!r}: {path} has shape {list(flags.shape)} dtype "
            f"{flags.dtype.name}; completion flags are bool or integer, shape "
            f"[{store.spec.num_models}] (one per model)"
        )
    return np.asarray(flags) != 0


def plan_write(
    store: Store,
    out_path: Path,
    *,
    x_name: str,
    y_name: str,
    y_slice: int | None,
    completed_name: str,
    ignore_completed: bool,
) -> WritePlan:
    """Check everything that needs no row data, reporting every problem at once.

    Parameters
    ----------
    store : Store
        The open store.
    out_path : Path
        The dataset file to write (its directory must exist and be writable).
    x_name, y_name, y_slice, completed_name, ignore_completed
        As :func:`~dm_assets.regression.beton_writer.write_beton`'s.

    Returns
    -------
    WritePlan
        The rows to write: the completed model indices (all with ``ignore_completed``),
        int64 increasing, and the target columns kept.

    Raises
    ------
    BetonError
        One message listing every problem with the keys, ``y_slice`` and ``out_path``; or,
        once those are fine, when the completion flags are unreadable or none is set.
    """
    schema = store.spec.schema
    problems: list[str] = []
    keys = list(schema)
    for param, key in (("x_name", x_name), ("y_name", y_name)):
        if key not in schema:
            problems.append(
                f"{param}={key!r} is not a key of the store at {store.path}; its keys are {keys}"
            )
    n_features = _check_x_key(store, x_name, problems)
    n_targets, y_cols = _check_y_key(store, y_name, y_slice, problems)
    _check_out_path(out_path, problems)
    if problems:
        raise _problems(problems)
    indices = _rows_to_write(store, completed_name, ignore_completed)
    rows = StoreRows(
        ArrayRef.of(store.read(x_name)), ArrayRef.of(store.read(y_name)), indices, y_cols
    )
    return WritePlan(rows, x_name, y_name, n_features, n_targets, schema[x_name].dtype)


def _check_x_key(store: Store, x_name: str, problems: list[str]) -> int:
    """The mask length ``n_features`` of key ``x_name`` (0 when it is missing or not a
    non-empty vector); what is wrong with it is appended to ``problems``."""
    schema = store.spec.schema
    n_features = 0
    if x_name in schema:
        x = schema[x_name]
        if len(x.shape) != 1 or x.shape[0] == 0:
            problems.append(
                f"x key {x_name!r} has shape {list(x.shape)} per model; a mask is one "
                "non-empty vector per model, shape [n_features]: pass the mask key as x_name"
            )
        else:
            n_features = x.shape[0]
        if x.dtype.kind not in "biu":
            problems.append(
                f"x key {x_name!r} has dtype {x.dtype.name}; masks must be bool_ or integers "
                "holding 0/1: store masks as bool_ (or uint8) in the training script's spec"
            )
    return n_features


def _check_y_key(
    store: Store, y_name: str, y_slice: int | None, problems: list[str]
) -> tuple[int, slice]:
    """The number of targets written and the columns of key ``y_name`` they are (all, or
    ``y_slice`` alone); what is wrong with the key or ``y_slice`` is appended to
    ``problems``."""
    schema = store.spec.schema
    n_targets = 0
    y_cols = slice(None)
    if y_name in schema:
        y = schema[y_name]
        if len(y.shape) > 1:
            problems.append(
                f"y key {y_name!r} has shape {list(y.shape)} per model; targets must be one "
                "vector per model, shape [n_targets] (or a scalar, one target): return them "
                "flattened from the training script"
            )
        elif y.shape == (0,):
            problems.append(f"y key {y_name!r} has no values (shape [0]); it has no targets")
        else:
            n_targets = y.shape[0] if y.shape else 1
        if y.dtype.kind not in "biuf":
            problems.append(
                f"y key {y_name!r} has dtype {y.dtype.name}; targets must be real numbers "
                "(they are written as float32)"
            )
    if y_slice is not None:
        if isinstance(y_slice, bool) or not isinstance(y_slice, (int, np.integer)):
            problems.append(f"y_slice={y_slice!r} must be an integer column index, or None")
        elif n_targets and not 0 <= y_slice < n_targets:
            problems.append(
                f"y_slice={y_slice} is out of range: y key {y_name!r} has {n_targets} "
                f"target(s), so y_slice must be in [0, {n_targets - 1}]"
            )
        elif n_targets:
            y_cols = slice(int(y_slice), int(y_slice) + 1)
            n_targets = 1
    return n_targets, y_cols


def _check_out_path(out_path: Path, problems: list[str]) -> None:
    """Append to ``problems`` why ``out_path`` cannot be written, if it cannot."""
    parent = out_path.parent
    if not parent.is_dir():
        problems.append(
            f"out_path={str(out_path)!r}: its directory {parent} does not exist; create it first"
        )
    elif out_path.is_dir():
        problems.append(
            f"out_path={str(out_path)!r} is a directory; pass a file name, e.g. "
            f"{out_path / SEED_BETON_NAME}"
        )
    elif not os.access(parent, os.W_OK | os.X_OK):
        problems.append(
            f"out_path={str(out_path)!r}: its directory {parent} is not writable; choose "
            "another out_path"
        )


def _rows_to_write(store: Store, completed_name: str, ignore_completed: bool) -> np.ndarray:
    """The model indices to write, int64 increasing: the completed ones, or all of them."""
    if ignore_completed:
        return np.arange(store.spec.num_models, dtype=np.int64)
    indices = np.flatnonzero(_completed_flags(store, completed_name)).astype(np.int64)
    if indices.size == 0:
        raise BetonError(
            f"no model of the store at {store.path} is completed ({completed_name}.npy "
            "has no flag set), so there are no rows to write: train models first "
            "(`python -m dm_assets.worker ...`), or pass ignore_completed "
            "(--cfg.ignore_completed) to write every row as it is"
        )
    return indices


def _problems(problems: list[str]) -> BetonError:
    if len(problems) == 1:
        return BetonError(problems[0])
    lines = "\n".join(f"  - {p}" for p in problems)
    return BetonError(f"cannot write the dataset ({len(problems)} problems):\n{lines}")


@dataclass
class ValueChecks:
    """The value problems found in some rows: models whose masks hold values other than 0 and
    1 (the first :data:`MAX_NAMED`, their count, one such value), and models whose targets are
    not finite once cast to float32 (the first few, their count)."""

    bad_x: list[int] = field(default_factory=list)
    bad_x_count: int = 0
    bad_value: int | None = None
    bad_y: list[int] = field(default_factory=list)
    bad_y_count: int = 0

    def check(self, models: np.ndarray, x: np.ndarray | None, y: np.ndarray) -> None:
        """Check the rows of ``models`` (int64 ``(n,)``): masks ``x`` ``(n, n_features)`` of
        an integer dtype (``None``: bool masks, nothing to check) and float32 targets ``y``
        ``(n, n_targets)``, as written."""
        if x is not None:
            bad = ((x != 0) & (x != 1)).any(axis=1)
            if bad.any():
                self.bad_x_count += int(bad.sum())
                self.bad_x.extend(models[bad][: MAX_NAMED - len(self.bad_x)].tolist())
                if self.bad_value is None:
                    first = x[bad][0]
                    self.bad_value = int(first[(first != 0) & (first != 1)][0])
        bad = ~np.isfinite(y).all(axis=1)
        if bad.any():
            self.bad_y_count += int(bad.sum())
            self.bad_y.extend(models[bad][: MAX_NAMED - len(self.bad_y)].tolist())

    @property
    def failed(self) -> bool:
        return bool(self.bad_x_count or self.bad_y_count)


def value_problems(plan: WritePlan, checks: list[ValueChecks]) -> BetonError | None:
    """One error for the problems of every block's ``checks`` (in model order), or None."""
    merged = ValueChecks()
    for c in checks:
        merged.bad_x.extend(c.bad_x[: MAX_NAMED - len(merged.bad_x)])
        merged.bad_x_count += c.bad_x_count
        if merged.bad_value is None:
            merged.bad_value = c.bad_value
        merged.bad_y.extend(c.bad_y[: MAX_NAMED - len(merged.bad_y)])
        merged.bad_y_count += c.bad_y_count
    problems = []
    if merged.bad_x_count:
        problems.append(
            f"x key {plan.x_key!r} ({plan.mask_dtype.name}) must hold only 0 and 1, but "
            f"model(s) {named_indices(merged.bad_x, merged.bad_x_count)} hold other values "
            f"(e.g. {merged.bad_value}): fix the training script's masks and retrain those "
            "models (--worker.do_if_complete)"
        )
    if merged.bad_y_count:
        beyond = " or beyond float32's range" if plan.rows.y.dtype.itemsize > 4 else ""
        problems.append(
            f"y key {plan.y_key!r} has NaN or infinite values{beyond} in model(s) "
            f"{named_indices(merged.bad_y, merged.bad_y_count)}: retrain those models "
            "(--worker.do_if_complete); targets must be finite"
        )
    return _problems(problems) if problems else None
