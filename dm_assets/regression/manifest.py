"""What a fit was made from: the fit folder's ``manifest.json`` (:class:`FitManifest`), built
while the fit is written (:func:`build_manifest`) and checked against the store when the fit is
evaluated (:func:`rows_digest_of_store`).

``manifest.json`` is one JSON object (``format`` 1):

=========================== =====================================================================
``format``                  int, 1
``created``                 ISO 8601 UTC time the manifest was built
``train_indices``           list of int: the model indices of the rows that fitted the weights
                            (the dataset's ``idx`` field at positions ``[0, num_train)``)
``val_indices``             list of int: those that chose each target's lambda (positions
                            ``[num_train, num_train + num_val)``); with ``cfg.refit`` the final
                            weights are refitted on train and validation rows together
``dataset``                 ``path`` (absolute), ``bytes``, ``rows``, ``n_features``,
                            ``n_targets``, ``digest`` (``sha256:<hex>`` of every byte of the
                            file: one streamed read, cheaper than any fit, which reads the file
                            several times) and ``digest_covers``
``store``                   ``path`` (absolute), ``x_name``, ``y_name``: the store the dataset
                            was written from; null when the fit was not told (the seed's
                            ``compute_datamodels`` command)
``rows``                    ``digest`` (``sha256:<hex>``, :func:`rows_digest`: the model indices,
                            the masks as uint8 and all the outputs as float32 of the train then
                            validation rows, in that order), ``covers``, ``source`` (``store``:
                            computed from the store's rows at fit time; ``dataset``: from the
                            dataset's rows, when no store was given), ``count``
``configurations``          ``{"<id>": {"fingerprint": hex, "configuration": {...}}}``: the
                            training configurations (:mod:`dm_assets.training.configuration`) of
                            the rows used, as the store recorded them
``configuration_ids``       ``runs``: ``[[id, count], ...]`` the rows' configuration ids in the
                            order train then validation, run-length encoded (-1: unknown);
                            ``counts`` ``{"<id>": count}``; ``unknown``: rows of unknown
                            configuration; ``mixed``: true when the rows come from more than one
                            configuration or any is unknown
``regression``              the resolved regression configuration (``data``, ``cfg``,
                            ``early_stopping``), as ``config.yaml``
``targets``                 ``[start, end)``: the dataset's target columns fitted
``code``                    ``dm_assets`` version, ``git_commit`` and ``git_dirty`` (null where
                            the package is not in a git checkout or git is missing)
``versions``                ``python``, ``torch``, ``numpy``, ``dagster``, ``mlflow``, ``ffcv``
                            of the fitting process (null when not installed)
``dagster_run_id``          the Dagster run that made the fit, or null
``mlflow_run_id``           the MLflow run that logged it, or null (recorded once known)
``slices``                  merged fits only: per slice fit ``fit_dir``, ``targets``,
                            ``dagster_run_id``, ``mlflow_run_id``
=========================== =====================================================================

The science layer: no dagster, no mlflow (their versions are read from the installed
distributions' metadata, without importing them).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import platform
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dm_assets.errors import DmError
from dm_assets.training.configuration import UNKNOWN_CONFIGURATION, distribution_version

if TYPE_CHECKING:
    from dm_assets.regression.config import RegressionConfig
    from dm_assets.store.store import Store

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
DATASET_DIGEST_COVERS = "sha256 of every byte of the dataset file"
ROWS_DIGEST_COVERS = (
    "sha256 of the train then validation rows: their model indices (int64), masks (uint8) and "
    "every output (float32), in that order"
)
_VERSIONED = ("torch", "numpy", "dagster", "mlflow", "ffcv")
_ROWS_PER_CHUNK = 4096  # rows hashed at a time: bounded memory on large stores
_GIT_TIMEOUT_S = 5.0


class ManifestError(DmError, ValueError):
    """A ``manifest.json`` that cannot be read or built, or manifests that disagree."""


@dataclass(frozen=True)
class FitManifest:
    """A fit's ``manifest.json`` (see the module docstring for each field).

    ``train_indices``, ``val_indices``: int64 ``(num_train,)``, ``(num_val,)`` model indices;
    ``configurations``: configuration id -> ``{"fingerprint", "configuration"}``; the other
    fields are the JSON values as written.
    """

    train_indices: np.ndarray
    val_indices: np.ndarray
    dataset: dict[str, Any]
    rows: dict[str, Any]
    regression: dict[str, Any]
    targets: tuple[int, int]
    store: dict[str, Any] | None = None
    configurations: dict[int, dict[str, Any]] = field(default_factory=dict)
    configuration_ids: dict[str, Any] = field(default_factory=dict)
    code: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    dagster_run_id: str | None = None
    mlflow_run_id: str | None = None
    created: str = ""
    slices: list[dict[str, Any]] | None = None

    @property
    def fitted_indices(self) -> np.ndarray:
        """int64 ``(num_train + num_val,)``: train then validation model indices, every model
        the fit saw."""
        return np.concatenate([self.train_indices, self.val_indices])

    @property
    def mixed(self) -> bool:
        """Whether the rows used come from more than one configuration, or any is unknown."""
        return bool(self.configuration_ids.get("mixed", True))

    def row_configuration_ids(self) -> np.ndarray:
        """int32 ``(num_train + num_val,)``: each used row's configuration id at fit time
        (train then validation order; -1 unknown)."""
        runs = self.configuration_ids.get("runs") or [
            [UNKNOWN_CONFIGURATION, len(self.fitted_indices)]
        ]
        return np.concatenate(
            [np.full(int(n), int(i), dtype=np.int32) for i, n in runs] or [np.zeros(0, np.int32)]
        )

    def with_runs(
        self, *, dagster_run_id: str | None = None, mlflow_run_id: str | None = None
    ) -> FitManifest:
        """This manifest with the given run ids set (None: kept as it is)."""
        return replace(
            self,
            dagster_run_id=self.dagster_run_id if dagster_run_id is None else dagster_run_id,
            mlflow_run_id=self.mlflow_run_id if mlflow_run_id is None else mlflow_run_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds."""
        out: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "created": self.created,
            "train_indices": [int(i) for i in self.train_indices],
            "val_indices": [int(i) for i in self.val_indices],
            "dataset": self.dataset,
            "store": self.store,
            "rows": self.rows,
            "configurations": {str(k): v for k, v in sorted(self.configurations.items())},
            "configuration_ids": self.configuration_ids,
            "regression": self.regression,
            "targets": list(self.targets),
            "code": self.code,
            "versions": self.versions,
            "dagster_run_id": self.dagster_run_id,
            "mlflow_run_id": self.mlflow_run_id,
        }
        if self.slices is not None:
            out["slices"] = self.slices
        return out

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], source: str | Path | None = None) -> FitManifest:
        """The manifest of the JSON object ``value``; :class:`ManifestError` names what is
        missing or of a newer format."""
        problems = []
        fmt = value.get("format")
        if fmt != MANIFEST_FORMAT:
            problems.append(
                f"format {fmt!r}: this dm_assets reads manifest format {MANIFEST_FORMAT}; "
                "upgrade dm_assets or refit"
            )
        required = ("train_indices", "val_indices", "dataset", "rows", "regression", "targets")
        missing = [key for key in required if key not in value]
        if missing:
            problems.append(f"lacks {missing}: rewrite it by refitting")
        if problems:
            raise ManifestError(problems, source)
        start, end = value["targets"]
        return cls(
            train_indices=np.asarray(value["train_indices"], dtype=np.int64),
            val_indices=np.asarray(value["val_indices"], dtype=np.int64),
            dataset=dict(value["dataset"]),
            rows=dict(value["rows"]),
            regression=dict(value["regression"]),
            targets=(int(start), int(end)),
            store=None if value.get("store") is None else dict(value["store"]),
            configurations={
                int(k): dict(v) for k, v in (value.get("configurations") or {}).items()
            },
            configuration_ids=dict(value.get("configuration_ids") or {}),
            code=dict(value.get("code") or {}),
            versions=dict(value.get("versions") or {}),
            dagster_run_id=value.get("dagster_run_id"),
            mlflow_run_id=value.get("mlflow_run_id"),
            created=str(value.get("created", "")),
            slices=None if value.get("slices") is None else list(value["slices"]),
        )


def file_digest(path: str | Path, chunk_bytes: int = 1 << 23) -> str:
    """``sha256:<hex>`` of every byte of the file at ``path`` (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


class _RowsHasher:
    """:func:`rows_digest` fed in chunks of rows, in order (the result does not depend on how
    the rows are chunked)."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = np.ascontiguousarray(indices, dtype="<i8")
        self.masks = hashlib.sha256()
        self.outputs = hashlib.sha256()
        self.seen = 0

    def update(self, masks: np.ndarray, outputs: np.ndarray) -> None:
        n = len(masks)
        self.masks.update(np.ascontiguousarray(np.asarray(masks).reshape(n, -1), np.uint8).data)
        self.outputs.update(
            np.ascontiguousarray(np.asarray(outputs).reshape(n, -1), dtype="<f4").data
        )
        self.seen += n

    def hexdigest(self) -> str:
        if self.seen != len(self.indices):
            raise RuntimeError(f"hashed {self.seen} rows of {len(self.indices)}")
        h = hashlib.sha256(b"dm_assets rows v1\0")
        h.update(hashlib.sha256(self.indices.data).digest())
        h.update(self.masks.digest())
        h.update(self.outputs.digest())
        return f"sha256:{h.hexdigest()}"


def rows_digest(indices: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> str:
    """``sha256:<hex>`` of rows: ``indices`` int ``(n,)`` model indices, ``masks`` ``(n, p)``
    0/1 values (hashed as uint8), ``outputs`` ``(n, ...)`` real values (hashed as float32, as
    the dataset holds them), in the given order."""
    hasher = _RowsHasher(indices)
    hasher.update(masks, outputs)
    return hasher.hexdigest()


def rows_digest_of_store(store: Store, indices: np.ndarray, *, x_name: str, y_name: str) -> str:
    """:func:`rows_digest` of the store's rows ``indices`` (in that order), read in chunks."""
    indices = np.asarray(indices, dtype=np.int64)
    hasher = _RowsHasher(indices)
    x, y = store.read(x_name), store.read(y_name)
    for start in range(0, len(indices), _ROWS_PER_CHUNK):
        part = indices[start : start + _ROWS_PER_CHUNK]
        hasher.update(np.asarray(x[part]), np.asarray(y[part]))
    return hasher.hexdigest()


def _rows_digest_of_dataset(path: Path, positions: np.ndarray, indices: np.ndarray) -> str:
    import torch

    from dm_assets.regression.beton_reader import BetonSource

    hasher = _RowsHasher(indices)
    source = BetonSource(path, num_workers=1)
    batch = int(min(_ROWS_PER_CHUNK, max(1, len(positions))))
    for x, y, _ in source.batches(positions, batch, device=torch.device("cpu")):
        hasher.update(x.numpy(), y.numpy())
    return hasher.hexdigest()


def _run_length(ids: Iterable[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][0] == int(i):
            runs[-1][1] += 1
        else:
            runs.append([int(i), 1])
    return runs


def configuration_summary(ids: np.ndarray) -> dict[str, Any]:
    """``configuration_ids`` of the manifest for the used rows' ids int ``(n,)`` (-1 unknown)."""
    ids = np.asarray(ids, dtype=np.int64)
    values, counts = np.unique(ids, return_counts=True)
    unknown = int((ids == UNKNOWN_CONFIGURATION).sum())
    return {
        "runs": _run_length(ids.tolist()),
        "counts": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        "unknown": unknown,
        "mixed": bool(len(values) > 1 or unknown > 0),
    }


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "-C", str(here), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.cache
def code_versions() -> dict[str, Any]:
    """``code`` of the manifest: the ``dm_assets`` version and, where the package sits in a git
    checkout, its commit and whether tracked files differ from it (never fails without git)."""
    import dm_assets

    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"dm_assets": dm_assets.__version__, "git_commit": commit, "git_dirty": dirty}


@functools.cache
def library_versions() -> dict[str, str | None]:
    """``versions`` of the manifest: Python and the installed distributions that touch a fit."""
    return {
        "python": platform.python_version(),
        **{name: distribution_version(name) for name in _VERSIONED},
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def build_manifest(
    config: RegressionConfig,
    *,
    store: str | Path | None = None,
    x_name: str | None = None,
    y_name: str | None = None,
    dagster_run_id: str | None = None,
) -> FitManifest:
    """The manifest of a fit of ``config`` (its dataset ``data.data_path``, its split
    ``data.num_train`` / ``data.num_val``), built from the dataset and, when ``store`` is
    given, the store's rows and configurations.

    Parameters
    ----------
    config
        The fit's resolved configuration.
    store
        The store the dataset was written from; with it, the rows' digest is computed from the
        store (a memory-mapped read) and the rows' configuration ids and configurations are
        recorded; without it (the seed's command line), the digest is computed from the
        dataset's rows and the configurations are unknown.
    x_name, y_name
        The store keys of the masks and the outputs (required with ``store``).
    dagster_run_id
        The Dagster run that fits, if any.

    Raises
    ------
    ManifestError
        ``store`` without ``x_name`` and ``y_name``, or dataset rows that are not completed
        models of ``store`` (a dataset written from another store).
    """
    from dm_assets.regression.beton_reader import beton_info

    data = config["data"]
    dataset = Path(data["data_path"]).resolve()
    info = beton_info(dataset)
    num_train, num_val = int(data["num_train"]), int(data["num_val"])
    indices = info.model_indices
    train, val = indices[:num_train], indices[num_train : num_train + num_val]
    used = np.concatenate([train, val])
    end = int(data["target_end_ind"])
    targets = (int(data["target_start_ind"]), info.n_targets if end == -1 else end)
    ids = np.full(len(used), UNKNOWN_CONFIGURATION, dtype=np.int64)
    configurations: dict[int, dict[str, Any]] = {}
    store_record = None
    if store is not None:
        if x_name is None or y_name is None:
            raise ManifestError("store given without x_name and y_name: pass the store keys")
        from dm_assets.store.store import Store

        store_path = Path(store).resolve()
        store_record = {"path": str(store_path), "x_name": x_name, "y_name": y_name}
        with Store.open(store_path) as opened:
            not_done = used[~opened.completed_mask()[used]]
            if len(not_done):
                raise ManifestError(
                    f"the dataset {dataset} holds models {not_done[:10].tolist()} that are not "
                    f"completed in the store {store_path}: it was written from another store; "
                    "write the dataset again from this store",
                    source=dataset,
                )
            digest = rows_digest_of_store(opened, used, x_name=x_name, y_name=y_name)
            ids = np.asarray(opened.configuration_ids(used), dtype=np.int64)
            known = opened.configurations()
            for i in sorted({int(i) for i in ids if i != UNKNOWN_CONFIGURATION}):
                configurations[i] = {
                    "fingerprint": known[i].fingerprint(),
                    "configuration": known[i].to_dict(),
                }
        source = "store"
    else:
        digest = _rows_digest_of_dataset(dataset, np.arange(len(used)), used)
        source = "dataset"
    return FitManifest(
        train_indices=train.astype(np.int64),
        val_indices=val.astype(np.int64),
        dataset={
            "path": str(dataset),
            "bytes": dataset.stat().st_size,
            "rows": info.n_rows,
            "n_features": info.n_features,
            "n_targets": info.n_targets,
            "digest": file_digest(dataset),
            "digest_covers": DATASET_DIGEST_COVERS,
        },
        store=store_record,
        rows={"digest": digest, "covers": ROWS_DIGEST_COVERS, "source": source, "count": len(used)},
        configurations=configurations,
        configuration_ids=configuration_summary(ids),
        regression=config.to_dict(),
        targets=targets,
        code=code_versions(),
        versions=library_versions(),
        dagster_run_id=dagster_run_id,
        created=_now(),
    )


# fields every slice of one merged fit shares (the slices were fitted on the same rows)
_SHARED = ("dataset", "store", "rows", "configurations", "configuration_ids")


def merged_manifest(
    slices: list[tuple[Path, FitManifest]],
    *,
    regression: dict[str, Any],
    dagster_run_id: str | None = None,
) -> FitManifest:
    """The manifest of the merge of slice fits ``(fit_dir, manifest)`` (in target order): the
    slices' shared fields, ``regression`` (the merged config), the union of their targets and
    ``slices``. Raises :class:`ManifestError` listing every disagreement (the slices were
    fitted on different models or datasets: refit the older ones)."""
    first_dir, first = slices[0]
    problems = []
    for fit_dir, m in slices[1:]:
        for name, a, b in (
            ("train_indices", first.train_indices, m.train_indices),
            ("val_indices", first.val_indices, m.val_indices),
        ):
            if not np.array_equal(a, b):
                problems.append(
                    f"{name} of {fit_dir} differ from those of {first_dir}: the slices were "
                    "fitted on different models; refit the older slices on the current dataset"
                )
        for key in _SHARED:
            mine, theirs = getattr(first, key), getattr(m, key)
            if key == "dataset":  # the path may be reached through another link
                mine = {k: v for k, v in mine.items() if k != "path"}
                theirs = {k: v for k, v in theirs.items() if k != "path"}
            if mine != theirs:
                problems.append(
                    f"manifest {key} of {fit_dir} differs from that of {first_dir}: the slices "
                    "were fitted on different data; refit the older slices on the current dataset"
                )
    if problems:
        raise ManifestError(problems)
    return replace(
        first,
        regression=regression,
        targets=(slices[0][1].targets[0], slices[-1][1].targets[1]),
        code=code_versions(),
        versions=library_versions(),
        dagster_run_id=dagster_run_id,
        mlflow_run_id=None,
        created=_now(),
        slices=[
            {
                "fit_dir": str(fit_dir),
                "targets": list(m.targets),
                "created": m.created,
                "code": m.code,
                "dagster_run_id": m.dagster_run_id,
                "mlflow_run_id": m.mlflow_run_id,
            }
            for fit_dir, m in slices
        ],
    )
