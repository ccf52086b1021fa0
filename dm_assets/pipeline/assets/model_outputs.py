"""The training half of an experiment's graph: ``<name>/store`` and ``<name>/model_outputs``.

Before training anything, ``model_outputs`` compares the experiment's training configuration
(:func:`~dm_assets.pipeline.assets.versions.training_configuration`) with the configurations
recorded for the store's completed rows
(:func:`~dm_assets.training.configuration.find_configuration_conflicts`); ``trainer.on_change``
decides: ``refuse`` fails the run naming every difference and the remedies, ``retrain`` trains
the selected partitions' rows of other configurations again (the workers replace them), ``mix``
trains what is missing and says so in the metadata. Code and data versions: see
:mod:`dm_assets.pipeline.assets.versions`.
"""

import warnings
from collections.abc import Sequence

import dagster as dg
import numpy as np

from dm_assets.pipeline import warmup
from dm_assets.pipeline.assets.versions import (
    configuration_counts,
    describe_counts,
    outputs_code_version,
    rows_data_version,
    store_code_version,
    store_data_version,
    training_configuration,
)
from dm_assets.pipeline.experiment import Experiment
from dm_assets.pipeline.resources.device_slots import GPU_POOL
from dm_assets.pipeline.resources.experiment_home import HomeResource
from dm_assets.pipeline.resources.trainers import Trainer, trainer_resource_key
from dm_assets.store.store import Store, StoreError
from dm_assets.training.configuration import (
    ConfigurationChangedError,
    ConfigurationError,
    find_configuration_conflicts,
)
from dm_assets.training.launcher import (
    TrainingReport,
    completed_blocks,
    plan_text,
    progress_lines,
)


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits, for display (0.08381494807759989 ->
    0.08381); NaN and infinities unchanged."""
    return float(f"{value:.{digits}g}")


def partition_counts(report: TrainingReport, block: Sequence[int]) -> dict[str, dg.MetadataValue]:
    """The counts of one partition (``block``: its model indices) in ``report``: ``models``
    (the block's size) and how many of them were ``trained``, ``skipped`` and ``failed``."""
    members = set(block)
    return {
        "models": dg.MetadataValue.int(len(block)),
        "trained": dg.MetadataValue.int(sum(i in members for i in report.trained)),
        "skipped": dg.MetadataValue.int(sum(i in members for i in report.skipped)),
        "failed": dg.MetadataValue.int(sum(i in members for i in report.failed)),
    }


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


EXPERIMENT_REMEDIES = (
    "set trainer.on_change: retrain in the experiment to train the selected partitions' models "
    "of other configurations again (each row replaced)",
    "or trainer.on_change: mix to keep them and train only the missing models (recorded as mixed)",
    "or give the experiment a new name (a new store), or undo the change",
)


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
        f"({experiment.num_models}) for each key of the spec, plus completion flags and the "
        "id of the training configuration of each row. Initialized once; materializing again "
        "reopens it and never wipes a row; a larger num_models in the experiment grows it in "
        "place (every row kept), a smaller one is refused.",
        kinds={"numpy"},
        code_version=store_code_version(experiment),
    )
    def store(context: dg.AssetExecutionContext, home: HomeResource) -> dg.MaterializeResult:
        paths = experiment.paths(home.path or None)
        wanted = experiment.num_models
        before = None
        if (paths.store / "spec.json").exists():
            try:
                with Store.open(paths.store) as existing:
                    before = existing.spec.num_models
            except StoreError as exc:
                raise dg.Failure(description=str(exc)) from exc
        if before is not None and before > wanted:
            raise dg.Failure(
                description=f"experiment {name!r} asks for num_models = {wanted}, but its store "
                f"at {paths.store} already holds {before} models: a store never shrinks. Set "
                f"num_models back to {before} or more in {experiment.source}, or give the "
                "experiment a new name for a new store."
            )
        try:
            with Store.initialize(paths.store, experiment.spec, grow=True) as opened:
                meta = store_metadata(opened)
        except StoreError as exc:
            raise dg.Failure(description=str(exc)) from exc
        if before is not None and before < wanted:
            context.log.info(
                "grew the store at %s from %d to %d models", paths.store, before, wanted
            )
            meta["grown_from"] = dg.MetadataValue.int(before)
        context.log.info("store at %s", paths.store)
        return dg.MaterializeResult(metadata=meta, data_version=store_data_version(experiment))

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
            code_version=outputs_code_version(experiment),
        )

    @outputs_decorator
    def model_outputs(context: dg.AssetExecutionContext):
        home: HomeResource = context.resources.home
        trainer: Trainer = getattr(context.resources, trainer_key)
        paths = experiment.paths(home.path or None)
        blocks = {key: Experiment.partition_indices(key) for key in context.partition_keys}
        indices = [i for block in blocks.values() for i in block]
        on_change = experiment.trainer.on_change
        try:
            current = training_configuration(experiment)
            with Store.open(paths.store) as opened:
                conflicts = find_configuration_conflicts(opened, current)
            if conflicts and on_change == "refuse":
                raise ConfigurationChangedError(paths.store, conflicts, EXPERIMENT_REMEDIES)
        except (ConfigurationError, ConfigurationChangedError, StoreError) as exc:
            raise dg.Failure(description=str(exc)) from exc
        others = {c.configuration_id: np.asarray(c.indices) for c in conflicts}
        replace = frozenset(others) if on_change == "retrain" else frozenset()
        selected = np.asarray(indices, dtype=np.int64)
        to_replace = sum(int(np.isin(others[c], selected).sum()) for c in replace)
        try:
            with Store.open(paths.store) as opened:
                plan = plan_text(opened, indices, replace)
        except StoreError as exc:
            raise dg.Failure(description=str(exc)) from exc
        context.log.info("%s: %s", name, plan)
        if others:
            context.log.warning(
                "%s: the store holds models of %d other training configuration(s) (%s); "
                "trainer.on_change: %s%s",
                name,
                len(others),
                describe_counts({c: len(r) for c, r in others.items()}),
                on_change,
                f": retraining {to_replace} of them in the selected partitions"
                if on_change == "retrain"
                else ": kept beside the new ones (mixed)",
            )
        with warmup.while_training(context, name) as warmed:
            report = trainer.train(
                experiment,
                paths,
                indices,
                log=context.log,
                on_progress=progress_lines(context.log.info, name, trainer.progress_every),
                replace_configurations=replace,
            )
        if warmed():
            context.log.debug(
                "%s: the fit's modules and kernels loaded in the background while the models "
                "trained (dm_assets.pipeline.warmup)",
                name,
            )
        with Store.open(paths.store) as opened:
            completed = opened.completed_mask()[selected]
            ids = opened.configuration_ids(selected)
            store_ids = opened.configuration_ids()[opened.completed_mask()]
            current_id = opened.configuration_id(current)
        present = configuration_counts(ids[completed])
        # each partition's own counts; the run's totals (every partition of this run) are
        # the run_* entries of the metadata every partition shares
        own: dict[str, dict[str, dg.MetadataValue]] = {}
        for key, block in blocks.items():
            first = block[0] - indices[0]
            part = slice(first, first + len(block))
            own[key] = {
                **partition_counts(report, block),
                "configuration_ids": dg.MetadataValue.text(
                    describe_counts(configuration_counts(ids[part][completed[part]]))
                ),
            }
        meta: dict[str, dg.MetadataValue] = {
            "run_partitions": dg.MetadataValue.int(len(blocks)),
            "run_models": dg.MetadataValue.int(len(indices)),
            "run_trained": dg.MetadataValue.int(len(report.trained)),
            "run_skipped": dg.MetadataValue.int(len(report.skipped)),
            "run_failed": dg.MetadataValue.int(len(report.failed)),
            "seconds_per_model": dg.MetadataValue.float(significant(report.mean_seconds_per_model)),
            "wall_seconds": dg.MetadataValue.float(significant(report.wall_seconds)),
            "worker_processes": dg.MetadataValue.int(report.processes),
            "configuration_fingerprint": dg.MetadataValue.text(current.fingerprint()),
            "configuration_id": dg.MetadataValue.int(-1 if current_id is None else current_id),
            "configuration_args": dg.MetadataValue.json(current.args),
            "configuration_code": dg.MetadataValue.text(current.code),
            "configuration_versions": dg.MetadataValue.json(current.versions),
            "run_configuration_ids": dg.MetadataValue.text(describe_counts(present)),
            "store_configuration_ids": dg.MetadataValue.text(
                describe_counts(configuration_counts(store_ids))
            ),
            "on_change": dg.MetadataValue.text(on_change),
            # what a fit of the store's completed rows would mix (unknown counts as one)
            "mixed": dg.MetadataValue.bool(len(configuration_counts(store_ids)) > 1),
            "replaced": dg.MetadataValue.int(to_replace),
        }
        context.log.info("%s: %s", name, report.summary())
        if report.failed:
            # their models are all stored: these partitions are done even though the run fails
            for key in completed_blocks(report, blocks):
                yield dg.AssetMaterialization(
                    asset_key=outputs_key, partition=key, metadata={**meta, **own[key]}
                )
            raise dg.Failure(
                description=report.failure_text(experiment.trainer.retries), metadata=meta
            )
        for key, entries in own.items():
            context.add_asset_metadata(entries, partition_key=key)
        yield dg.MaterializeResult(
            metadata=meta,
            data_version=dg.DataVersion(rows_data_version(selected, completed, ids)),
        )

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
