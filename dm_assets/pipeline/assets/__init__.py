"""Asset factories: one group of assets, checks and jobs per experiment."""

from __future__ import annotations

import dagster as dg

from dm_assets.pipeline.assets.datamodel_eval import evaluation_assets
from dm_assets.pipeline.assets.datamodels import regression_assets
from dm_assets.pipeline.assets.model_outputs import training_assets
from dm_assets.pipeline.experiment import Experiment
from dm_assets.pipeline.resources.device_slots import GPU_POOL
from dm_assets.pipeline.resources.experiment_home import HomeResource

__all__ = ["GPU_POOL", "HomeResource", "experiment_assets", "experiment_jobs"]


def experiment_assets(
    experiment: Experiment,
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """The experiment's assets and checks, keys prefixed with its name: ``store``,
    ``model_outputs`` and, when it has a regression section, ``regression_dataset`` and
    ``datamodels`` (and ``datamodel_eval`` with an evaluation section)."""
    assets = training_assets(experiment)
    if experiment.regression is not None:
        assets.extend(regression_assets(experiment, experiment.regression))
        if experiment.evaluation is not None:
            assets.extend(
                evaluation_assets(experiment, experiment.regression, experiment.evaluation)
            )
    return assets


def experiment_jobs(experiment: Experiment) -> list[dg.UnresolvedAssetJobDefinition]:
    """``<name>_train`` (store and training partitions), ``<name>_fit`` (dataset and
    datamodels, when the experiment has a regression) and ``<name>_all`` (everything)."""
    name = experiment.name
    train = dg.AssetSelection.assets(
        dg.AssetKey([name, "store"]), dg.AssetKey([name, "model_outputs"])
    )
    jobs = [
        dg.define_asset_job(
            f"{name}_train",
            selection=train,
            description=f"Initialize the store of {name!r} and train the selected partitions.",
        )
    ]
    if experiment.regression is not None:
        dataset_key = dg.AssetKey([name, "regression_dataset"])
        fit_keys = [dg.AssetKey([name, "datamodels"])]
        if experiment.evaluation is not None:
            fit_keys.append(dg.AssetKey([name, "datamodel_eval"]))
        if experiment.slice_keys():
            # the slices' partitions differ from the models': a job of their own, after the
            # dataset (which must not be rewritten while slices read it) and before the merge
            jobs.append(
                dg.define_asset_job(
                    f"{name}_dataset",
                    selection=dg.AssetSelection.assets(dataset_key),
                    description=f"Write the dataset of {name!r}'s completed models.",
                )
            )
            jobs.append(
                dg.define_asset_job(
                    f"{name}_slices",
                    selection=dg.AssetSelection.assets(dg.AssetKey([name, "datamodel_slices"])),
                    description=f"Fit the selected target slices of {name!r}, each on its own "
                    "device slot (a backfill runs them in parallel).",
                )
            )
        else:
            fit_keys.insert(0, dataset_key)
        jobs.append(
            dg.define_asset_job(
                f"{name}_fit",
                selection=dg.AssetSelection.assets(*fit_keys),
                description=f"Fit (or merge the slices of) {name!r}'s datamodels from its "
                "completed models and evaluate them on held-out models.",
            )
        )
    jobs.append(
        dg.define_asset_job(
            f"{name}_all",
            selection=dg.AssetSelection.groups(name),
            description=f"Everything of {name!r}: store, the selected training partitions, "
            "dataset, datamodels.",
        )
    )
    return jobs
