"""The store specification: how many models, and what each model returns.

A spec is the seed's JSON document::

    {"num_models": 50000,
     "schema": {"masks":   {"shape": [50000], "dtype": "bool_"},
                "margins": {"shape": [10000], "dtype": "float16"}}}

Every schema key becomes one array of shape ``(num_models, *shape)`` in the store, stored in a
file named ``<key>.npy``; the store adds ``_completed`` (bool, ``(num_models,)``) itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dm_assets.errors import DmError

COMPLETED_KEY = "_completed"
"""Name of the per-model completion flags, reserved in every store."""

CONFIGURATION_KEY = "_configuration"
"""Name of the per-model configuration ids (int32, ``-1`` unknown), reserved in every store."""

# A key becomes a file name `<key>.npy`; 255 bytes is the usual file-name limit.
_MAX_KEY_BYTES = 200
_STORABLE_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_KEY_FIELDS = {"shape", "dtype"}
_TOP_FIELDS = {"num_models", "schema"}
_EXAMPLE = '{"num_models": 100, "schema": {"margins": {"shape": [10], "dtype": "float16"}}}'


class SpecError(DmError, ValueError):
    """A spec that cannot be used; ``problems`` lists every problem found, each with its fix."""

    def headline(self) -> str:
        where = f" in {self.source}" if self.source else ""
        return f"invalid spec{where} ({len(self.problems)} problem(s))"


def parse_dtype(name: object) -> np.dtype:
    """The numpy dtype for a seed dtype name such as ``"bool_"``, ``"uint8"``, ``"float16"``.

    Raises ``ValueError`` naming the fix when ``name`` is not a numeric numpy type name.
    """
    hint = "use a numpy type name such as bool_, uint8, int64, float16 or float32"
    if not isinstance(name, str) or not name:
        raise ValueError(f"dtype must be a string; got {name!r}: {hint}")
    scalar_type = getattr(np, name, None)
    if not (isinstance(scalar_type, type) and issubclass(scalar_type, np.generic)):
        raise ValueError(f"unknown dtype {name!r}: {hint}")
    dtype = np.dtype(scalar_type)
    if dtype.kind not in _STORABLE_KINDS or dtype.itemsize == 0:
        raise ValueError(f"dtype {name!r} cannot be stored in a fixed-size array: {hint}")
    return dtype


def key_problem(key: object) -> str | None:
    """Why ``key`` is unsafe as a schema key (it becomes a file name), or None when it is safe."""
    if not isinstance(key, str):
        return f"schema key {key!r} is not a string: name it with letters, digits, '-', '_', '.'"
    if key == "":
        return "schema key '' is empty: give every key a name"
    if key == COMPLETED_KEY:
        return f"schema key {key!r} is reserved for the store's completion flags: rename it"
    if key.startswith("_"):
        return (
            f"schema key {key!r} starts with '_', which is reserved for the store's own arrays: "
            "rename it without the leading underscore"
        )
    if key in (".", "..") or key.startswith("."):
        return f"schema key {key!r} starts with '.': keys become file names; rename it"
    if re.search(r"[/\\\x00]", key):
        return f"schema key {key!r} contains a path separator or NUL: keys become file names"
    if ".." in key:
        return f"schema key {key!r} contains '..': keys become file names; rename it"
    if any(ord(c) < 32 for c in key):
        return f"schema key {key!r} contains control characters: rename it"
    if len(key.encode()) > _MAX_KEY_BYTES:
        return f"schema key {key[:20]!r}... is longer than {_MAX_KEY_BYTES} bytes: shorten it"
    return None


@dataclass(frozen=True)
class ArraySpec:
    """One schema entry: each model's value is an array of ``shape`` and ``dtype``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    dtype_name: str = field(default="", compare=False)

    @property
    def row_nbytes(self) -> int:
        """Bytes one model's value occupies in the store."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype_name or self.dtype.name}

    def describe(self) -> str:
        return f"shape {list(self.shape)} dtype {self.dtype_name or self.dtype.name}"


@dataclass(frozen=True)
class Spec:
    """A validated spec: ``num_models`` rows of every ``schema`` array."""

    num_models: int
    schema: Mapping[str, ArraySpec]

    @classmethod
    def from_dict(cls, data: object, *, source: str | None = None) -> Spec:
        """Validate a decoded spec document, reporting every problem at once (``SpecError``)."""
        problems: list[str] = []
        if not isinstance(data, Mapping):
            raise SpecError([f"the spec must be a JSON object like {_EXAMPLE}"], source)
        unknown = sorted(set(map(str, data)) - _TOP_FIELDS)
        if unknown:
            problems.append(
                f"unknown top-level field(s) {unknown}: a spec has only 'num_models' and 'schema'"
            )
        num_models = data.get("num_models")
        if "num_models" not in data:
            problems.append("missing 'num_models': add the number of models to train, e.g. 1000")
        elif not _is_int(num_models) or num_models <= 0:  # type: ignore[operator]
            problems.append(
                f"'num_models' must be a positive integer; got {num_models!r}: "
                "set it to the number of models to train"
            )
        schema: dict[str, ArraySpec] = {}
        raw_schema = data.get("schema")
        if "schema" not in data:
            problems.append(
                "missing 'schema': add one entry per output, e.g. "
                '"schema": {"margins": {"shape": [10], "dtype": "float16"}}'
            )
        elif not isinstance(raw_schema, Mapping):
            problems.append(
                f"'schema' must be an object mapping keys to arrays; got {raw_schema!r}"
            )
        else:
            if not raw_schema:
                problems.append("'schema' is empty: add at least one output key")
            for key, entry in raw_schema.items():
                parsed = _parse_entry(key, entry, problems)
                if parsed is not None:
                    schema[key] = parsed
        if problems:
            raise SpecError(problems, source)
        return cls(num_models=int(num_models), schema=schema)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        """Read and validate a spec JSON file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SpecError([f"cannot read the spec file: {exc.strerror}"], str(path)) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [f"not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"], str(path)
            ) from exc
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_models": self.num_models,
            "schema": {key: entry.to_json() for key, entry in self.schema.items()},
        }

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def differences(
        self, other: Spec, *, mine: str = "store", theirs: str = "new spec"
    ) -> list[str]:
        """Human-readable differences between two specs; empty when they describe the same store."""
        diffs: list[str] = []
        if self.num_models != other.num_models:
            diffs.append(
                f"num_models: {mine} has {self.num_models}, {theirs} has {other.num_models}"
            )
        for key in self.schema:
            if key not in other.schema:
                diffs.append(f"key {key!r}: in the {mine}, missing from the {theirs}")
            elif self.schema[key] != other.schema[key]:
                diffs.append(
                    f"key {key!r}: {mine} has {self.schema[key].describe()}, "
                    f"{theirs} has {other.schema[key].describe()}"
                )
        for key in other.schema:
            if key not in self.schema:
                diffs.append(f"key {key!r}: in the {theirs}, missing from the {mine}")
        return diffs


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _parse_entry(key: object, entry: object, problems: list[str]) -> ArraySpec | None:
    ok = True
    bad_key = key_problem(key)
    if bad_key:
        problems.append(bad_key)
        ok = False
    if not isinstance(entry, Mapping):
        problems.append(
            f'key {key!r}: must be an object like {{"shape": [10], "dtype": "float16"}}; '
            f"got {entry!r}"
        )
        return None
    unknown = sorted(set(map(str, entry)) - _KEY_FIELDS)
    if unknown:
        problems.append(f"key {key!r}: unknown field(s) {unknown}: use only 'shape' and 'dtype'")
        ok = False
    shape = entry.get("shape")
    if "shape" not in entry:
        problems.append(f"key {key!r}: missing 'shape': add e.g. \"shape\": [10] ([] for a scalar)")
        ok = False
    elif not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        problems.append(
            f"key {key!r}: 'shape' must be a list of non-negative integers; got {shape!r}"
        )
        ok = False
    dtype: np.dtype | None = None
    if "dtype" not in entry:
        problems.append(f'key {key!r}: missing \'dtype\': add e.g. "dtype": "float16"')
        ok = False
    else:
        try:
            dtype = parse_dtype(entry["dtype"])
        except ValueError as exc:
            problems.append(f"key {key!r}: {exc}")
            ok = False
    if not ok or dtype is None:
        return None
    return ArraySpec(
        shape=tuple(int(d) for d in shape),  # type: ignore[union-attr]
        dtype=dtype,
        dtype_name=str(entry["dtype"]),
    )
