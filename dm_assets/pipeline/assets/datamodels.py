"""The fitting half of an experiment's graph: ``<name>/regression_dataset`` (the FFCV beton of
completed rows) and ``<name>/datamodels`` (one LASSO path per target, MLflow-tracked). With
``regression.targets_per_slice`` the fit is split by targets (see
:mod:`dm_assets.pipeline.assets.datamodel_slices`) and ``<name>/datamodels`` merges the slices."""

import datetime as dt
import math
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np

from dm_assets.pipeline.experiment import Experiment, RegressionSettings
from dm_assets.pipeline.resources.device_slots import GPU_POOL, DeviceSlotsResource
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking
from dm_assets.regression.config import ConfigError
from dm_assets.store.store import Store, StoreError

if TYPE_CHECKING:
    import torch

    from dm_assets.regression.compute_datamodels import Datamodels
    from dm_assets.regression.config import RegressionConfig


def point_link(link: Path, target: Path) -> None:
    """Make ``link`` point at ``target`` (relative), replacing an older link atomically."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def fit_id(context: dg.AssetExecutionContext) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{context.run.run_id[:8]}"


def fit_on_a_device_slot(
    context: dg.AssetExecutionContext,
    experiment: Experiment,
    devices: DeviceSlotsResource,
    config: "RegressionConfig",
) -> tuple["Datamodels", "RegressionConfig"]:
    """Fit ``config`` holding one of the experiment's device slots (``cfg.device: auto`` then
    means that slot's device); returns the fit and the config with the device it used."""
    from dm_assets.regression.beton import BetonError
    from dm_assets.regression.compute_datamodels import compute_datamodels

    with devices.acquire(
        experiment.devices,
        max_count=1,
        on_wait=lambda message: context.log.info("waiting for a device slot: %s", message),
    ) as lease:
        device = lease.devices[0]
        values = config.to_dict()
        if values["cfg"]["device"] == "auto":
            # the leased slot decides which device this process fits on
            values["cfg"]["device"] = f"cuda:{device.ordinal}" if device.kind == "cuda" else "cpu"
            config = type(config)(values=values, source=config.source)
        context.log.info("fitting on %s (%s)", device.name, config["cfg"]["device"])
        try:
            return compute_datamodels(config), config
        except (ConfigError, BetonError) as exc:
            raise dg.Failure(description=str(exc)) from exc


def fit_into(
    context: dg.AssetExecutionContext,
    experiment: Experiment,
    devices: DeviceSlotsResource,
    config: "RegressionConfig",
    fit_dir: Path,
    link: Path,
) -> tuple["Datamodels", "RegressionConfig", float]:
    """Fit ``config`` on a device slot (:func:`fit_on_a_device_slot`), write the fit folder
    ``fit_dir`` and point ``link`` at it; the fit, the config it used and the seconds taken."""
    from dm_assets.regression.compute_datamodels import write_outputs

    started = time.perf_counter()
    fit, config = fit_on_a_device_slot(context, experiment, devices, config)
    write_outputs(fit, fit_dir, config)
    point_link(link, fit_dir)
    return fit, config, time.perf_counter() - started


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


def datamodels_results(
    *,
    weights: "dict[str, torch.Tensor]",
    summary: dict,
    fit_dir: Path,
    seconds: float,
    run_id: str | None,
    tracking: MlflowTracking,
    min_r2: float | None,
    extra: "dict[str, dg.RawMetadataValue] | None" = None,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The materialization of ``<name>/datamodels`` (metadata from the fit's summary) and its
    two checks, for the fit in ``fit_dir`` (``weights``: its ``datamodels.pt``)."""
    import torch

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
        **(extra or {}),
    }
    if run_id is not None:
        meta["mlflow_run_id"] = run_id
        meta["mlflow_ui"] = dg.MetadataValue.text(tracking.ui_command())
    yield dg.MaterializeResult(metadata=meta)
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


def regression_assets(
    experiment: Experiment, regression: RegressionSettings
) -> list[dg.AssetsDefinition]:
    name = experiment.name
    outputs_key = dg.AssetKey([name, "model_outputs"])
    dataset_key = dg.AssetKey([name, "regression_dataset"])
    datamodels_key = dg.AssetKey([name, "datamodels"])
    min_r2 = experiment.checks.min_mean_val_r2

    @dg.asset(
        key=dataset_key,
        group_name=name,
        deps=[outputs_key],
        description=f"The FFCV dataset of the completed rows of {name!r}: fields mask "
        f"({regression.x_name}), targets ({regression.y_name}, float32) and idx (the model "
        "index), in increasing model index.",
        kinds={"ffcv"},
        check_specs=[
            dg.AssetCheckSpec(
                "rows_match_store",
                asset=dataset_key,
                blocking=True,
                description="The dataset holds exactly the completed models of the store "
                "(the same set of model indices).",
            )
        ],
    )
    def regression_dataset(context: dg.AssetExecutionContext, home: HomeResource):
        # the science is imported when a step runs, not when the definitions load (every
        # Dagster process loads them: the UI, each code server, each run)
        from dm_assets.regression.beton import BetonError, beton_info, write_beton

        paths = experiment.paths(home.path or None)
        try:
            with Store.open(paths.store) as store:
                completed = store.completed_indices()
        except StoreError as exc:
            raise dg.Failure(
                description=f"{exc}\nMaterialize {name}/store and train some partitions first "
                f"(job {name}_train)."
            ) from exc
        if len(completed) == 0:
            raise dg.Failure(
                description=f"no model of {name!r} is trained yet (store {paths.store}): "
                f"materialize partitions of {name}/model_outputs first (job {name}_train)."
            )
        try:
            summary = write_beton(
                paths.store, paths.beton, x_name=regression.x_name, y_name=regression.y_name
            )
        except BetonError as exc:
            raise dg.Failure(description=str(exc)) from exc
        context.log.info("wrote %s", summary)
        yield dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(summary.path)),
                "rows": summary.rows,
                "bytes": summary.nbytes,
                "idx_min": summary.idx_min,
                "idx_max": summary.idx_max,
                "n_features": summary.n_features,
                "n_targets": summary.n_targets,
                "seconds": summary.seconds,
            }
        )
        written = beton_info(paths.beton).model_indices
        missing = np.setdiff1d(completed, written)
        extra = np.setdiff1d(written, completed)
        yield dg.AssetCheckResult(
            check_name="rows_match_store",
            passed=bool(len(missing) == 0 and len(extra) == 0),
            metadata={
                "dataset_rows": len(written),
                "completed_rows": len(completed),
                "completed_not_in_dataset": len(missing),
                "in_dataset_not_completed": len(extra),
            },
        )

    if regression.targets_per_slice is not None:
        # imported here: the slices' assets build on this module's helpers
        from dm_assets.pipeline.assets.datamodel_slices import slice_assets

        return [regression_dataset, *slice_assets(experiment, regression)]

    @dg.asset(
        key=datamodels_key,
        group_name=name,
        deps=[dataset_key],
        pool=GPU_POOL,
        description=f"Datamodels of {name!r}: one LASSO path per target on the first "
        "num_train models, lambda chosen on the next num_val, refit; fit folders under "
        f"$DM_HOME/{name}/fits/, the latest linked as $DM_HOME/{name}/datamodels. One MLflow "
        "run per fit with a metric point per lambda step.",
        kinds={"pytorch", "mlflow"},
        check_specs=datamodels_check_specs(datamodels_key, min_r2),
    )
    def datamodels(
        context: dg.AssetExecutionContext,
        home: HomeResource,
        devices: DeviceSlotsResource,
        tracking: MlflowTracking,
    ):
        paths = experiment.paths(home.path or None)
        fit_dir = paths.fits / fit_id(context)
        config = regression.config(data_path=paths.beton, out_dir=fit_dir)
        fit, config, seconds = fit_into(
            context, experiment, devices, config, fit_dir, paths.datamodels
        )
        run_id = tracking.log_regression(
            experiment=name,
            fit_dir=fit_dir,
            run_name=f"{name} {fit_dir.name}",
            tags=run_tags(context, datamodels_key, "", name),
        )
        yield from datamodels_results(
            weights=fit.result.seed_dict(),
            summary=fit.summary,
            fit_dir=fit_dir,
            seconds=seconds,
            run_id=run_id,
            tracking=tracking,
            min_r2=min_r2,
        )

    return [regression_dataset, datamodels]
