"""The training half of an experiment's graph: ``<name>/store`` and ``<name>/model_outputs``."""

import statistics
import time
import warnings

import dagster as dg

from dm_assets.pipeline.experiment import Experiment
from dm_assets.pipeline.resources.device_slots import GPU_POOL
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.slurm_trainer import SlurmTrainer
from dm_assets.pipeline.resources.trainers import LocalTrainer
from dm_assets.store.store import Store, StoreError

# the resource key of each launcher kind (experiment field launcher.kind)
LAUNCHER_RESOURCE_KEYS = {"local": "trainer", "slurm": "slurm_trainer"}


def store_metadata(store: Store) -> dict[str, dg.MetadataValue]:
    status = store.status()
    files = [store.path / f"{key}.npy" for key in store.spec.schema]
    nbytes = sum(f.stat().st_size for f in files if f.exists())
    shapes = ", ".join(
        f"{key}: {a.dtype.name} {(store.spec.num_models, *a.shape)}"
        for key, a in store.spec.schema.items()
    )
    return {
        "path": dg.MetadataValue.path(str(store.path)),
        "num_models": dg.MetadataValue.int(store.spec.num_models),
        "arrays": dg.MetadataValue.text(shapes),
        "bytes": dg.MetadataValue.int(nbytes),
        "completed": dg.MetadataValue.int(status.completed),
        "fraction_completed": dg.MetadataValue.float(status.fraction_completed),
    }


def training_assets(experiment: Experiment) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """``store``, ``model_outputs`` (partitioned by blocks of model indices) and the store
    completeness check, keys prefixed with the experiment's name."""
    name = experiment.name
    partitions = dg.StaticPartitionsDefinition(experiment.partition_keys())
    store_key = dg.AssetKey([name, "store"])
    outputs_key = dg.AssetKey([name, "model_outputs"])

    @dg.asset(
        key=store_key,
        group_name=name,
        description=f"The memory-mapped store of experiment {name!r}: one row per model "
        f"({experiment.num_models}) for each key of the spec, plus completion flags. "
        "Initialized once; materializing again reopens it and never wipes a row.",
        kinds={"numpy"},
    )
    def store(context: dg.AssetExecutionContext, home: HomeResource) -> dg.MaterializeResult:
        paths = experiment.paths(home.path or None)
        try:
            with Store.initialize(paths.store, experiment.spec) as opened:
                meta = store_metadata(opened)
        except StoreError as exc:
            raise dg.Failure(description=str(exc)) from exc
        context.log.info("store at %s", paths.store)
        return dg.MaterializeResult(metadata=meta)

    # the launcher resource this experiment trains with: local worker processes, or SLURM
    launcher_key = LAUNCHER_RESOURCE_KEYS[experiment.launcher.kind]
    with warnings.catch_warnings():
        # BackfillPolicy is marked beta; it is how a backfill groups partitions into runs
        warnings.simplefilter("ignore", dg.BetaWarning)
        outputs_decorator = dg.asset(
            key=outputs_key,
            group_name=name,
            deps=[store_key],
            partitions_def=partitions,
            backfill_policy=dg.BackfillPolicy.multi_run(experiment.max_partitions_per_run),
            pool=GPU_POOL,
            description=f"Rows of the store of {name!r} written by training: a partition is a "
            f"block of {experiment.models_per_partition} consecutive model indices, trained with "
            f"{experiment.trainer.main_import}.main(index, logdir) in worker processes, one per "
            "device slot. Completed models are skipped.",
            kinds={"pytorch"},
            required_resource_keys={"home", launcher_key},
        )

    @outputs_decorator
    def model_outputs(context: dg.AssetExecutionContext):
        home: HomeResource = context.resources.home
        trainer: LocalTrainer | SlurmTrainer = getattr(context.resources, launcher_key)
        if isinstance(trainer, SlurmTrainer) and experiment.launcher.overrides():
            trainer = trainer.model_copy(update=experiment.launcher.overrides())
        paths = experiment.paths(home.path or None)
        keys = context.partition_keys
        indices = [i for key in keys for i in Experiment.partition_indices(key)]
        started = time.perf_counter()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] >= trainer.progress_every or done == total:
                last[0] = now
                context.log.info(
                    "%s: %d / %d models done (%.0f s)", name, done, total, now - started
                )

        report = trainer.train(experiment, paths, indices, log=context.log, on_progress=progress)
        seconds = list(report.seconds_per_model.values())
        meta: dict[str, dg.MetadataValue] = {
            "partitions": dg.MetadataValue.int(len(keys)),
            "models": dg.MetadataValue.int(len(indices)),
            "trained": dg.MetadataValue.int(len(report.trained)),
            "skipped": dg.MetadataValue.int(len(report.skipped)),
            "failed": dg.MetadataValue.int(len(report.failed)),
            "seconds_per_model": dg.MetadataValue.float(
                statistics.fmean(seconds) if seconds else 0.0
            ),
            "wall_seconds": dg.MetadataValue.float(report.wall_seconds),
            "worker_processes": dg.MetadataValue.int(report.processes),
        }
        context.log.info("%s: %s", name, report.summary())
        if report.failed:
            failed = set(report.failed)
            for key in keys:
                if not failed.intersection(Experiment.partition_indices(key)):
                    # its models are all stored: this partition is done even though the run fails
                    yield dg.AssetMaterialization(asset_key=outputs_key, partition=key)
            detail = "\n".join(f"  model {i}: {why}" for i, why in sorted(report.failed.items()))
            raise dg.Failure(
                description=f"{len(report.failed)} model(s) still failing after "
                f"{experiment.trainer.retries} retry round(s): {sorted(report.failed)}; every "
                f"other model of this run is stored.\n{detail}",
                metadata=meta,
            )
        yield dg.MaterializeResult(metadata=meta)

    minimum = experiment.checks.min_completed_fraction

    @dg.asset_check(
        asset=outputs_key,
        name="store_completeness",
        description=f"At least {minimum:.0%} of the experiment's models are completed in the "
        "store (over every partition, not only this run's).",
        additional_deps=[store_key],
    )
    def store_completeness(home: HomeResource) -> dg.AssetCheckResult:
        paths = experiment.paths(home.path or None)
        with Store.open(paths.store) as opened:
            status = opened.status()
        return dg.AssetCheckResult(
            passed=status.fraction_completed >= minimum,
            # a warning: training a few partitions at a time is normal, not an error
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "completed": status.completed,
                "num_models": status.num_models,
                "fraction_completed": status.fraction_completed,
                "required_fraction": minimum,
                "missing": status.format_missing(),
            },
        )

    return [store, model_outputs, store_completeness]
