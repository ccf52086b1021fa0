"""A fit folder: the one reader and writer of the files a regression fit leaves on disk.

:meth:`FitFolder.write` writes the four fit files (:data:`FIT_FILES`) under a temporary name
and renames the folder when all are complete, so a fit folder is either whole or absent:

=============================== ===============================================================
``datamodels.pt``               ``torch.save`` dict of CPU tensors: ``weight`` float32
                                ``(n_features, n_targets)``, ``bias`` float32 ``(n_targets,)``,
                                ``lam`` ``(n_targets,)`` (the chosen lambda; the seed's three),
                                ``mean``, ``std`` float32 ``(n_features,)`` (the training models'
                                column statistics) and ``lam_max`` ``(n_targets,)``:
                                ``((x - mean) / std) @ weight + bias`` predicts
``regularization_path.csv``     one row per (target, lambda step) reached: ``target`` int (the
                                column in the dataset), ``step`` int, ``lambda``,
                                ``lambda_over_max``, ``train_mse``, ``val_mse`` float,
                                ``nonzeros`` int, ``chosen`` int (1 at the selected lambda)
``summary.json``                JSON object: ``solver``, ``device`` str; ``seconds`` float;
                                ``n_train``, ``n_val``, ``n_models_in_dataset``, ``n_features``,
                                ``n_targets``, ``target_start_ind`` int; ``mean_lambda_over_max``,
                                ``mean_nonzeros``, ``mean_val_r2``, ``mean_val_mse`` float;
                                ``refit`` bool (merged fits add ``slices``)
``config.yaml``                 the resolved regression configuration: sections ``data``,
                                ``cfg``, ``early_stopping`` of ``key: value``
=============================== ===============================================================

Once the fit is evaluated on held-out models, :meth:`FitFolder.write_evaluation` and the
evaluation's figures add :data:`EVALUATION_FILES` beside them (each file replaced atomically):

=============================== ===============================================================
``evaluation.json``             JSON object: ``held_out_models``, ``targets`` int; ``lds``,
                                ``pearson``, ``r2`` float; ``noise_ceiling`` float or null;
                                ``curve``: list of ``{n_train, n_models_used, lds, pearson, r2}``;
                                ``held_out_indices``: list of int, the models scored (read
                                from the manifest: completed, neither trained nor validated
                                on); ``excluded_same_mask``: list of int, completed models left
                                out because their mask equals a fitted model's;
                                ``rows_digest``, ``dataset_digest`` of the manifest checked;
                                ``evaluated``: ISO time (fits made before the manifest lack
                                the last five)
``evaluation_per_target.csv``   one row per target: ``target`` int, ``lds``, ``pearson``,
                                ``r2`` float (NaN for a constant target)
``lds_curve.png``               LDS against the number of models used in the fit
``predicted_vs_actual.png``     predicted against actual outputs on held-out models
=============================== ===============================================================

The lineage of the fit, written in the same temporary folder as the fit files (so it is there
exactly when they are), is :data:`MANIFEST_FILE`:

=============================== ===============================================================
``manifest.json``               JSON object: the exact model indices that fitted
                                (``train_indices``) and chose lambda (``val_indices``), the
                                dataset (path, bytes, sha256, rows), a digest of the rows used,
                                their training configurations, the regression settings, code
                                and library versions, the Dagster and MLflow run ids (every
                                field: :mod:`dm_assets.regression.manifest`)
=============================== ===============================================================

It is optional on :meth:`FitFolder.open` (folders written before it existed lack it);
:meth:`FitFolder.manifest` says so clearly. Its run ids are recorded once known
(:meth:`FitFolder.record_runs`, an atomic rewrite).

Every file has one writer and one reader in the ``_FIT_CODECS`` / ``_EVALUATION_CODECS`` tables
below; a file added later is optional on :meth:`FitFolder.open`, since older folders lack it.

The science layer: no dagster, no mlflow. torch is imported only when weights are read or
written, so opening a folder and reading its tables stays cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dm_assets.errors import DmError
from dm_assets.regression.manifest import FitManifest

if TYPE_CHECKING:
    import pandas as pd


def _save_weights(path: Path, weights: dict[str, Any]) -> None:
    import torch

    torch.save(weights, path)


def _save_table(path: Path, table: pd.DataFrame) -> None:
    table.to_csv(path, index=False)


def _save_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _save_yaml(path: Path, value: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(value, sort_keys=False))


# file name -> writer, in the order written; FIT_FILES follows it
_FIT_CODECS: dict[str, Callable[[Path, Any], None]] = {
    "datamodels.pt": _save_weights,
    "regularization_path.csv": _save_table,
    "summary.json": _save_json,
    "config.yaml": _save_yaml,
}
_EVALUATION_CODECS: dict[str, Callable[[Path, Any], None]] = {
    "evaluation.json": _save_json,
    "evaluation_per_target.csv": _save_table,
}

FIT_FILES: tuple[str, ...] = tuple(_FIT_CODECS)
"""The files :meth:`FitFolder.write` writes (``write_outputs``' output), all required."""
EVALUATION_FILES: tuple[str, ...] = (
    *_EVALUATION_CODECS,
    "lds_curve.png",
    "predicted_vs_actual.png",
)
"""The files an evaluation adds beside a fit (the two figures are drawn by the evaluation
itself, into :meth:`FitFolder.file`)."""
ATTRIBUTION_FILES: tuple[str, ...] = ("attributions.json", "lds_vs_compute.png")
"""The files ``<name>/attributions`` adds beside an evaluated fit (with one
``scores_<method>.npy`` per baseline method: :func:`attribution_scores_file`)."""
MANIFEST_FILE = "manifest.json"
"""The fit's lineage (see the module docstring); absent in folders written before it existed."""


_SCORES_FILE = re.compile(r"scores_[a-z0-9_]+\.npy")


def attribution_scores_file(method: str) -> str:
    """The fit folder file holding a baseline method's score matrix, float32 ``(p, t)``."""
    name = f"scores_{method}.npy"
    if not _SCORES_FILE.fullmatch(name):
        raise ValueError(f"method={method!r}: use lowercase letters, digits and _")
    return name


class FitFolderError(DmError, FileNotFoundError):
    """A path that is not a complete fit folder: not a directory, or lacking fit files."""


class FitFileError(DmError, ValueError):
    """A fit folder's file that does not hold what ``write_outputs`` writes."""


class ManifestMissingError(FitFolderError):
    """A fit folder without ``manifest.json``: written before fits recorded their lineage."""


def _write_atomically(target: Path, save: Callable[[Path, Any], None], value: Any) -> None:
    """``save`` ``value`` to a temporary sibling of ``target``, then rename it over ``target``
    (readers see the old file or the new one, never a partial one)."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save(tmp, value)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class FitFolder:
    """A complete fit folder (see the module docstring for its files).

    ``path``: the folder, absolute with links resolved when opened (so a folder opened through
    the experiment's ``datamodels`` link keeps reading that fit if the link moves on).
    """

    path: Path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FitFolder:
        """The fit folder at ``path`` (links are followed).

        Raises
        ------
        FitFolderError
            ``path`` is not a directory, or lacks some of :data:`FIT_FILES`; the message names
            the folder, the missing files and the fix.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FitFolderError(
                f"fit_dir={folder} is not a directory: pass the out_dir that write_outputs wrote",
                source=folder,
            )
        folder = folder.resolve()
        missing = [name for name in FIT_FILES if not (folder / name).is_file()]
        if missing:
            raise FitFolderError(
                f"fit_dir={folder} lacks {missing} (a fit directory holds {list(FIT_FILES)}): "
                f"pass a complete directory written by write_outputs, or rerun the fit",
                source=folder,
            )
        return cls(folder)

    @classmethod
    def write(
        cls,
        path: str | os.PathLike[str],
        *,
        weights: dict[str, Any],
        path_table: pd.DataFrame,
        summary: dict[str, Any],
        config: dict[str, Any],
        manifest: FitManifest | None = None,
    ) -> FitFolder:
        """Write a new fit folder at ``path``: the files are written into a temporary sibling
        folder, which is renamed to ``path`` when all are complete (after a failure nothing is
        left behind).

        Parameters
        ----------
        path
            The folder to create; must not exist (nothing is overwritten). Its parent is
            created if missing.
        weights
            ``datamodels.pt``: ``weight``, ``bias``, ``lam``, ``lam_max``, ``mean``, ``std``
            tensors (see the module docstring).
        path_table
            ``regularization_path.csv``: one row per (target, lambda step).
        summary
            ``summary.json``: a JSON-serializable mapping.
        config
            ``config.yaml``: the resolved configuration's sections.
        manifest
            ``manifest.json``: the fit's lineage, written with the other files (None: none,
            for fits of arrays in memory that no dataset or store describes).

        Raises
        ------
        FileExistsError
            ``path`` exists.
        """
        out_dir = Path(path)
        if out_dir.exists():
            raise FileExistsError(
                f"cfg.out_dir={out_dir} already exists; choose a new directory "
                "(nothing is overwritten)"
            )
        contents: dict[str, Any] = {
            "datamodels.pt": weights,
            "regularization_path.csv": path_table,
            "summary.json": summary,
            "config.yaml": config,
        }
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            for name, save in _FIT_CODECS.items():
                save(tmp / name, contents[name])
            if manifest is not None:
                _save_json(tmp / MANIFEST_FILE, manifest.to_dict())
            os.rename(tmp, out_dir)  # fails rather than replace a directory made meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(out_dir)

    def file(self, name: str) -> Path:
        """The path of the folder's file ``name``, one of :data:`FIT_FILES`,
        :data:`EVALUATION_FILES` or :data:`MANIFEST_FILE` (an evaluation file or the manifest
        may not exist)."""
        known = [*FIT_FILES, *EVALUATION_FILES, *ATTRIBUTION_FILES, MANIFEST_FILE]
        if name not in known and not _SCORES_FILE.fullmatch(name):
            raise ValueError(f"name={name!r} is not a fit folder file: use one of {known}")
        return self.path / name

    def weights(self, map_location: Any = "cpu") -> dict[str, Any]:
        """``datamodels.pt``: the weight tensors (see the module docstring), on
        ``map_location``."""
        import torch

        weights = torch.load(self.file("datamodels.pt"), map_location=map_location)
        if not isinstance(weights, dict):
            raise FitFileError(
                f"{self.file('datamodels.pt')} holds {type(weights).__name__}, not a dict of "
                "tensors: rewrite the fit directory with write_outputs",
                source=self.path,
            )
        return weights

    def path_table(self) -> pd.DataFrame:
        """``regularization_path.csv``: one row per (target, lambda step) reached."""
        import pandas as pd

        return pd.read_csv(self.file("regularization_path.csv"))

    def summary(self) -> dict[str, Any]:
        """``summary.json``: the fit's counts, means, solver and timing."""
        return self._mapping("summary.json", json.loads, "a JSON object")

    def config(self) -> dict[str, Any]:
        """``config.yaml``: the resolved configuration, by section."""
        return self._mapping(
            "config.yaml", yaml.safe_load, "the config's sections (data, cfg, early_stopping)"
        )

    def has_manifest(self) -> bool:
        """Whether the folder holds ``manifest.json`` (folders written before it do not)."""
        return self.file(MANIFEST_FILE).is_file()

    def manifest(self) -> FitManifest:
        """``manifest.json``: the models, dataset, configurations and code the fit came from.

        Raises
        ------
        ManifestMissingError
            The folder was written before fits recorded their lineage: which models it was
            fitted on is unknown; the message says so and how to get a fit that records it.
        ManifestError
            The file is not a manifest this version reads.
        """
        if not self.has_manifest():
            raise ManifestMissingError(
                f"{self.path} has no {MANIFEST_FILE}: it was written before fits recorded "
                "their lineage, so the models it was fitted on (and therefore which models "
                "are held out) are unknown; refit to get a fit that records them "
                "(materialize <experiment>/datamodels, or run python -m "
                "dm_assets.regression.compute_datamodels again)",
                source=self.path,
            )
        return FitManifest.from_dict(
            self._mapping(MANIFEST_FILE, json.loads, "a JSON object"), self.file(MANIFEST_FILE)
        )

    def record_runs(
        self, *, dagster_run_id: str | None = None, mlflow_run_id: str | None = None
    ) -> FitManifest:
        """Record the Dagster and MLflow runs of the fit in its manifest (None: kept as it
        is), rewriting ``manifest.json`` atomically; returns the new manifest. Raises
        :class:`ManifestMissingError` for a folder without one."""
        manifest = self.manifest().with_runs(
            dagster_run_id=dagster_run_id, mlflow_run_id=mlflow_run_id
        )
        _write_atomically(self.file(MANIFEST_FILE), _save_json, manifest.to_dict())
        return manifest

    def evaluation(self) -> dict[str, Any] | None:
        """``evaluation.json``, or None when the fit was not evaluated."""
        if not self.file("evaluation.json").is_file():
            return None
        return self._mapping("evaluation.json", json.loads, "a JSON object")

    def attributions(self) -> dict[str, Any] | None:
        """``attributions.json`` (the baselines of ``<name>/attributions``), or None."""
        if not self.file("attributions.json").is_file():
            return None
        return self._mapping("attributions.json", json.loads, "a JSON object")

    def per_target(self) -> pd.DataFrame | None:
        """``evaluation_per_target.csv``, or None when the fit was not evaluated."""
        import pandas as pd

        path = self.file("evaluation_per_target.csv")
        return pd.read_csv(path) if path.is_file() else None

    def write_evaluation(self, evaluation: dict[str, Any], per_target: pd.DataFrame) -> None:
        """Write ``evaluation.json`` and ``evaluation_per_target.csv`` (see the module
        docstring), each to a temporary name replacing the older file when complete."""
        contents = {"evaluation.json": evaluation, "evaluation_per_target.csv": per_target}
        for name, save in _EVALUATION_CODECS.items():
            _write_atomically(self.file(name), save, contents[name])

    def point_link(self, link: str | os.PathLike[str]) -> None:
        """Make ``link`` a relative symbolic link to this folder, replacing an older link
        atomically (readers see the old fit or the new one, never no link)."""
        link = Path(link)
        tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
        os.symlink(os.path.relpath(self.path.resolve(), link.parent.resolve()), tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _mapping(self, name: str, parse: Callable[[str], Any], holds: str) -> dict[str, Any]:
        value = parse(self.file(name).read_text())
        if not isinstance(value, dict):
            raise FitFileError(
                f"{self.file(name)} holds {type(value).__name__}, not {holds}: "
                "rewrite the fit directory with write_outputs",
                source=self.path,
            )
        return value
