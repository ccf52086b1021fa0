"""The fitting half of an experiment's graph: ``<name>/regression_dataset`` (the FFCV beton of
completed rows) and ``<name>/datamodels`` (one LASSO path per target, MLflow-tracked). With
``regression.targets_per_slice`` the fit is split by targets (see
:mod:`dm_assets.pipeline.assets.datamodel_slices`) and ``<name>/datamodels`` merges the slices.

Versions (:mod:`dm_assets.pipeline.assets.versions`): the dataset's data version is a hash of
the model indices it holds, their configuration ids and the keys written, so rewriting it after
more models complete (or after a retrain) gives a new version and marks the datamodels stale;
the datamodels' is derived from their settings and the dataset's version."""

import dagster as dg
import numpy as np

from dm_assets.pipeline.assets.datamodel_slices import slice_assets
from dm_assets.pipeline.assets.fit_steps import (
    datamodels_check_specs,
    datamodels_results,
    fit_id,
    fit_on_a_device_slot,
    record_mlflow_run,
    run_tags,
)
from dm_assets.pipeline.assets.versions import (
    configuration_counts,
    derived_data_version,
    describe_counts,
    digest,
    recorded_data_version,
    settings_version,
)
from dm_assets.pipeline.experiment import Experiment, RegressionSettings
from dm_assets.pipeline.resources.device_slots import GPU_POOL, DeviceSlotsResource
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking
from dm_assets.store.store import Store, StoreError


def regression_assets(
    experiment: Experiment, regression: RegressionSettings
) -> list[dg.AssetsDefinition]:
    name = experiment.name
    outputs_key = dg.AssetKey([name, "model_outputs"])
    dataset_key = dg.AssetKey([name, "regression_dataset"])
    datamodels_key = dg.AssetKey([name, "datamodels"])
    min_r2 = experiment.checks.min_mean_val_r2
    datamodels_version = settings_version("regression", regression)

    @dg.asset(
        key=dataset_key,
        group_name=name,
        deps=[outputs_key],
        description=f"The FFCV dataset of the completed rows of {name!r}: fields mask "
        f"({regression.x_name}), targets ({regression.y_name}, float32) and idx (the model "
        "index), in increasing model index.",
        kinds={"ffcv"},
        code_version=settings_version("dataset", regression.x_name, regression.y_name),
        check_specs=[
            dg.AssetCheckSpec(
                "rows_match_store",
                asset=dataset_key,
                blocking=True,
                description="The dataset holds exactly the completed models of the store: "
                "every model completed before it was written, and none that is not completed "
                "(models completing while it is written may be in it or not).",
            )
        ],
    )
    def regression_dataset(context: dg.AssetExecutionContext, home: HomeResource):
        # the science is imported when a step runs, not when the definitions load (every
        # Dagster process loads them: the UI, each code server, each run)
        from dm_assets.regression.beton import BetonError
        from dm_assets.regression.beton_reader import beton_info
        from dm_assets.regression.beton_writer import write_beton

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
        # What the dataset holds (the model indices the beton records), compared with the
        # store's flags read before the write and again after it: a model completing in
        # between (training runs on while the dataset is written) is no mismatch.
        written = beton_info(paths.beton).model_indices
        with Store.open(paths.store) as store:
            ids = store.configuration_ids(written)
            completed_after = store.completed_indices()
        counts = configuration_counts(ids)
        yield dg.MaterializeResult(
            data_version=dg.DataVersion(
                "dataset-"
                + digest(regression.x_name, regression.y_name, written.tolist(), ids.tolist())
            ),
            metadata={
                "path": dg.MetadataValue.path(str(summary.path)),
                "rows": summary.rows,
                "bytes": summary.nbytes,
                "idx_min": summary.idx_min,
                "idx_max": summary.idx_max,
                "n_features": summary.n_features,
                "n_targets": summary.n_targets,
                "seconds": summary.seconds,
                "configuration_ids": describe_counts(counts),
                "mixed": len(counts) > 1,
            },
        )
        yield rows_match_store_result(completed, written, completed_after)

    if regression.targets_per_slice is not None:
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
        code_version=datamodels_version,
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
        _, seconds = fit_on_a_device_slot(
            context, experiment, devices, config, fit_dir, paths.datamodels, store=paths.store
        )
        run_id = tracking.log_regression(
            experiment=name,
            fit_dir=fit_dir,
            run_name=f"{name} {fit_dir.name}",
            tags=run_tags(context, datamodels_key, "", name),
        )
        record_mlflow_run(fit_dir, run_id)
        yield from datamodels_results(
            fit_dir,
            seconds=seconds,
            # the links to the MLflow run come in extra (run_links), not as plain text
            run_id=None,
            tracking=tracking,
            min_r2=min_r2,
            extra=dict(tracking.run_links(run_id)) if run_id is not None else None,
            data_version=derived_data_version(
                datamodels_version,
                {"dataset": recorded_data_version(context.instance, dataset_key)},
            ),
        )

    return [regression_dataset, datamodels]


def rows_match_store_result(
    completed_before: np.ndarray, written: np.ndarray, completed_after: np.ndarray
) -> dg.AssetCheckResult:
    """The ``rows_match_store`` check of a dataset holding the model indices ``written``, the
    store's completed indices read before the dataset was written and after it.

    Passes when ``completed_before ⊆ written ⊆ completed_after`` and ``written`` has no
    repeat: the dataset is a snapshot taken while training may go on, so a model completing
    during the write may or may not be in it (and one completing after is for the next
    materialization), but a model completed before it must be, and a row it holds must be
    completed. Rows completed after the first read are counted in the metadata.
    """
    missing = np.setdiff1d(completed_before, written)
    extra = np.setdiff1d(written, completed_after)
    repeated = len(written) - len(np.unique(written))
    during = np.setdiff1d(written, completed_before)
    after = np.setdiff1d(np.setdiff1d(completed_after, written), completed_before)
    return dg.AssetCheckResult(
        check_name="rows_match_store",
        passed=bool(len(missing) == 0 and len(extra) == 0 and repeated == 0),
        metadata={
            "dataset_rows": len(written),
            "completed_rows": len(completed_after),
            "completed_not_in_dataset": len(missing),
            "in_dataset_not_completed": len(extra),
            "repeated_in_dataset": repeated,
            "completed_during_write": len(during),
            "completed_after_write": len(after),
        },
    )
