"""One regression fit written to its fit folder: the configuration set to a device and a slice
of the targets (:func:`configure_fit`), then the fit and its folder (:func:`fit_into_folder`).

What the pipeline's fitting assets run on a device slot; imports neither dagster nor mlflow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dm_assets.regression.fit import FitFolder

if TYPE_CHECKING:
    from dm_assets.regression.compute_datamodels import Datamodels
    from dm_assets.regression.config import RegressionConfig
    from dm_assets.regression.merge import TargetSlice

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FitRun:
    """A finished fit: ``fit`` (the result, in memory), ``folder`` (its fit folder on disk),
    ``config`` (the configuration it ran with) and ``seconds`` (wall clock of the fit and the
    writing)."""

    fit: Datamodels
    folder: FitFolder
    config: RegressionConfig
    seconds: float


def configure_fit(
    config: RegressionConfig,
    *,
    device: str | None = None,
    targets: TargetSlice | None = None,
) -> RegressionConfig:
    """``config`` with ``cfg.device: auto`` replaced by ``device`` (``"cpu"``, ``"cuda:1"``;
    a device named in the config is kept) and, with ``targets``, the data section cut to those
    targets (``target_start_ind``, ``target_end_ind``)."""
    values = config.to_dict()
    if device is not None and values["cfg"]["device"] == "auto":
        # the caller's device slot decides which device this process fits on
        values["cfg"]["device"] = device
    if targets is not None:
        values["data"]["target_start_ind"] = targets.start
        values["data"]["target_end_ind"] = targets.end
    return type(config)(values=values, source=config.source)


def fit_into_folder(
    config: RegressionConfig,
    out_dir: str | Path,
    *,
    store: str | Path | None = None,
    x_name: str | None = None,
    y_name: str | None = None,
    dagster_run_id: str | None = None,
) -> FitRun:
    """Fit ``config`` (:func:`~dm_assets.regression.compute_datamodels.compute_datamodels`)
    and write the new fit folder ``out_dir`` (which must not exist) with its manifest.

    Parameters
    ----------
    config
        The resolved regression configuration (its ``data.data_path`` is the dataset).
    out_dir
        The new fit folder.
    store, x_name, y_name
        The store the dataset was written from and its mask and output keys: the manifest
        then records the rows' digest and training configurations from the store (without
        them they are computed from the dataset, and the configurations are unknown).
    dagster_run_id
        The Dagster run fitting, recorded in the manifest.

    Raises the fit's own errors: ``ConfigError`` and ``BetonError`` for a configuration or a
    dataset that cannot be fitted, ``ManifestError`` for a dataset that holds models the
    store has not completed, ``FileExistsError`` for an existing ``out_dir``.
    """
    from dm_assets.regression.compute_datamodels import compute_datamodels, write_outputs
    from dm_assets.regression.manifest import build_manifest

    started = time.perf_counter()
    # before the fit: what the fit reads is described as it was when the fit started
    manifest = build_manifest(
        config, store=store, x_name=x_name, y_name=y_name, dagster_run_id=dagster_run_id
    )
    fit = compute_datamodels(config)
    write_outputs(fit, out_dir, config, manifest=manifest)
    seconds = time.perf_counter() - started
    logger.info("fitted %s in %.1f s", out_dir, seconds)
    return FitRun(fit=fit, folder=FitFolder.open(out_dir), config=config, seconds=seconds)
