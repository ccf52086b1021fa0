"""``<name>/attributions``: baseline data attribution (influence functions, TRAK, TracIn, by the
``dattri`` library) for the latest fit, scored on its held-out models exactly as the datamodels
are, timed, and drawn as LDS against compute; the work is
:func:`dm_assets.attribution.report.attribute_fit` (files: see there).

The attribution task comes from the experiment's trainer module
(:func:`dm_assets.attribution.task.load_attribution_task`), with the training arguments of the
fit's rows as its manifest records them (the current ``trainer.args`` only when the rows come
from several configurations, with a warning). Its code version is a hash of the regression,
evaluation and attribution settings; its data version derives from it and
``datamodel_eval``'s.
"""

import time

import dagster as dg

from dm_assets.pipeline import warmup
from dm_assets.pipeline.assets.fit_steps import latest_fit
from dm_assets.pipeline.assets.versions import (
    derived_data_version,
    recorded_data_version,
    settings_version,
)
from dm_assets.pipeline.experiment import (
    AttributionSettings,
    EvaluationSettings,
    Experiment,
    RegressionSettings,
)
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking


def attribution_assets(
    experiment: Experiment,
    regression: RegressionSettings,
    evaluation: EvaluationSettings,
    attributions: AttributionSettings,
) -> list[dg.AssetsDefinition]:
    name = experiment.name
    eval_key = dg.AssetKey([name, "datamodel_eval"])
    key = dg.AssetKey([name, "attributions"])
    version = settings_version("attributions", regression, evaluation, attributions)

    @dg.asset(
        key=key,
        group_name=name,
        deps=[eval_key],
        description=f"Baselines for the latest datamodels of {name!r}: "
        + ", ".join(attributions.methods)
        + " computed by dattri on models trained on the full training set, each scored on the "
        "datamodels' held-out models (LDS with its 95% interval, noise ceiling, LDS / ceiling, "
        "dattri's own LDS as a cross-check) and timed (training included); LDS against "
        "compute beside the fit; metrics in the fit's MLflow run.",
        kinds={"pytorch", "mlflow"},
        code_version=version,
    )
    def attributions_asset(
        context: dg.AssetExecutionContext, home: HomeResource, tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        warmup.wait_in_step(context)
        from dm_assets.attribution.report import (
            FIGURE_FILE,
            REPORT_FILE,
            attribute_fit,
            trainer_of_fit,
        )
        from dm_assets.attribution.task import AttributionTaskError, load_attribution_task
        from dm_assets.evaluation.held_out import HeldOutError
        from dm_assets.regression.fit import FitFolderError, attribution_scores_file
        from dm_assets.training.configuration import normalize_args

        started = time.perf_counter()
        paths = experiment.paths(home.path or None)
        fit = latest_fit(
            experiment, home.path, needs=f"{name}/datamodels and {name}/datamodel_eval"
        )
        try:
            recorded = trainer_of_fit(fit.manifest())
        except FitFolderError as exc:
            raise dg.Failure(description=str(exc)) from exc
        if recorded is None:
            context.log.warning(
                "the fit's rows come from several training configurations (or none recorded): "
                "the baselines train with the experiment's current trainer arguments"
            )
            main_import = experiment.trainer.main_import
            args = normalize_args(experiment.trainer.script_args())
        else:
            main_import, args = recorded
        try:
            task = load_attribution_task(main_import, args)
            result = attribute_fit(
                fit,
                paths.store,
                task,
                methods=attributions.methods,
                targets=attributions.targets,
                x_name=regression.x_name,
                y_name=regression.y_name,
                resamples=evaluation.bootstrap,
                experiment=name,
            )
        except (AttributionTaskError, HeldOutError) as exc:
            raise dg.Failure(description=str(exc)) from exc
        report = result.report
        metrics: dict[str, float] = {}
        for method, entry in report["methods"].items():
            for field in ("lds", "lds_over_ceiling", "seconds", "dattri_lds"):
                if entry.get(field) is not None:
                    metrics[f"attribution/{method}/{field}"] = float(entry[field])
            if entry.get("ci") is not None and None not in entry["ci"]:
                metrics[f"attribution/{method}/lds_ci_low"] = float(entry["ci"][0])
                metrics[f"attribution/{method}/lds_ci_high"] = float(entry["ci"][1])
        metrics["attribution/datamodels/lds"] = float(report["datamodels"]["lds"])
        metrics["attribution/datamodels/seconds"] = float(report["datamodels"]["seconds"])
        metrics["attribution/seconds_per_model"] = float(report["seconds_per_model"]["value"])
        artifacts = [fit.file(REPORT_FILE), fit.file(FIGURE_FILE)]
        artifacts += [fit.file(attribution_scores_file(m)) for m in report["methods"]]
        run_id = tracking.log_evaluation(
            experiment=name, fit_dir=fit.path, metrics=metrics, artifacts=artifacts
        )
        context.log.info("%s baselines:\n%s", name, result.markdown())
        meta: dict[str, dg.RawMetadataValue] = {
            "table": dg.MetadataValue.md(result.markdown()),
            "targets": report["targets"][1] - report["targets"][0],
            "held_out_models": report["held_out_models"],
            "seconds_per_model": report["seconds_per_model"]["value"],
            "fit_dir": dg.MetadataValue.path(str(fit.path)),
            "seconds": time.perf_counter() - started,
        }
        for method, entry in report["methods"].items():
            if entry["lds"] is not None:
                meta[f"lds_{method}"] = entry["lds"]
        if run_id is not None:
            meta["mlflow_run_id"] = run_id
        return dg.MaterializeResult(
            metadata=meta,
            data_version=derived_data_version(
                version, {"datamodel_eval": recorded_data_version(context.instance, eval_key)}
            ),
        )

    return [attributions_asset]
