"""Training configuration identity: everything that decides a model's outputs, and its fingerprint.

A :class:`TrainingConfiguration` holds

- ``schema``: the store's schema as in ``spec.json`` (not ``num_models``: growing a store keeps
  the configuration);
- ``main_import``: the trainer module (``--worker.main_import``, ``trainer.main_import``);
- ``args``: the pass-through arguments, normalized (see :func:`normalize_args`);
- ``code``: ``"version:<V>"`` when the user declares a version (``--worker.version``,
  ``trainer.version``), else ``"sha256:<hex>"`` of the trainer module's source file;
- ``versions``: the versions of dm_assets, torch and numpy installed for the training process.

Its :meth:`~TrainingConfiguration.fingerprint` is the sha256 of its canonical JSON; the store
keeps one small integer id per row naming the configuration that produced it
(:meth:`dm_assets.store.store.Store.register_configuration`), ``-1``
(:data:`UNKNOWN_CONFIGURATION`) where unknown.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dm_assets.errors import DmError

if TYPE_CHECKING:
    from dm_assets.store.store import Store

UNKNOWN_CONFIGURATION = -1
"""The configuration id of a row whose configuration is not known (a seed store's rows)."""

VERSIONED_PACKAGES = ("dm_assets", "torch", "numpy")
"""Packages whose installed version is part of every configuration."""

NOT_INSTALLED = "not installed"
_ABSENT = "(absent)"
_FIELDS = ("schema", "main_import", "args", "code", "versions")


class ConfigurationError(DmError, ValueError):
    """A training configuration cannot be computed or read; the message says how to fix it."""


def normalize_args(script_args: Sequence[str]) -> dict[str, str]:
    """The pass-through arguments as ``{name: value}``, sorted by name.

    ``--a.b=1`` and ``--a.b 1`` both give ``{"a.b": "1"}``; an option followed by another
    option (or by nothing) is a flag, ``"true"``. Other tokens (positional arguments, and
    everything after ``--``) are named ``"#0"``, ``"#1"``, ... in order. A name given more than
    once keeps every value, as a JSON list: ``--x=1 --x=2`` gives ``{"x": '["1", "2"]'}``.
    """
    values: dict[str, list[str]] = {}
    positional: list[str] = []
    tokens = list(script_args)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            positional.extend(tokens[i:])
            break
        if not token.startswith("--") or token == "--":
            positional.append(token)
            continue
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i < len(tokens) and not tokens[i].startswith("--"):
                value = tokens[i]
                i += 1
            else:
                value = "true"
        values.setdefault(name, []).append(value)
    for n, token in enumerate(positional):
        values.setdefault(f"#{n}", []).append(token)
    return {name: v[0] if len(v) == 1 else json.dumps(v) for name, v in sorted(values.items())}


def distribution_version(name: str) -> str | None:
    """The installed version of distribution ``name``, read without importing it (None when
    it is not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str]:
    """``{package: version}`` for :data:`VERSIONED_PACKAGES`, read from the installed
    distributions without importing them (``"not installed"`` for a missing one)."""
    return {name: distribution_version(name) or NOT_INSTALLED for name in VERSIONED_PACKAGES}


def module_source_digest(main_import: str) -> str:
    """``"sha256:<hex>"`` of the bytes of ``main_import``'s source file, found without importing
    the module itself (its parent packages are imported, as ``importlib.util.find_spec`` does).

    The current directory is searched too, as the worker does. Raises
    :class:`ConfigurationError` when the module or its source file cannot be found.
    """
    fix = (
        "make the module importable (run from the directory that holds it, or install it), "
        "or declare the code's version (--worker.version=V, or trainer.version in the experiment)"
    )
    try:
        spec = importlib.util.find_spec(main_import)
        if spec is None and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
            try:
                spec = importlib.util.find_spec(main_import)
            finally:
                sys.path.remove(os.getcwd())
    except (ImportError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot find the trainer module {main_import!r} ({type(exc).__name__}: {exc}): {fix}"
        ) from exc
    if spec is None:
        raise ConfigurationError(f"cannot find the trainer module {main_import!r}: {fix}")
    origin = spec.origin
    if not spec.has_location or origin is None or not os.path.isfile(origin):
        raise ConfigurationError(
            f"the trainer module {main_import!r} has no source file to hash (origin {origin!r}): "
            "declare the code's version (--worker.version=V, or trainer.version in the "
            "experiment)"
        )
    with open(origin, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


@dataclass(frozen=True)
class ConfigurationConflict:
    """Completed rows of a store written under another configuration than the one asked for.

    ``indices`` are the rows' model indices (int64, increasing); ``differences`` are
    :meth:`TrainingConfiguration.differences` from the stored configuration to the new one.
    """

    configuration_id: int
    configuration: TrainingConfiguration
    indices: tuple[int, ...]
    differences: tuple[str, ...]

    def describe(self) -> str:
        from dm_assets.store.store import ranges_text  # the store imports this module

        shown = ranges_text(self.indices, max_runs=8)
        changes = "\n".join(f"      {d}" for d in self.differences)
        return (
            f"{len(self.indices)} completed row(s) ({shown}) were trained under configuration "
            f"{self.configuration_id} ({self.configuration.fingerprint()[:12]}); what changed "
            f"since (old -> new):\n{changes}"
        )


class ConfigurationChangedError(DmError, RuntimeError):
    """A store holds completed rows of another configuration and the run was told to refuse.

    ``conflicts`` says which rows and what changed; ``remedies`` how to go on.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        conflicts: Sequence[ConfigurationConflict],
        remedies: Sequence[str],
    ) -> None:
        self.conflicts = list(conflicts)
        self.remedies = list(remedies)
        super().__init__([c.describe() for c in self.conflicts], source)

    def headline(self) -> str:
        return (
            f"the training configuration changed: the store at {self.source} holds completed "
            "rows trained under another configuration; nothing was trained"
        )

    def render(self) -> str:
        remedies = "\n".join(f"  - {r}" for r in self.remedies)
        return f"{super().render()}\nremedies:\n{remedies}"


def _short(item: str, value: str) -> str:
    # code digests are 64 hex characters; 8 are enough to tell two apart in a message
    if item == "code" and value.startswith("sha256:"):
        return value[: len("sha256:") + 8]
    return value


def _schema_entry(entry: object) -> str:
    if isinstance(entry, Mapping) and set(entry) == {"shape", "dtype"}:
        return f"shape {list(entry['shape'])} dtype {entry['dtype']}"
    return json.dumps(entry, sort_keys=True)


@dataclass(frozen=True)
class TrainingConfiguration:
    """Everything that decides a model's outputs (see the module's documentation).

    Two configurations are the same when their :meth:`fingerprint` is, that is when every field
    is equal.
    """

    schema: dict[str, Any]
    main_import: str
    args: dict[str, str] = field(default_factory=dict)
    code: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready data, keys sorted (as in ``configurations.json``)."""
        return {
            "schema": json.loads(json.dumps(self.schema, sort_keys=True)),
            "main_import": self.main_import,
            "args": dict(sorted(self.args.items())),
            "code": self.code,
            "versions": dict(sorted(self.versions.items())),
        }

    @classmethod
    def from_dict(cls, data: object) -> TrainingConfiguration:
        """A configuration from :meth:`to_dict`'s form; :class:`ConfigurationError` naming every
        problem otherwise."""
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"a configuration must be a JSON object; got {data!r}")
        problems = []
        missing = [f for f in _FIELDS if f not in data]
        if missing:
            problems.append(f"missing field(s) {missing}")
        unknown = sorted(set(map(str, data)) - set(_FIELDS))
        if unknown:
            problems.append(f"unknown field(s) {unknown}: a configuration has {list(_FIELDS)}")
        if not missing:
            if not isinstance(data["schema"], Mapping):
                problems.append(f"'schema' must be an object; got {data['schema']!r}")
            for name in ("main_import", "code"):
                if not isinstance(data[name], str):
                    problems.append(f"{name!r} must be a string; got {data[name]!r}")
            for name in ("args", "versions"):
                value = data[name]
                if not isinstance(value, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    problems.append(f"{name!r} must map strings to strings; got {value!r}")
        if problems:
            raise ConfigurationError(problems)
        return cls(
            schema=dict(data["schema"]),
            main_import=data["main_import"],
            args=dict(sorted(data["args"].items())),
            code=data["code"],
            versions=dict(sorted(data["versions"].items())),
        )

    def canonical_json(self) -> str:
        """The JSON whose sha256 is the fingerprint: keys sorted, no whitespace."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        """sha256 hex digest of :meth:`canonical_json`: 64 hex characters."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def differences(self, other: TrainingConfiguration) -> list[str]:
        """One line per item that differs, ``"item: old -> new"`` (``self`` is old).

        Items are ``schema.<key>``, ``main_import``, each argument by name (``digits.lr: 0.1 ->
        2.0``), ``code`` (a digest shortened to 8 hex characters) and each package version
        (``torch: 2.3.0 -> 2.4.0``); a missing item reads ``(absent)``.
        """
        lines: list[str] = []

        def compare(item: str, old: str | None, new: str | None) -> None:
            if old != new:
                a = _ABSENT if old is None else _short(item, old)
                b = _ABSENT if new is None else _short(item, new)
                lines.append(f"{item}: {a} -> {b}")

        for key in sorted(set(self.schema) | set(other.schema)):
            old = _schema_entry(self.schema[key]) if key in self.schema else None
            new = _schema_entry(other.schema[key]) if key in other.schema else None
            compare(f"schema.{key}", old, new)
        compare("main_import", self.main_import, other.main_import)
        for name in sorted(set(self.args) | set(other.args)):
            compare(name, self.args.get(name), other.args.get(name))
        compare("code", self.code, other.code)
        for name in sorted(set(self.versions) | set(other.versions)):
            compare(name, self.versions.get(name), other.versions.get(name))
        return lines


def configuration_for(
    schema: Mapping[str, Any],
    main_import: str,
    script_args: Sequence[str],
    *,
    version: str | None = None,
) -> TrainingConfiguration:
    """The configuration of a trainer run with these arguments, in this environment.

    Parameters
    ----------
    schema : mapping
        The store's schema as in ``spec.json`` (``Spec.to_dict()["schema"]``).
    main_import : str
        The trainer module whose ``main(index, logdir)`` trains one model.
    script_args : sequence of str
        The arguments passed through to the script (every one that is not ``--worker.*``);
        normalized with :func:`normalize_args`.
    version : str, optional
        The code's declared version. When given, ``code`` is ``"version:<version>"`` and the
        module's source is not read; else ``code`` is the sha256 of the module's source file,
        found with ``importlib.util.find_spec`` without importing the module.

    Raises :class:`ConfigurationError` when ``version`` is empty or the module's source cannot
    be found.
    """
    if version is not None:
        if not isinstance(version, str) or not version.strip():
            raise ConfigurationError(
                f"the trainer's version must be a non-empty string; got {version!r}: "
                "set it to a tag or commit of your training code, or leave it out"
            )
        code = f"version:{version}"
    else:
        code = module_source_digest(main_import)
    return TrainingConfiguration(
        schema=json.loads(json.dumps(dict(schema), sort_keys=True)),
        main_import=main_import,
        args=normalize_args(script_args),
        code=code,
        versions=installed_versions(),
    )


def find_configuration_conflicts(
    store: Store, config: TrainingConfiguration
) -> list[ConfigurationConflict]:
    """Completed rows of ``store`` written under another known configuration than ``config``,
    one conflict per configuration (by id); empty when the store records none. Rows of unknown
    configuration (-1) are no conflict: nothing says they differ."""
    recorded = store.configurations()
    if not recorded:
        return []
    fingerprint = config.fingerprint()
    completed = store.completed_indices()
    ids = store.configuration_ids(completed)
    conflicts = []
    for cid, stored in recorded.items():
        if stored.fingerprint() == fingerprint:
            continue
        rows = completed[ids == cid]
        if rows.size:
            conflicts.append(
                ConfigurationConflict(
                    configuration_id=cid,
                    configuration=stored,
                    indices=tuple(int(i) for i in rows),
                    differences=tuple(stored.differences(config)),
                )
            )
    return conflicts


def rows_to_retrain(
    store: Store, indices: Sequence[int], config: TrainingConfiguration
) -> list[int]:
    """The completed ``indices`` whose row was written under another configuration than
    ``config`` (unknown, -1, included), in the given order."""
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.size == 0:
        return []
    mine = store.configuration_id(config)
    other = store.configuration_ids(idx) != mine if mine is not None else np.ones(idx.size, bool)
    return [int(i) for i in idx[store.completed_mask()[idx] & other]]


__all__ = [
    "UNKNOWN_CONFIGURATION",
    "ConfigurationChangedError",
    "ConfigurationConflict",
    "ConfigurationError",
    "TrainingConfiguration",
    "configuration_for",
    "find_configuration_conflicts",
    "installed_versions",
    "module_source_digest",
    "normalize_args",
    "rows_to_retrain",
]
