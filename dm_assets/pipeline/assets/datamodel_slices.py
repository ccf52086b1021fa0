"""The regression split by targets (``regression.targets_per_slice``): ``<name>/datamodel_slices``
fits one slice of the targets per partition, each on a device slot of its own, and
``<name>/datamodels`` merges the latest fit of every slice.

On disk, beside the unsliced layout::

    $DM_HOME/<name>/slices/<key>/<fit id>/   one fit of targets [start, end) (write_outputs' files;
                                             regularization_path.csv: dataset target numbers)
    $DM_HOME/<name>/slices/<key>/latest      link to the slice's latest fit
    $DM_HOME/<name>/fits/<fit id>/           the merge (merge_fits: the same four files)
    $DM_HOME/<name>/datamodels               link to the latest merge, as without slices

A slice's key names its first and last target, zero-padded so keys sort (``t0000-0099``).
Refitting some slices keeps the others' fits: the merge takes each slice's ``latest``. A backfill
of the slices runs one partition per run, so with several runs at once (the ``gpu`` pool's
limit) slices fit in parallel, each holding its own device slot (GPU); a run given a range of
slices fits them one after the other.

MLflow: one run per slice fit (tags ``dm_assets.slice`` = its key, ``dm_assets.targets`` =
``start-last``), and one run per merge whose params ``slices.<key>`` name the slice fits it
joined; the merge becomes the MLflow parent (``mlflow.parentRunId``) of those slice runs, so the
UI nests the slices under the merge that uses them (a slice kept for a later merge moves under
it). The held-out evaluation is logged to the merge's run.

The slices' asset is in its own group, ``<name>_slices``: its partitions (slices of targets) are
not the training partitions (blocks of models), and one Dagster run holds assets of one
partitioning only, so it is left out of the experiment's jobs (``<name>_all`` selects the group
``<name>``); backfill it from the UI or ``dagster asset materialize``, then run ``<name>_fit``.

Versions (:mod:`dm_assets.pipeline.assets.versions`): both assets' code version is a hash of the
regression settings; a slice fit's data version is derived from it, the slice keys of the run
and the dataset's data version, the merge's from it and the data version of every slice.
"""

import time
import warnings
from pathlib import Path

import dagster as dg

from dm_assets.pipeline.assets.fit_steps import (
    datamodels_check_specs,
    datamodels_results,
    fit_id,
    fit_on_a_device_slot,
    record_mlflow_run,
    run_tags,
)
from dm_assets.pipeline.assets.versions import (
    derived_data_version,
    recorded_data_version,
    settings_version,
)
from dm_assets.pipeline.experiment import Experiment, RegressionSettings
from dm_assets.pipeline.resources.device_slots import GPU_POOL, DeviceSlotsResource
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking
from dm_assets.regression.merge import MergeError, TargetSlice, merge_fits

SLICE_TAG = "dm_assets.slice"
LATEST = "latest"


def slices_group(name: str) -> str:
    """The asset group of an experiment's slices (see the module docstring)."""
    return f"{name}_slices"


def experiment_slices(experiment: Experiment, regression: RegressionSettings) -> list[TargetSlice]:
    """The slices of the regression's targets: ``data.target_start_ind`` to
    ``data.target_end_ind`` (-1: the last of the spec's ``y_name`` outputs; a scalar output is
    one target), ``targets_per_slice`` each."""
    if regression.targets_per_slice is None:
        raise ValueError(f"experiment {experiment.name!r} does not fit by slices")
    return experiment.target_slices()


def _slice_metadata(
    slices: dict[str, TargetSlice], fitted: list[tuple[str, Path, dict, float, str | None]]
) -> "dict[str, dg.RawMetadataValue]":
    """The metadata of a run of ``<name>/datamodel_slices``: the fit's numbers for one slice,
    totals and a table of the fits for several."""
    if len(fitted) == 1:
        key, fit_dir, summary, seconds, run_id = fitted[0]
        meta: dict[str, dg.RawMetadataValue] = {
            "fit_dir": dg.MetadataValue.path(str(fit_dir)),
            "first_target": slices[key].start,
            "targets": slices[key].end - slices[key].start,
            "features": int(summary["n_features"]),
            "mean_chosen_lambda_over_max": float(summary["mean_lambda_over_max"]),
            "mean_nonzeros": float(summary["mean_nonzeros"]),
            "mean_val_r2": float(summary["mean_val_r2"]),
            "seconds": seconds,
            "solver": str(summary["solver"]),
            "device": str(summary["device"]),
        }
        if run_id is not None:
            meta["mlflow_run_id"] = run_id
        return meta
    return {
        "slices_fitted": len(fitted),
        "targets": sum(slices[f[0]].end - slices[f[0]].start for f in fitted),
        "seconds": sum(f[3] for f in fitted),
        "fits": dg.MetadataValue.md(
            "| slice | fit folder | mean validation R^2 | device | seconds |\n"
            "|---|---|---|---|---|\n"
            + "\n".join(
                f"| {key} | {fit_dir} | {summary['mean_val_r2']:.3f} | "
                f"{summary['device']} | {seconds:.1f} |"
                for key, fit_dir, summary, seconds, _ in fitted
            )
        ),
    }


def _nest_slice_runs(
    context: dg.AssetExecutionContext,
    tracking: MlflowTracking,
    name: str,
    slice_dirs: dict[str, Path],
    merge_run: str,
) -> None:
    """Make the MLflow run of the merge the parent of the runs that logged its slices' fits."""
    client = tracking.client()
    for key, folder in slice_dirs.items():
        slice_run = tracking.find_fit_run(name, folder)
        if slice_run is None:
            context.log.warning("no MLflow run logged the fit of slice %s", key)
        else:
            client.set_tag(slice_run, "mlflow.parentRunId", merge_run)


def slice_assets(
    experiment: Experiment, regression: RegressionSettings
) -> list[dg.AssetsDefinition]:
    """``<name>/datamodel_slices`` (partitioned by slice keys) and ``<name>/datamodels`` (their
    merge)."""
    name = experiment.name
    dataset_key = dg.AssetKey([name, "regression_dataset"])
    slices_key = dg.AssetKey([name, "datamodel_slices"])
    datamodels_key = dg.AssetKey([name, "datamodels"])
    min_r2 = experiment.checks.min_mean_val_r2
    slices = {s.key: s for s in experiment_slices(experiment, regression)}
    partitions = dg.StaticPartitionsDefinition(list(slices))
    version = settings_version("regression", regression)

    with warnings.catch_warnings():
        # BackfillPolicy is marked beta; one slice per run lets slices fit in parallel
        warnings.simplefilter("ignore", dg.BetaWarning)
        slices_decorator = dg.asset(
            key=slices_key,
            group_name=slices_group(name),
            deps=[dataset_key],
            partitions_def=partitions,
            backfill_policy=dg.BackfillPolicy.multi_run(1),
            pool=GPU_POOL,
            description=f"Datamodels of {name!r} for one slice of "
            f"{regression.targets_per_slice} targets (partition t<first>-<last>): the LASSO "
            f"paths of those targets, fitted on a device slot of their own; fit folders under "
            f"$DM_HOME/{name}/slices/<key>/, the latest linked as <key>/latest. One MLflow run "
            "per slice fit.",
            kinds={"pytorch", "mlflow"},
            code_version=version,
        )

    @slices_decorator
    def datamodel_slices(
        context: dg.AssetExecutionContext,
        home: HomeResource,
        devices: DeviceSlotsResource,
        tracking: MlflowTracking,
    ) -> dg.MaterializeResult:
        from dm_assets.regression.fit_run import configure_fit

        paths = experiment.paths(home.path or None)
        # one slice per run is the way to fit in parallel (a backfill makes one run per
        # slice); a run given a range fits its slices one after the other
        fitted = []
        for key in context.partition_keys:
            target_slice = slices[key]
            fit_dir = paths.slices / key / fit_id(context)
            config = configure_fit(
                regression.config(data_path=paths.beton, out_dir=fit_dir), targets=target_slice
            )
            run, seconds = fit_on_a_device_slot(
                context,
                experiment,
                devices,
                config,
                fit_dir,
                paths.slices / key / LATEST,
                store=paths.store,
            )
            run_id = tracking.log_regression(
                experiment=name,
                fit_dir=fit_dir,
                run_name=f"{name} {key} {fit_dir.name}",
                tags={
                    **run_tags(context, slices_key, key, name),
                    SLICE_TAG: key,
                    "dm_assets.targets": f"{target_slice.start}-{target_slice.end - 1}",
                },
            )
            record_mlflow_run(fit_dir, run_id)
            fitted.append((key, fit_dir, run.fit.summary, seconds, run_id))
            context.log.info("slice %s: %s in %.1f s", key, fit_dir, seconds)
        return dg.MaterializeResult(
            metadata=_slice_metadata(slices, fitted),
            data_version=derived_data_version(
                version,
                {
                    "slices": ",".join(context.partition_keys),
                    "dataset": recorded_data_version(context.instance, dataset_key),
                },
            ),
        )

    @dg.asset(
        key=datamodels_key,
        group_name=name,
        deps=[slices_key],
        description=f"Datamodels of {name!r}: the latest fit of each slice of "
        f"{regression.targets_per_slice} targets ({name}/datamodel_slices) merged into one fit "
        f"of every target; merged folders under $DM_HOME/{name}/fits/, the latest linked as "
        f"$DM_HOME/{name}/datamodels. One MLflow run per merge, parent of its slices' runs.",
        kinds={"pytorch", "mlflow"},
        check_specs=datamodels_check_specs(datamodels_key, min_r2),
        code_version=version,
    )
    def datamodels(context: dg.AssetExecutionContext, home: HomeResource, tracking: MlflowTracking):
        from dm_assets.regression.fit import FitFolder

        started = time.perf_counter()
        paths = experiment.paths(home.path or None)
        missing = [key for key in slices if not (paths.slices / key / LATEST).exists()]
        if missing:
            raise dg.Failure(
                description=f"no fit yet of slice(s) {missing} of {name!r} (under "
                f"{paths.slices}): materialize those partitions of "
                f"{slices_key.to_user_string()} first"
            )
        slice_dirs = {key: (paths.slices / key / LATEST).resolve() for key in slices}
        fit_dir = paths.fits / fit_id(context)
        try:
            merge_fits(list(slice_dirs.values()), fit_dir, dagster_run_id=context.run.run_id)
        except MergeError as exc:
            raise dg.Failure(description=str(exc)) from exc
        FitFolder.open(fit_dir).point_link(paths.datamodels)
        context.log.info("merged %d slices into %s", len(slice_dirs), fit_dir)

        run_id = tracking.log_regression(
            experiment=name,
            fit_dir=fit_dir,
            run_name=f"{name} {fit_dir.name} (merge of {len(slice_dirs)} slices)",
            tags=run_tags(context, datamodels_key, "", name),
            params={f"slices.{key}": folder.name for key, folder in slice_dirs.items()},
        )
        record_mlflow_run(fit_dir, run_id)
        if run_id is not None:
            _nest_slice_runs(context, tracking, name, slice_dirs, run_id)
        yield from datamodels_results(
            fit_dir,
            seconds=time.perf_counter() - started,
            run_id=run_id,
            tracking=tracking,
            min_r2=min_r2,
            extra={
                "slices": len(slice_dirs),
                "fit_seconds": float(FitFolder.open(fit_dir).summary()["seconds"]),
            },
            data_version=derived_data_version(
                version,
                {key: recorded_data_version(context.instance, slices_key, key) for key in slices},
            ),
        )

    return [datamodel_slices, datamodels]
