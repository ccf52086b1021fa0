"""The training half of an experiment's graph: ``<name>/store`` and ``<name>/model_outputs``."""

import warnings

import dagster as dg

from dm_assets.pipeline.experiment import Experiment
from dm_assets.pipeline.resources.device_slots import GPU_POOL
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.trainers import Trainer, trainer_resource_key
from dm_assets.store.store import Store, StoreError
from dm_assets.training.launcher import completed_blocks, progress_lines


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

    # the trainer resource this experiment trains with: local worker processes, or SLURM
    trainer_key = trainer_resource_key(experiment.launcher)
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
            required_resource_keys={"home", trainer_key},
        )

    @outputs_decorator
    def model_outputs(context: dg.AssetExecutionContext):
        home: HomeResource = context.resources.home
        trainer: Trainer = getattr(context.resources, trainer_key)
        paths = experiment.paths(home.path or None)
        blocks = {key: Experiment.partition_indices(key) for key in context.partition_keys}
        indices = [i for block in blocks.values() for i in block]
        report = trainer.train(
            experiment,
            paths,
            indices,
            log=context.log,
            on_progress=progress_lines(context.log.info, name, trainer.progress_every),
        )
        meta: dict[str, dg.MetadataValue] = {
            "partitions": dg.MetadataValue.int(len(blocks)),
            "models": dg.MetadataValue.int(len(indices)),
            "trained": dg.MetadataValue.int(len(report.trained)),
            "skipped": dg.MetadataValue.int(len(report.skipped)),
            "failed": dg.MetadataValue.int(len(report.failed)),
            "seconds_per_model": dg.MetadataValue.float(report.mean_seconds_per_model),
            "wall_seconds": dg.MetadataValue.float(report.wall_seconds),
            "worker_processes": dg.MetadataValue.int(report.processes),
        }
        context.log.info("%s: %s", name, report.summary())
        if report.failed:
            # their models are all stored: these partitions are done even though the run fails
            for key in completed_blocks(report, blocks):
                yield dg.AssetMaterialization(asset_key=outputs_key, partition=key)
            raise dg.Failure(
                description=report.failure_text(experiment.trainer.retries), metadata=meta
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
