"""Dagster's own versioning of an experiment's assets: code versions and data versions.

Code versions (``code_version=`` on each asset, computed when the definitions load, cheaply):

- ``store``: a hash of the spec (schema and ``num_models``: raising ``num_models`` makes the
  store stale until it is materialized again, which grows it);
- ``model_outputs``: the fingerprint of the experiment's training configuration
  (:func:`~dm_assets.training.configuration.configuration_for`: the spec's schema, the trainer
  module, its normalized arguments, a hash of the module's source file found without importing
  it, or ``trainer.version``, and the versions of dm_assets, torch and numpy);
- ``regression_dataset``, ``datamodel_slices``, ``datamodels``, ``datamodel_eval``: a hash of
  the settings each reads (:func:`settings_version`).

Data versions (``data_version=`` on each materialization; Dagster compares them with what a
downstream asset was made from and marks it stale, "unsynced", when they differ):

- ``store``: a hash of the schema (growing keeps it, so trained partitions stay fresh);
- ``model_outputs``: a hash of the run's indices, their completion flags and configuration ids
  (:func:`rows_data_version`: a few bytes per model, never the rows themselves); a run over a
  range of partitions gives each the version of the whole range (Dagster records one data
  version per materialization event of a run);
- ``regression_dataset``: a hash of the model indices in the dataset, their configuration ids
  and the store keys written;
- ``datamodel_slices``, ``datamodels``, ``datamodel_eval``: derived from their code version and
  the data versions of their inputs as Dagster recorded them (:func:`derived_data_version`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import dagster as dg
import numpy as np

from dm_assets.pipeline.experiment import Experiment
from dm_assets.training.configuration import (
    ConfigurationError,
    TrainingConfiguration,
    configuration_for,
)

logger = logging.getLogger(__name__)

# the tag under which Dagster records a materialization's data version
DATA_VERSION_TAG = "dagster/data_version"
# hex characters kept of a sha256 in a code or data version: plenty to tell versions apart
_DIGITS = 24


def digest(*parts: Any) -> str:
    """A short sha256 hex digest of JSON-ready ``parts`` (canonical JSON, keys sorted)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:_DIGITS]


def settings_version(kind: str, *settings: Any) -> str:
    """The code version of an asset that reads ``settings`` (pydantic models, dicts, lists):
    ``<kind>-<digest>``."""
    dumped = [s.model_dump(mode="json") if hasattr(s, "model_dump") else s for s in settings]
    return f"{kind}-{digest(*dumped)}"


def store_code_version(experiment: Experiment) -> str:
    """The store's code version: a hash of the spec, ``num_models`` included."""
    return settings_version("spec", experiment.spec.to_dict())


def store_data_version(experiment: Experiment) -> dg.DataVersion:
    """The store's data version: a hash of the schema only (a grown store keeps its rows)."""
    return dg.DataVersion(f"schema-{digest(experiment.spec.to_dict()['schema'])}")


def training_configuration(experiment: Experiment) -> TrainingConfiguration:
    """The experiment's training configuration, as its workers compute theirs. Raises
    :class:`~dm_assets.training.configuration.ConfigurationError` when the trainer module's
    source cannot be found and no ``trainer.version`` is declared."""
    trainer = experiment.trainer
    return configuration_for(
        experiment.spec.to_dict()["schema"],
        trainer.main_import,
        trainer.script_args(),
        version=trainer.version,
    )


def outputs_code_version(experiment: Experiment) -> str | None:
    """``model_outputs``' code version: the training configuration's fingerprint; None (Dagster
    then versions by run) when it cannot be computed here, which is logged: the run says why."""
    try:
        return training_configuration(experiment).fingerprint()
    except ConfigurationError as exc:
        logger.warning("experiment %r: no code version for model_outputs: %s", experiment.name, exc)
        return None


def rows_data_version(
    indices: Sequence[int] | np.ndarray, completed: np.ndarray, ids: np.ndarray
) -> str:
    """The data version of a block of rows: a hash of ``indices`` (int ``(n,)``), their
    completion flags ``completed`` (bool ``(n,)``) and configuration ids ``ids`` (int ``(n,)``).
    """
    h = hashlib.sha256()
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    h.update(np.asarray(completed, dtype=np.bool_).tobytes())
    h.update(np.asarray(ids, dtype=np.int32).tobytes())
    return f"rows-{h.hexdigest()[:_DIGITS]}"


def recorded_data_version(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None
) -> str | None:
    """The data version Dagster recorded with the latest materialization of ``key`` (of its
    ``partition``), or None when there is none."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    materialization = records[0].asset_materialization if records else None
    if materialization is None:
        return None
    return (materialization.tags or {}).get(DATA_VERSION_TAG)


def derived_data_version(code_version: str, inputs: dict[str, str | None]) -> dg.DataVersion:
    """A data version derived from an asset's ``code_version`` and its inputs' data versions
    (``{input: version}``; None for an input Dagster has no version of)."""
    return dg.DataVersion(f"derived-{digest(code_version, inputs)}")


def configuration_counts(ids: np.ndarray) -> dict[int, int]:
    """``{configuration id: rows}`` of ``ids`` (int ``(n,)``; -1: unknown), by id."""
    values, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def describe_counts(counts: dict[int, int]) -> str:
    """``"0: 20 models, 1: 10 models"`` (id -1 reads ``unknown``); ``"none"`` when empty."""
    if not counts:
        return "none"
    return ", ".join(
        f"{'unknown' if i < 0 else i}: {n} model{'s' if n != 1 else ''}"
        for i, n in sorted(counts.items())
    )


__all__ = [
    "DATA_VERSION_TAG",
    "configuration_counts",
    "derived_data_version",
    "describe_counts",
    "digest",
    "outputs_code_version",
    "recorded_data_version",
    "rows_data_version",
    "settings_version",
    "store_code_version",
    "store_data_version",
    "training_configuration",
]
