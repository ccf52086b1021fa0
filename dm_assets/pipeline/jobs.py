"""An experiment's jobs, defined once: the table :func:`job_specs` (names, the assets each
selects, the partition keys each runs over) and the Dagster jobs built from it
(:func:`experiment_jobs`).

``dm_assets.launch`` reads the table to check a job's name and partitions before it starts
Dagster; the definitions build the jobs. Per experiment ``<name>``:

=================  ============================================  ==========================
job                selects                                       partition keys
=================  ============================================  ==========================
``<name>_train``   ``store``, ``model_outputs``                  blocks of models
``<name>_dataset`` ``regression_dataset`` (sliced fits only)     none
``<name>_slices``  ``datamodel_slices`` (sliced fits only)       slices of targets
``<name>_fit``     [``regression_dataset``], ``datamodels``,     none
                   [``datamodel_eval``]
``<name>_all``     the group ``<name>`` (not the slices)         blocks of models
=================  ============================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dm_assets.pipeline.experiment import Experiment

if TYPE_CHECKING:
    import dagster as dg


@dataclass(frozen=True)
class JobSpec:
    """One job of an experiment.

    ``name``: the Dagster job's name (``<experiment>_<kind>``); ``asset_names``: the assets it
    selects, by their name under the experiment's key prefix (empty when it selects ``group``
    instead); ``group``: the asset group it selects, or None; ``partition_keys``: the keys it
    runs over, in order (empty: the job's assets are not partitioned); ``description``: shown
    in the Dagster UI.
    """

    name: str
    experiment: str
    asset_names: tuple[str, ...]
    partition_keys: tuple[str, ...]
    description: str
    group: str | None = None


def job_specs(experiment: Experiment) -> list[JobSpec]:
    """``<name>_train`` (store and training partitions), ``<name>_fit`` (dataset and
    datamodels, when the experiment has a regression; with target slices ``<name>_dataset`` and
    ``<name>_slices`` come before it and ``<name>_fit`` only merges and evaluates) and
    ``<name>_all`` (everything but the slices), in that order."""
    name = experiment.name
    models = tuple(experiment.partition_keys())
    specs = [
        JobSpec(
            name=f"{name}_train",
            experiment=name,
            asset_names=("store", "model_outputs"),
            partition_keys=models,
            description=f"Initialize the store of {name!r} and train the selected partitions.",
        )
    ]
    if experiment.regression is not None:
        fit = ["datamodels"]
        if experiment.evaluation is not None:
            fit.append("datamodel_eval")
        slices = tuple(experiment.slice_keys())
        if slices:
            # the slices' partitions differ from the models': a job of their own, after the
            # dataset (which must not be rewritten while slices read it) and before the merge
            specs.append(
                JobSpec(
                    name=f"{name}_dataset",
                    experiment=name,
                    asset_names=("regression_dataset",),
                    partition_keys=(),
                    description=f"Write the dataset of {name!r}'s completed models.",
                )
            )
            specs.append(
                JobSpec(
                    name=f"{name}_slices",
                    experiment=name,
                    asset_names=("datamodel_slices",),
                    partition_keys=slices,
                    description=f"Fit the selected target slices of {name!r}, each on its own "
                    "device slot (a backfill runs them in parallel).",
                )
            )
        else:
            fit.insert(0, "regression_dataset")
        specs.append(
            JobSpec(
                name=f"{name}_fit",
                experiment=name,
                asset_names=tuple(fit),
                partition_keys=(),
                description=f"Fit (or merge the slices of) {name!r}'s datamodels from its "
                "completed models and evaluate them on held-out models.",
            )
        )
    specs.append(
        JobSpec(
            name=f"{name}_all",
            experiment=name,
            asset_names=(),
            group=name,
            partition_keys=models,
            description=f"Everything of {name!r}: store, the selected training partitions, "
            "dataset, datamodels.",
        )
    )
    return specs


def experiment_jobs(experiment: Experiment) -> list[dg.UnresolvedAssetJobDefinition]:
    """The Dagster jobs of :func:`job_specs`, asset keys prefixed with the experiment's name."""
    # imported here: launch reads job_specs without loading Dagster
    import dagster as dg

    jobs = []
    for spec in job_specs(experiment):
        selection: dg.AssetSelection
        if spec.group is not None:
            selection = dg.AssetSelection.groups(spec.group)
        else:
            selection = dg.AssetSelection.assets(
                *(dg.AssetKey([spec.experiment, asset]) for asset in spec.asset_names)
            )
        jobs.append(
            dg.define_asset_job(spec.name, selection=selection, description=spec.description)
        )
    return jobs
