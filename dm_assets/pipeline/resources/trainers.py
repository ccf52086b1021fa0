"""The training launcher as a Dagster resource: runs a block of model indices and reports.

:class:`LocalTrainer` trains on this machine: one worker process per leased device slot
(:mod:`dm_assets.training.local`). A cluster launcher (SLURM) offers the same ``train`` method.
"""

import logging
import sys
from collections.abc import Callable, Sequence

import dagster as dg
from pydantic import Field

from dm_assets.pipeline.experiment import Experiment, ExperimentPaths
from dm_assets.pipeline.resources.device_slots import DeviceSlotsResource
from dm_assets.training.local import TrainingReport, train_models


class LocalTrainer(dg.ConfigurableResource):
    """Trains models in worker processes on this machine's device slots."""

    devices: dg.ResourceDependency[DeviceSlotsResource]
    python: str = Field(default="", description="interpreter for the workers (default: this one)")
    progress_every: float = Field(
        default=5.0, gt=0, description="seconds between progress lines in the run's log"
    )

    def train(
        self,
        experiment: Experiment,
        paths: ExperimentPaths,
        indices: Sequence[int],
        *,
        log: logging.Logger | dg.DagsterLogManager,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> TrainingReport:
        lease = self.devices.acquire(
            experiment.devices,
            max_count=max(1, len(indices)),
            on_wait=lambda message: log.info("waiting for a device slot: %s", message),
        )
        with lease:
            log.info(
                "training %d model(s) on %s", len(indices), ", ".join(d.name for d in lease.devices)
            )
            trainer = experiment.trainer
            return train_models(
                paths.store,
                list(indices),
                main_import=trainer.main_import,
                script_args=trainer.script_args(),
                lease=lease,
                job_timeout=trainer.job_timeout,
                retries=trainer.retries,
                commit_every=trainer.commit_every,
                threads_per_worker=experiment.devices.threads_per_worker,
                log_dir=paths.launcher_logs,
                on_progress=on_progress,
                progress_every=self.progress_every,
                python=self.python or sys.executable,
            )
