"""What the fitting assets share (``<name>/datamodels``, ``<name>/datamodel_slices``): fit
ids, fitting on a device slot, the tags linking an MLflow run to its Dagster run, and the
checks and materialization of ``<name>/datamodels``.

One module so that the asset modules import it and never each other.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from dm_assets.pipeline import warmup
from dm_assets.pipeline.experiment import Experiment
from dm_assets.pipeline.resources.device_slots import DeviceSlotsResource
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking
from dm_assets.regression.config import ConfigError

if TYPE_CHECKING:
    from dm_assets.regression.config import RegressionConfig
    from dm_assets.regression.fit import FitFolder
    from dm_assets.regression.fit_run import FitRun


def fit_id(context: dg.AssetExecutionContext) -> str:
    """A new fit folder's name: UTC time and the Dagster run, ``20250101T120000Z-1a2b3c4d``."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{context.run.run_id[:8]}"


def fit_on_a_device_slot(
    context: dg.AssetExecutionContext,
    experiment: Experiment,
    devices: DeviceSlotsResource,
    config: RegressionConfig,
    fit_dir: Path,
    link: Path,
    *,
    store: Path,
) -> tuple[FitRun, float]:
    """Fit ``config`` holding one of the experiment's device slots (``cfg.device: auto`` then
    means that slot's device, as torch numbers it in this process:
    :func:`~dm_assets.training.devices.torch_device`) into the new fit folder ``fit_dir``
    (:func:`~dm_assets.regression.fit_run.fit_into_folder`, its manifest naming the rows of
    ``store`` it used and this Dagster run) and point ``link`` at it; the fit and the seconds
    taken, waiting for the slot included."""
    from dm_assets.regression.beton import BetonError
    from dm_assets.regression.fit_run import configure_fit, fit_into_folder
    from dm_assets.regression.manifest import ManifestError
    from dm_assets.training.devices import DeviceNotVisibleError, torch_device

    warmup.wait_in_step(context)  # never fit beside the warm-up thread (its module doc)
    started = time.perf_counter()
    with devices.acquire(
        experiment.devices,
        max_count=1,
        on_wait=lambda message: context.log.info("waiting for a device slot: %s", message),
    ) as lease:
        device = lease.devices[0]
        try:
            # torch's number for the leased GPU in this process, not the machine's ordinal
            config = configure_fit(config, device=torch_device(device))
        except DeviceNotVisibleError as exc:
            raise dg.Failure(description=str(exc)) from exc
        context.log.info("fitting on %s (%s)", device.name, config["cfg"]["device"])
        try:
            regression = experiment.regression
            run = fit_into_folder(
                config,
                fit_dir,
                store=store,
                x_name=regression.x_name if regression else None,
                y_name=regression.y_name if regression else None,
                dagster_run_id=context.run.run_id,
            )
        except (ConfigError, BetonError, ManifestError) as exc:
            raise dg.Failure(description=str(exc)) from exc
    run.folder.point_link(link)
    return run, time.perf_counter() - started


def latest_fit(experiment: Experiment, home: str | None, *, needs: str) -> FitFolder:
    """The experiment's latest fit (its ``datamodels`` link), or a :class:`dagster.Failure`
    saying to materialize ``needs`` first (e.g. ``"<name>/datamodels"``)."""
    from dm_assets.regression.fit import FitFolder, FitFolderError

    paths = experiment.paths(home or None)
    try:
        return FitFolder.open(paths.datamodels)
    except FitFolderError as exc:
        raise dg.Failure(
            description=f"no datamodels at {paths.datamodels}: materialize {needs} first"
        ) from exc


def record_mlflow_run(fit_dir: Path, run_id: str | None) -> None:
    """Record the MLflow run that logged the fit in ``fit_dir`` in its manifest (none: kept)."""
    from dm_assets.regression.fit import FitFolder

    if run_id is not None:
        FitFolder.open(fit_dir).record_runs(mlflow_run_id=run_id)


def run_tags(
    context: dg.AssetExecutionContext, asset_key: dg.AssetKey, partition: str, experiment: str
) -> dict[str, str]:
    """The tags linking an MLflow run to the Dagster run, asset and partition that made it."""
    return {
        "dagster.run_id": context.run.run_id,
        "dagster.asset_key": asset_key.to_user_string(),
        "dagster.partition": partition,
        "dm_assets.experiment": experiment,
    }


def datamodels_check_specs(key: dg.AssetKey, min_r2: float | None) -> list[dg.AssetCheckSpec]:
    """The checks of ``<name>/datamodels``: finite weights, mean validation R^2 floor."""
    floor_text = "none" if min_r2 is None else f"{min_r2:g}"
    return [
        dg.AssetCheckSpec(
            "finite_weights",
            asset=key,
            description="Every weight, bias and chosen lambda is finite.",
        ),
        dg.AssetCheckSpec(
            "mean_val_r2_floor",
            asset=key,
            description=f"Mean validation R^2 over targets at least {floor_text}.",
        ),
    ]


def manifest_metadata(folder: FitFolder) -> dict[str, dg.RawMetadataValue]:
    """The fit's lineage as asset metadata (the facts ``python -m dm_assets.lineage`` prints):
    how many and which models it was fitted on, the dataset and rows digests, the training
    configurations of those rows. Empty for a fit folder written before manifests."""
    from dm_assets.store.store import ranges_text

    if not folder.has_manifest():
        return {}
    manifest = folder.manifest()
    ids = manifest.configuration_ids
    return {
        "train_models": len(manifest.train_indices),
        "val_models": len(manifest.val_indices),
        "model_indices": dg.MetadataValue.text(
            f"train {ranges_text(manifest.train_indices)}; val {ranges_text(manifest.val_indices)}"
        ),
        "dataset_digest": str(manifest.dataset.get("digest", "")),
        "rows_digest": str(manifest.rows.get("digest", "")),
        "configuration_ids": dg.MetadataValue.json(
            {str(k): int(v) for k, v in (ids.get("counts") or {}).items()}
        ),
        "configuration_fingerprints": dg.MetadataValue.json(
            {str(k): str(v.get("fingerprint", "")) for k, v in manifest.configurations.items()}
        ),
        "mixed_configurations": manifest.mixed,
    }


def datamodels_results(
    fit_dir: Path,
    *,
    seconds: float,
    run_id: str | None,
    tracking: MlflowTracking,
    min_r2: float | None,
    extra: dict[str, dg.RawMetadataValue] | None = None,
    data_version: dg.DataVersion | None = None,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The materialization of ``<name>/datamodels`` (metadata from the fit's summary, with
    ``data_version``) and its two checks, for the fit folder ``fit_dir`` (named in the metadata
    as given)."""
    import torch

    from dm_assets.regression.fit import FitFolder

    folder = FitFolder.open(fit_dir)
    weights = folder.weights()
    summary = folder.summary()
    weight = weights["weight"]
    mean_r2 = float(summary["mean_val_r2"])
    meta: dict[str, dg.RawMetadataValue] = {
        "fit_dir": dg.MetadataValue.path(str(fit_dir)),
        "targets": int(weight.shape[1]),
        "features": int(weight.shape[0]),
        "mean_chosen_lambda_over_max": float(summary["mean_lambda_over_max"]),
        "mean_nonzeros": float(summary["mean_nonzeros"]),
        "mean_val_r2": mean_r2,
        "seconds": seconds,
        "solver": str(summary["solver"]),
        **manifest_metadata(folder),
        **(extra or {}),
    }
    if run_id is not None:
        meta.update(tracking.run_links(run_id))
    yield dg.MaterializeResult(metadata=meta, data_version=data_version)
    finite = bool(
        torch.isfinite(weight).all()
        and torch.isfinite(weights["bias"]).all()
        and torch.isfinite(weights["lam"]).all()
    )
    yield dg.AssetCheckResult(
        check_name="finite_weights",
        passed=finite,
        metadata={"weights": int(weight.numel())},
    )
    yield dg.AssetCheckResult(
        check_name="mean_val_r2_floor",
        passed=True if min_r2 is None else bool(math.isfinite(mean_r2) and mean_r2 >= min_r2),
        metadata={"mean_val_r2": mean_r2, "floor": min_r2 if min_r2 is not None else "none"},
    )
