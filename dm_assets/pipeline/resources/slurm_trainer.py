"""The SLURM launcher as a Dagster resource: trains a block of model indices as job arrays.

:class:`SlurmTrainer` offers the ``train`` method of
:class:`~dm_assets.pipeline.resources.trainers.LocalTrainer` and runs
:func:`dm_assets.training.slurm.train_models_slurm`: the store, the launcher logs, the interpreter
and the training script must be on a filesystem the cluster's nodes share.
"""

import logging
import sys
from collections.abc import Callable, Sequence

import dagster as dg
from pydantic import Field

from dm_assets.pipeline.experiment import Experiment, ExperimentPaths
from dm_assets.training.local import TrainingReport
from dm_assets.training.slurm import SbatchOptions, train_models_slurm


class SlurmTrainer(dg.ConfigurableResource):
    """Trains models as SLURM job arrays, ``indices_per_task`` models per array task."""

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
    ) -> TrainingReport:
        trainer = experiment.trainer
        log.info(
            "training %d model(s) as SLURM job arrays, %d per task (logs in %s)",
            len(indices),
            self.indices_per_task,
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
            indices_per_task=self.indices_per_task,
            sbatch=self.sbatch_options(),
            log_dir=paths.launcher_logs,
            on_progress=on_progress,
            poll=self.poll_seconds,
            python=self.python or sys.executable,
            env=self.env,
            workdir=self.workdir or None,
        )
