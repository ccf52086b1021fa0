"""The training launchers as Dagster resources: one interface, a resource per transport.

:class:`Trainer` is what the ``model_outputs`` asset needs: ``train(experiment, paths, indices,
...)`` trains a block of model indices into the experiment's store and returns a
:class:`~dm_assets.training.launcher.TrainingReport`. Two resources offer it:

- :class:`LocalTrainer` (resource key ``trainer``): one worker process per leased device slot
  on this machine (:func:`dm_assets.training.local.train_models`);
- :class:`SlurmTrainer` (resource key ``slurm_trainer``): SLURM job arrays
  (:func:`dm_assets.training.slurm.train_models_slurm`); the store, the launcher logs, the
  interpreter and the training script must be on a filesystem the cluster's nodes share.

An experiment picks one with ``launcher: {kind: local|slurm}``; :func:`trainer_resource_key`
is the one place that maps the kind to the resource key.
"""

import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence

import dagster as dg
from pydantic import Field

from dm_assets.pipeline.experiment import Experiment, ExperimentPaths, LauncherSettings
from dm_assets.pipeline.resources.device_slots import DeviceSlotsResource
from dm_assets.training.launcher import TrainingReport
from dm_assets.training.local import train_models
from dm_assets.training.slurm import SbatchOptions, train_models_slurm


def trainer_resource_key(launcher: LauncherSettings) -> str:
    """The resource key of the trainer an experiment's ``launcher`` section names:
    ``trainer`` (kind ``local``) or ``slurm_trainer`` (kind ``slurm``)."""
    return {"local": "trainer", "slurm": "slurm_trainer"}[launcher.kind]


def worker_on_change(experiment: Experiment) -> str | None:
    """The ``--worker.on_change`` the experiment's workers get: None (left out) for the
    workers' own default, ``refuse``."""
    on_change = experiment.trainer.on_change
    return None if on_change == "refuse" else on_change


class Trainer(dg.ConfigurableResource, ABC):
    """Trains blocks of model indices into an experiment's store."""

    progress_every: float = Field(
        default=5.0, gt=0, description="seconds between progress lines in the run's log"
    )

    @abstractmethod
    def train(
        self,
        experiment: Experiment,
        paths: ExperimentPaths,
        indices: Sequence[int],
        *,
        log: logging.Logger | dg.DagsterLogManager,
        on_progress: Callable[[int, int], None] | None = None,
        replace_configurations: Collection[int] = (),
    ) -> TrainingReport:
        """Train ``indices`` (those not yet completed) of the store at ``paths.store`` with
        ``experiment``'s trainer settings, saying what it does on ``log`` and calling
        ``on_progress(done, total)`` as models complete; what happened to each index.

        The workers get ``trainer.version`` and ``trainer.on_change`` (``--worker.version``,
        ``--worker.on_change``); completed rows written under a configuration id in
        ``replace_configurations`` are trained again, not skipped (``on_change: retrain``)."""


class LocalTrainer(Trainer):
    """Trains models in worker processes on this machine's device slots."""

    devices: dg.ResourceDependency[DeviceSlotsResource]
    python: str = Field(default="", description="interpreter for the workers (default: this one)")

    def train(
        self,
        experiment: Experiment,
        paths: ExperimentPaths,
        indices: Sequence[int],
        *,
        log: logging.Logger | dg.DagsterLogManager,
        on_progress: Callable[[int, int], None] | None = None,
        replace_configurations: Collection[int] = (),
    ) -> TrainingReport:
        lease = self.devices.acquire(
            experiment.devices,
            max_count=max(1, len(indices)),
            on_wait=lambda message: log.info("waiting for a device slot: %s", message),
        )
        with lease:
            log.info("workers on %s", ", ".join(d.name for d in lease.devices))
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
                version=trainer.version,
                on_change=worker_on_change(experiment),
                replace_configurations=replace_configurations,
            )


class SlurmTrainer(Trainer):
    """Trains models as SLURM job arrays, ``indices_per_task`` models per array task. The
    fields an experiment's ``launcher`` section sets override this resource's for it."""

    partition: str = Field(default="", description="sbatch --partition (empty: the default)")
    account: str = Field(default="", description="sbatch --account (empty: the default)")
    time_limit: str = Field(
        default="",
        description="sbatch --time per task: minutes, HH:MM:SS or D-HH:MM:SS (empty: the "
        "partition's); a task past it is killed and its unfinished models retried",
    )
    cpus_per_task: int | None = Field(default=None, ge=1, description="sbatch --cpus-per-task")
    gpus_per_task: int | None = Field(default=None, ge=1, description="sbatch --gpus-per-task")
    mem: str = Field(default="", description="sbatch --mem per task, e.g. 8G (empty: default)")
    max_concurrent: int | None = Field(
        default=None, ge=1, description="array tasks running at once (sbatch --array=...%N)"
    )
    job_name: str = Field(default="dm_assets", description="sbatch --job-name")
    extra_sbatch_args: list[str] = Field(
        default_factory=list, description="more sbatch arguments, verbatim (--qos=low, ...)"
    )
    indices_per_task: int = Field(
        default=10,
        ge=1,
        description="models per array task: one Python start-up and script import per task",
    )
    poll_seconds: float = Field(
        default=15.0, gt=0, description="seconds between squeue polls (and progress calls)"
    )
    progress_every: float = Field(
        default=30.0, gt=0, description="seconds between progress lines in the run's log"
    )
    python: str = Field(
        default="", description="interpreter on the nodes (default: this one; shared path)"
    )
    workdir: str = Field(
        default="", description="the tasks' working directory (default: the current one)"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="variables for SLURM's commands and the tasks (SLURM_CONF, PYTHONPATH, ...)",
    )

    def sbatch_options(self) -> SbatchOptions:
        return SbatchOptions(
            partition=self.partition or None,
            account=self.account or None,
            time_limit=self.time_limit or None,
            cpus_per_task=self.cpus_per_task,
            gpus_per_task=self.gpus_per_task,
            mem=self.mem or None,
            max_concurrent=self.max_concurrent,
            job_name=self.job_name,
            extra=tuple(self.extra_sbatch_args),
        )

    def train(
        self,
        experiment: Experiment,
        paths: ExperimentPaths,
        indices: Sequence[int],
        *,
        log: logging.Logger | dg.DagsterLogManager,
        on_progress: Callable[[int, int], None] | None = None,
        replace_configurations: Collection[int] = (),
    ) -> TrainingReport:
        overrides = experiment.launcher.overrides()
        settings = self.model_copy(update=overrides) if overrides else self
        trainer = experiment.trainer
        log.info(
            "training %d model(s) as SLURM job arrays, %d per task (logs in %s)",
            len(indices),
            settings.indices_per_task,
            paths.launcher_logs / "slurm",
        )
        return train_models_slurm(
            paths.store,
            list(indices),
            main_import=trainer.main_import,
            script_args=trainer.script_args(),
            job_timeout=trainer.job_timeout,
            retries=trainer.retries,
            commit_every=trainer.commit_every,
            indices_per_task=settings.indices_per_task,
            sbatch=settings.sbatch_options(),
            log_dir=paths.launcher_logs,
            on_progress=on_progress,
            poll=settings.poll_seconds,
            python=settings.python or sys.executable,
            env=settings.env,
            workdir=settings.workdir or None,
            version=trainer.version,
            on_change=worker_on_change(experiment),
            replace_configurations=replace_configurations,
        )
