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

from collections.abc import Sequence
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
    runs over, in order (empty: the job's assets are not partitioned); ``description``: what
    the job is for, shown in the Dagster UI followed by the assets it materializes
    (:func:`experiment_jobs` lists them from the asset definitions).
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
        fit_text = f"Fit the datamodels of {name!r} from its completed models"
        if slices:
            fit_text += " (merging its target slices)"
        fit_text += "; evaluate them on held-out models." if experiment.evaluation else "."
        specs.append(
            JobSpec(
                name=f"{name}_fit",
                experiment=name,
                asset_names=tuple(fit),
                partition_keys=(),
                description=fit_text,
            )
        )
    specs.append(
        JobSpec(
            name=f"{name}_all",
            experiment=name,
            asset_names=(),
            group=name,
            partition_keys=models,
            description=f"Everything of {name!r} but its target slices, over the selected "
            "training partitions. Launched as a single run over a range of partitions, it "
            "runs everything in one run; a backfill runs each stage (the store, the training "
            "partitions, the fit) as a run of its own, each started by a tick of the backfill "
            "daemon (every 30 s).",
        )
    )
    return specs


def materialized(
    spec: JobSpec, assets: Sequence[dg.AssetsDefinition | dg.AssetChecksDefinition]
) -> list[str]:
    """The names (last key component) of the assets among ``assets`` that ``spec`` selects:
    those of its group, or its ``asset_names``; in the order of ``assets`` (upstream first)."""
    import dagster as dg

    names = []
    for definition in assets:
        if not isinstance(definition, dg.AssetsDefinition):
            continue
        for key in definition.keys:
            if key.path[0] != spec.experiment:
                continue
            if spec.group is not None:
                chosen = definition.group_names_by_key.get(key) == spec.group
            else:
                chosen = key.path[-1] in spec.asset_names
            if chosen:
                names.append(key.path[-1])
    return names


def experiment_jobs(
    experiment: Experiment,
    assets: Sequence[dg.AssetsDefinition | dg.AssetChecksDefinition] | None = None,
) -> list[dg.UnresolvedAssetJobDefinition]:
    """The Dagster jobs of :func:`job_specs`, asset keys prefixed with the experiment's name;
    each description ends with ``Materializes: store, model_outputs.``, the assets its
    selection picks among ``assets`` (default: the experiment's,
    :func:`~dm_assets.pipeline.assets.experiment_assets`)."""
    # imported here: launch reads job_specs without loading Dagster
    import dagster as dg

    if assets is None:
        from dm_assets.pipeline.assets import experiment_assets

        assets = experiment_assets(experiment)
    jobs = []
    for spec in job_specs(experiment):
        selection: dg.AssetSelection
        if spec.group is not None:
            selection = dg.AssetSelection.groups(spec.group)
        else:
            selection = dg.AssetSelection.assets(
                *(dg.AssetKey([spec.experiment, asset]) for asset in spec.asset_names)
            )
        description = f"{spec.description} Materializes: {', '.join(materialized(spec, assets))}."
        jobs.append(dg.define_asset_job(spec.name, selection=selection, description=description))
    return jobs
