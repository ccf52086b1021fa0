"""Asset factories: one group of assets and checks per experiment (its jobs:
:mod:`dm_assets.pipeline.jobs`)."""

from __future__ import annotations

import dagster as dg

from dm_assets.pipeline.assets.attributions import attribution_assets
from dm_assets.pipeline.assets.datamodel_eval import evaluation_assets
from dm_assets.pipeline.assets.datamodels import regression_assets
from dm_assets.pipeline.assets.model_outputs import training_assets
from dm_assets.pipeline.experiment import Experiment
from dm_assets.pipeline.resources.device_slots import GPU_POOL
from dm_assets.pipeline.resources.experiment_home import HomeResource

__all__ = ["GPU_POOL", "HomeResource", "experiment_assets"]


def experiment_assets(
    experiment: Experiment,
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """The experiment's assets and checks, keys prefixed with its name: ``store``,
    ``model_outputs`` and, when it has a regression section, ``regression_dataset`` and
    ``datamodels`` (and ``datamodel_eval`` with an evaluation section, ``attributions`` with
    an attributions section)."""
    assets = training_assets(experiment)
    if experiment.regression is not None:
        assets.extend(regression_assets(experiment, experiment.regression))
        if experiment.evaluation is not None:
            assets.extend(
                evaluation_assets(experiment, experiment.regression, experiment.evaluation)
            )
            if experiment.attributions is not None:
                assets.extend(
                    attribution_assets(
                        experiment,
                        experiment.regression,
                        experiment.evaluation,
                        experiment.attributions,
                    )
                )
    return assets
