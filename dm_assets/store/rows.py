"""Checking one model's returned values against the schema before anything is written.

A training script's ``main`` returns a mapping ``{key: value}``; every value must have exactly
the key's shape and be storable in the key's dtype without changing what it means:

- bool keys take booleans, or integers that are all 0 or 1 (never floats);
- integer keys take booleans, integers in range, or floats that are all whole numbers in range;
- float keys take booleans, integers and floats, all finite, that stay finite once cast;
- complex keys take any finite number.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from dm_assets.errors import DmError
from dm_assets.store.spec import COMPLETED_KEY, ArraySpec


class RowError(DmError, ValueError):
    """A model's returned values do not fit the schema; ``problems`` names every key at fault,
    ``index`` is the model's index when known."""

    def __init__(self, problems: list[str], index: int | None = None) -> None:
        self.index = index
        super().__init__(problems, None if index is None else f"model index {index}")

    def headline(self) -> str:
        where = f" for model index {self.index}" if self.index is not None else ""
        return f"returned values do not fit the spec{where}; nothing written"


def _to_numpy(value: object) -> np.ndarray:
    # torch tensors (possibly on a GPU, possibly requiring grad) without importing torch here
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _describe(arr: np.ndarray) -> str:
    return f"shape {list(arr.shape)} dtype {arr.dtype.name}"


def coerce_value(key: str, value: object, spec: ArraySpec) -> tuple[np.ndarray | None, str | None]:
    """``(array in spec.dtype, None)`` when ``value`` fits ``spec``, else ``(None, problem)``."""
    expected = f"expected {spec.describe()}"
    try:
        arr = _to_numpy(value)
    except (ValueError, TypeError) as exc:
        return None, f"key {key!r}: {expected}, received a value numpy cannot convert ({exc})"
    if arr.dtype.kind not in "biufc":
        return None, f"key {key!r}: {expected}, received non-numeric {_describe(arr)}"
    if arr.shape != spec.shape:
        return None, f"key {key!r}: {expected}, received {_describe(arr)}"
    src, dst = arr.dtype.kind, spec.dtype.kind
    received = f"{expected}, received {_describe(arr)}"
    if src in "fc":
        bad = ~np.isfinite(arr)
        if bad.any():
            n_nan = int(np.isnan(arr).sum())
            return None, (
                f"key {key!r}: {received} with {int(bad.sum())} non-finite value(s) "
                f"({n_nan} NaN): outputs must be finite"
            )
    if dst == "b":
        if src == "b":
            pass
        elif src in "iu" and arr.size and not np.isin(arr, (0, 1)).all():
            return None, f"key {key!r}: {received} with values other than 0 and 1"
        elif src in "fc":
            return None, (
                f"key {key!r}: {received}: floats do not go into a bool array; "
                "return booleans or 0/1 integers"
            )
    elif dst in "iu":
        if src == "c":
            return None, f"key {key!r}: {received}: complex values do not go into integers"
        if src == "f" and arr.size and not (np.floor(arr) == arr).all():
            return None, f"key {key!r}: {received} with non-integral values; round them first"
        if src in "iuf" and arr.size:
            info = np.iinfo(spec.dtype)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                return None, (
                    f"key {key!r}: {received} with values in [{lo}, {hi}], outside "
                    f"{spec.dtype.name}'s range [{info.min}, {info.max}]"
                )
    elif dst == "f" and src == "c":
        return None, f"key {key!r}: {received}: complex values do not go into a float array"
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        cast = arr.astype(spec.dtype, order="C", copy=False)
    if dst in "fc" and cast.size and not np.isfinite(cast).all():
        return None, (
            f"key {key!r}: {received} whose values overflow {spec.dtype.name} "
            f"(largest magnitude {np.abs(arr).max()}); rescale them or widen the dtype"
        )
    return cast, None


def coerce_row(
    values: object, schema: Mapping[str, ArraySpec], *, index: int | None = None
) -> dict[str, np.ndarray]:
    """Every schema key's value as a contiguous array of its stored dtype.

    Raises ``RowError`` listing every problem: not a mapping, missing or extra keys, the
    reserved ``_completed`` key, wrong shapes, values that do not fit the dtype, non-finite floats.
    """
    if not isinstance(values, Mapping):
        raise RowError(
            [
                f"main() must return a dict {{key: array}} for keys {list(schema)}; "
                f"got {type(values).__name__}"
            ],
            index,
        )
    problems: list[str] = []
    if COMPLETED_KEY in values:
        problems.append(f"key {COMPLETED_KEY!r} is reserved for the store; do not return it")
    extra = [k for k in values if k not in schema and k != COMPLETED_KEY]
    if extra:
        problems.append(f"unexpected key(s) {extra}: the spec's keys are {list(schema)}")
    missing = [k for k in schema if k not in values]
    if missing:
        problems.append(f"missing key(s) {missing}: return a value for every key in the spec")
    out: dict[str, np.ndarray] = {}
    for key, spec in schema.items():
        if key not in values:
            continue
        arr, problem = coerce_value(key, values[key], spec)
        if problem is not None:
            problems.append(problem)
        elif arr is not None:
            out[key] = arr
    if problems:
        raise RowError(problems, index)
    return out
