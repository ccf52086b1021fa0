"""The Dagster definitions: every experiment's assets, checks and jobs, and the resources.

``dagster dev -w workspace.yaml`` loads this module. Experiments are the shipped
``dm_assets/experiments/*.yaml`` (left out with ``DM_SHIPPED_EXPERIMENTS=0``, so a deployment
shows only its own) plus those named by ``$DM_EXPERIMENTS``; data goes under ``$DM_HOME``
(default ``.dm/`` in the working directory). See :mod:`dm_assets.pipeline.experiment`.
"""

from __future__ import annotations

import dagster as dg

from dm_assets.home import dm_home
from dm_assets.pipeline.assets import experiment_assets
from dm_assets.pipeline.experiment import Experiment, load_experiments
from dm_assets.pipeline.jobs import experiment_jobs
from dm_assets.pipeline.resources.device_slots import DeviceSlotsResource
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking
from dm_assets.pipeline.resources.trainers import LocalTrainer, SlurmTrainer


def default_resources(home: str | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources every experiment uses, all rooted at ``home`` (default ``$DM_HOME``)."""
    root = str(dm_home(home))
    devices = DeviceSlotsResource(lock_dir=str(dm_home(root) / "locks"))
    return {
        "home": HomeResource(path=root),
        "devices": devices,
        "trainer": LocalTrainer(devices=devices),
        # used by experiments with `launcher: {kind: slurm}`; SLURM_CONF etc. from the
        # environment Dagster runs in (set `env` here to pass others to the tasks)
        "slurm_trainer": SlurmTrainer(),
        "tracking": MlflowTracking(home=root),
    }


def build_definitions(
    experiments: list[Experiment], resources: dict[str, dg.ConfigurableResource] | None = None
) -> dg.Definitions:
    assets: list[dg.AssetsDefinition | dg.AssetChecksDefinition] = []
    jobs: list[dg.UnresolvedAssetJobDefinition] = []
    for experiment in experiments:
        assets.extend(experiment_assets(experiment))
        jobs.extend(experiment_jobs(experiment))
    return dg.Definitions(
        assets=[a for a in assets if not isinstance(a, dg.AssetChecksDefinition)],
        asset_checks=[a for a in assets if isinstance(a, dg.AssetChecksDefinition)],
        jobs=jobs,
        resources=resources if resources is not None else default_resources(),
        # one process per run: training happens in worker subprocesses already, and a step
        # process per asset would add seconds of imports to every run
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_experiments())


def job_names() -> list[str]:
    """The names of the jobs of :data:`defs`."""
    return [job.name for job in defs.jobs or []]


def job_definition(name: str) -> dg.JobDefinition:
    """The job ``name`` of :data:`defs`, resolved: what a run worker
    (:mod:`dm_assets.pipeline.run_worker`) reconstructs and executes."""
    return defs.resolve_job_def(name)
