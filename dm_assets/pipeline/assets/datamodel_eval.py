"""``<name>/datamodel_eval``: the latest datamodels judged on held-out models, the models the
regression never saw (neither fitted on nor used to choose lambda); the work is
:func:`dm_assets.evaluation.held_out.evaluate_fit`. Its code version is a hash of the regression
and evaluation settings; its data version is derived from it and the datamodels' data version
(:mod:`dm_assets.pipeline.assets.versions`)."""

import time

import dagster as dg
import numpy as np

from dm_assets.evaluation.report import curve_markdown, score_lines, scores_markdown
from dm_assets.pipeline import warmup
from dm_assets.pipeline.assets.fit_steps import latest_fit
from dm_assets.pipeline.assets.versions import (
    derived_data_version,
    recorded_data_version,
    settings_version,
)
from dm_assets.pipeline.experiment import EvaluationSettings, Experiment, RegressionSettings
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking


def evaluation_assets(
    experiment: Experiment, regression: RegressionSettings, evaluation: EvaluationSettings
) -> list[dg.AssetsDefinition]:
    name = experiment.name
    datamodels_key = dg.AssetKey([name, "datamodels"])
    eval_key = dg.AssetKey([name, "datamodel_eval"])
    floor = evaluation.min_lds
    floor_text = "none" if floor is None else f"{floor:g}"
    # the floor is a check's, not the evaluation's: changing it does not make the scores stale
    version = settings_version(
        "evaluation",
        regression,
        evaluation.curve_sizes,
        evaluation.folds,
        evaluation.replicates,
        evaluation.bootstrap,
    )

    @dg.asset(
        key=eval_key,
        group_name=name,
        deps=[datamodels_key],
        description=f"The latest datamodels of {name!r} on held-out models (completed models "
        "the fit never saw): LDS (per target, Spearman correlation across held-out models "
        "between prediction and actual output, averaged over targets) with its 95% bootstrap "
        "interval over held-out masks, Pearson, R^2; where held-out masks are trained with "
        "several seeds, the noise ceiling and LDS/ceiling (with intervals), and the LDS against "
        "the mean of the seeds' outputs; and LDS against the total number N of trained models "
        "(lambda chosen by K-fold inside N). Files beside the fit; metrics in the fit's MLflow "
        "run.",
        kinds={"pytorch", "mlflow"},
        code_version=version,
        check_specs=[
            dg.AssetCheckSpec(
                "lds_floor",
                asset=eval_key,
                description=f"Held-out LDS at least {floor_text}.",
            )
        ],
    )
    def datamodel_eval(
        context: dg.AssetExecutionContext, home: HomeResource, tracking: MlflowTracking
    ):
        warmup.wait_in_step(context)
        from dm_assets.evaluation.held_out import FitRows, HeldOutError, evaluate_fit
        from dm_assets.regression.fit import EVALUATION_FILES

        started = time.perf_counter()
        paths = experiment.paths(home.path or None)
        fit = latest_fit(experiment, home.path, needs=f"{name}/datamodels (job {name}_fit)")
        config = regression.config(data_path=paths.beton, out_dir=fit.path)
        rows = FitRows.of(
            config, store=paths.store, x_name=regression.x_name, y_name=regression.y_name
        )
        try:
            judged = evaluate_fit(
                fit,
                rows,
                config=config,
                curve_sizes=evaluation.curve_sizes,
                folds=evaluation.folds,
                replicates=evaluation.replicates,
                resamples=evaluation.bootstrap,
                experiment=name,
            )
        except HeldOutError as exc:
            raise dg.Failure(description=str(exc)) from exc
        scores, result, curve = judged.scores, judged.evaluation, judged.curve
        curves = {}
        if curve is not None:
            curves["lds_curve"] = [(p.n_models, p.lds) for p in curve.points]
            for side, at in (("low", 0), ("high", 1)):
                curves[f"lds_curve_ci_{side}"] = [
                    (p.n_models, p.lds_ci[at]) for p in curve.points if p.lds_ci is not None
                ]
        run_id = tracking.log_evaluation(
            experiment=name,
            fit_dir=fit.path,
            metrics=judged.metrics(),
            curves=curves,
            artifacts=[fit.file(f) for f in EVALUATION_FILES if fit.file(f).exists()],
        )
        for line in score_lines(judged.report):
            context.log.info("%s: %s", name, line)
        meta: dict[str, dg.RawMetadataValue] = {
            "lds": round(result.lds, 4),
            "pearson": round(result.pearson, 4),
            "r2": round(result.r2, 4),
            "scores": dg.MetadataValue.md(scores_markdown(judged.report)),
            "held_out_models": len(judged.held_out),
            "held_out_masks": scores.single.masks,
            "targets": int(result.n_targets),
            "fit_dir": dg.MetadataValue.path(str(fit.path)),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if scores.lds_ci is not None:
            meta["lds_95ci"] = f"[{scores.lds_ci[0]:.4f}, {scores.lds_ci[1]:.4f}]"
        if scores.noise_ceiling is not None:
            meta["noise_ceiling"] = round(scores.noise_ceiling, 4)
        if scores.lds_over_ceiling is not None:
            meta["lds_over_ceiling"] = round(scores.lds_over_ceiling, 4)
        if curve is not None:
            meta["lds_curve"] = dg.MetadataValue.md(curve_markdown(judged.report["curve"]))
        if run_id is not None:
            meta.update(tracking.run_links(run_id))
        yield dg.MaterializeResult(
            metadata=meta,
            data_version=derived_data_version(
                version, {"datamodels": recorded_data_version(context.instance, datamodels_key)}
            ),
        )
        yield dg.AssetCheckResult(
            check_name="lds_floor",
            passed=True if floor is None else bool(np.isfinite(result.lds) and result.lds >= floor),
            metadata={"lds": result.lds, "floor": floor if floor is not None else "none"},
        )

    return [datamodel_eval]
