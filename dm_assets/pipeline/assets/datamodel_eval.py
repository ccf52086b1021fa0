"""``<name>/datamodel_eval``: the latest datamodels judged on held-out models, the models the
regression never saw (neither fitted on nor used to choose lambda)."""

import json
import time
from pathlib import Path

import dagster as dg
import numpy as np

from dm_assets.pipeline.experiment import EvaluationSettings, Experiment, RegressionSettings
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking
from dm_assets.store.store import Store

EVALUATION_FILES = (
    "evaluation.json",
    "evaluation_per_target.csv",
    "lds_curve.png",
    "predicted_vs_actual.png",
)


def evaluation_assets(
    experiment: Experiment, regression: RegressionSettings, evaluation: EvaluationSettings
) -> list[dg.AssetsDefinition]:
    name = experiment.name
    datamodels_key = dg.AssetKey([name, "datamodels"])
    eval_key = dg.AssetKey([name, "datamodel_eval"])
    floor = evaluation.min_lds
    floor_text = "none" if floor is None else f"{floor:g}"

    @dg.asset(
        key=eval_key,
        group_name=name,
        deps=[datamodels_key],
        description=f"The latest datamodels of {name!r} on held-out models (completed models "
        "the fit never saw): LDS (per target, Spearman correlation across held-out models "
        "between prediction and actual output, averaged over targets), Pearson, R^2, the noise "
        "ceiling where held-out models repeat a mask, and LDS against the number of models "
        "used in the fit. Files beside the fit; metrics in the fit's MLflow run.",
        kinds={"pytorch", "mlflow"},
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
        import pandas as pd
        import torch

        from dm_assets.evaluation.metrics import (
            evaluate,
            fitted_and_held_out,
            group_identical_masks,
            lds_curve,
            plot_lds_curve,
            plot_predicted_vs_actual,
            predict,
            read_rows,
        )

        started = time.perf_counter()
        paths = experiment.paths(home.path or None)
        fit_dir = paths.datamodels.resolve()
        if not (fit_dir / "datamodels.pt").exists():
            raise dg.Failure(
                description=f"no datamodels at {paths.datamodels}: materialize "
                f"{name}/datamodels first (job {name}_fit)"
            )
        weights = torch.load(fit_dir / "datamodels.pt")
        config = regression.config(data_path=paths.beton, out_dir=fit_dir)
        data = config["data"]
        num_train, num_val = data["num_train"], data["num_val"]
        target_start = data["target_start_ind"]
        with Store.open(paths.store) as store:
            seen, held = fitted_and_held_out(paths.beton, store, num_train, num_val)
            if len(held) < 3:
                raise dg.Failure(
                    description=f"only {len(held)} held-out model(s) of {name!r} are trained "
                    f"(completed models beyond the {len(seen)} the fit used): train the "
                    "partitions after them"
                )
            # the curve refits on the seen models and scores the held-out ones: read them all
            # once; without a curve only the held-out rows are needed
            order = np.concatenate([seen, held]) if evaluation.curve_sizes else held
            x, y = read_rows(
                store,
                order,
                x_name=regression.x_name,
                y_name=regression.y_name,
                target_start=target_start,
                target_end=data["target_end_ind"],
            )
            masks, actual = x[len(order) - len(held) :], y[len(order) - len(held) :]
            predicted = predict(weights, masks)
            result = evaluate(predicted, actual, groups=group_identical_masks(masks))
            curve = []
            if evaluation.curve_sizes:
                curve = lds_curve(
                    x,
                    y,
                    sizes=evaluation.curve_sizes,
                    num_train=num_train,
                    num_val=num_val,
                    held_out=slice(len(seen), len(order)),
                    config=config,
                )
        # files beside the fit they judge
        per_target = pd.DataFrame(
            {
                "target": np.arange(result.n_targets) + target_start,
                "lds": result.lds_per_target,
                "pearson": result.pearson_per_target,
                "r2": result.r2_per_target,
            }
        )
        per_target.to_csv(fit_dir / "evaluation_per_target.csv", index=False)
        ceiling = result.noise_ceiling
        plot_lds_curve(
            curve, fit_dir / "lds_curve.png", title=f"{name}: LDS on held-out", ceiling=ceiling
        )
        plot_predicted_vs_actual(predicted, actual, fit_dir / "predicted_vs_actual.png")
        summary = {
            "held_out_models": len(held),
            "targets": int(result.n_targets),
            "lds": result.lds,
            "pearson": result.pearson,
            "r2": result.r2,
            "noise_ceiling": ceiling,
            "curve": [
                {
                    "n_train": p.n_train,
                    "n_models_used": p.n_models_used,
                    "lds": p.lds,
                    "pearson": p.pearson,
                    "r2": p.r2,
                }
                for p in curve
            ],
        }
        (fit_dir / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
        metrics = {"lds": result.lds, "pearson": result.pearson, "r2": result.r2}
        if ceiling is not None:
            metrics["noise_ceiling"] = ceiling
        run_id = tracking.log_evaluation(
            experiment=name,
            fit_dir=fit_dir,
            metrics=metrics,
            curves={"lds_curve": [(p.n_models_used, p.lds) for p in curve]},
            artifacts=[fit_dir / f for f in EVALUATION_FILES if (fit_dir / f).exists()],
        )
        context.log.info(
            "%s: LDS %.3f, Pearson %.3f, R^2 %.3f on %d held-out models%s",
            name,
            result.lds,
            result.pearson,
            result.r2,
            len(held),
            "" if ceiling is None else f" (noise ceiling {ceiling:.3f})",
        )
        meta: dict[str, dg.RawMetadataValue] = {
            "lds": result.lds,
            "pearson": result.pearson,
            "r2": result.r2,
            "held_out_models": len(held),
            "targets": int(result.n_targets),
            "fit_dir": dg.MetadataValue.path(str(fit_dir)),
            "seconds": time.perf_counter() - started,
        }
        if ceiling is not None:
            meta["noise_ceiling"] = ceiling
        if curve:
            meta["lds_curve"] = dg.MetadataValue.md(
                "| training models | models in the fit (with validation, refit) | LDS |\n"
                "|---|---|---|\n"
                + "\n".join(f"| {p.n_train} | {p.n_models_used} | {p.lds:.3f} |" for p in curve)
            )
        if run_id is not None:
            meta["mlflow_run_id"] = run_id
        yield dg.MaterializeResult(metadata=meta)
        yield dg.AssetCheckResult(
            check_name="lds_floor",
            passed=True if floor is None else bool(np.isfinite(result.lds) and result.lds >= floor),
            metadata={"lds": result.lds, "floor": floor if floor is not None else "none"},
        )

    return [datamodel_eval]


def read_evaluation(fit_dir: Path) -> dict | None:
    """The ``evaluation.json`` written beside a fit, if it was evaluated."""
    path = Path(fit_dir) / "evaluation.json"
    return json.loads(path.read_text()) if path.exists() else None
