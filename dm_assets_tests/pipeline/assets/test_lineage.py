"""Lineage in the asset graph: a changed training configuration is never silent (refused by
default through ``python -m dm_assets.launch``, retrained or mixed on request), Dagster's own
code and data versions mark the datamodels stale when models complete behind a fit, a store
grows in place through the graph, and a change to the trainer's source changes the training
asset's code version."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from dm_assets.pipeline.assets import experiment_assets
from dm_assets.pipeline.assets.model_outputs import training_assets
from dm_assets.pipeline.assets.versions import training_configuration
from dm_assets.pipeline.experiment import Experiment, load_experiment
from dm_assets.store.store import Store
from dm_assets_tests.helpers import REPO_ROOT, cli_env, metadata, resources

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"

SCALED = """
name: lineage
spec:
  num_models: 20
  schema:
    masks: {{shape: [4], dtype: bool_}}
    margins: {{shape: [1], dtype: float32}}
trainer:
  main_import: dm_assets_tests.scripts.scaled
  args: {{case.scale: {scale}}}
  on_change: {on_change}
models_per_partition: 10
max_partitions_per_run: 2
devices: {{gpus: none, cpu_workers: 2}}
"""


class Launcher:
    """``python -m dm_assets.launch`` on the experiment ``lineage`` rewritten before each
    launch, with its own ``DM_HOME`` and Dagster instance."""

    def __init__(self, tmp_path: Path) -> None:
        self.experiments = tmp_path / "experiments"
        self.experiments.mkdir()
        self.home = tmp_path / "home"
        self.env = {
            **cli_env(),
            "DM_HOME": str(self.home),
            "DM_EXPERIMENTS": str(self.experiments),
            "DAGSTER_HOME": str(self.home / "dagster"),
        }

    def launch(
        self, *, scale: float, on_change: str = "refuse", partitions: str = "all"
    ) -> subprocess.CompletedProcess[str]:
        (self.experiments / "lineage.yaml").write_text(
            SCALED.format(scale=scale, on_change=on_change)
        )
        return subprocess.run(
            [sys.executable, "-m", "dm_assets.launch", "lineage_train", "--partitions", partitions],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def store(self) -> Store:
        return Store.open(self.home / "lineage" / "store")

    def latest_metadata(self, partition: str) -> dict:
        with dg.DagsterInstance.from_config(str(self.home / "dagster")) as instance:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=dg.AssetKey(["lineage", "model_outputs"]),
                    asset_partitions=[partition],
                ),
                limit=1,
            ).records
            materialization = records[0].asset_materialization
            assert materialization is not None
            return {k: v.value for k, v in materialization.metadata.items()}


def margins(store: Store) -> np.ndarray:
    return np.asarray(store.read("margins"))[:, 0].copy()


@pytest.mark.slow
def test_changed_configuration_refused_then_mixed_then_retrained(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    first = launcher.launch(scale=1.0, partitions="00-09")
    assert first.returncode == 0, first.stdout + first.stderr
    with launcher.store() as store:
        assert store.completed_indices().tolist() == list(range(10))
        np.testing.assert_array_equal(margins(store)[:10], np.arange(1, 11))
        before = {key: np.asarray(store.read(key)).copy() for key in ("masks", "margins")}

    # the default: refused before training anything, naming the change and the remedies
    refused = launcher.launch(scale=2.0)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "case.scale: 1.0 -> 2.0" in output
    assert "trainer.on_change: retrain" in output and "trainer.on_change: mix" in output
    with launcher.store() as store:
        assert store.completed_indices().tolist() == list(range(10))
        for key, values in before.items():
            np.testing.assert_array_equal(np.asarray(store.read(key)), values)
        assert len(store.configurations()) == 1

    # mix: the missing models are trained under the new configuration, the mix recorded
    mixed = launcher.launch(scale=2.0, on_change="mix", partitions="10-19")
    assert mixed.returncode == 0, mixed.stdout + mixed.stderr
    with launcher.store() as store:
        assert store.completed_mask().all()
        ids = store.configuration_ids()
        assert len(set(ids[:10].tolist())) == 1 and len(set(ids[10:].tolist())) == 1
        assert ids[0] != ids[10]
        np.testing.assert_array_equal(margins(store)[:10], np.arange(1, 11))
        np.testing.assert_array_equal(margins(store)[10:], 2.0 * np.arange(11, 21))
    meta = launcher.latest_metadata("10-19")
    assert meta["mixed"] is True and meta["on_change"] == "mix"
    assert meta["configuration_args"] == {"case.scale": "2.0"}
    assert meta["trained"] == 10

    # retrain: the rows of the old configuration are replaced, one configuration is left
    retrained = launcher.launch(scale=2.0, on_change="retrain")
    assert retrained.returncode == 0, retrained.stdout + retrained.stderr
    with launcher.store() as store:
        assert store.completed_mask().all()
        ids = store.configuration_ids()
        assert len(set(ids.tolist())) == 1 and ids[0] >= 0
        np.testing.assert_array_equal(margins(store), 2.0 * np.arange(1, 21))
        fingerprint = store.configurations()[int(ids[0])].fingerprint()
    meta = launcher.latest_metadata("00-09")
    assert meta["replaced"] == 10 and meta["trained"] == 10
    assert meta["mixed"] is False and meta["configuration_fingerprint"] == fingerprint


STALE = """
name: stale
spec:
  num_models: 60
  schema:
    masks: {shape: [60], dtype: bool_}
    margins: {shape: [4], dtype: float16}
trainer:
  main_import: dm_assets.examples.synthetic.train_synthetic
models_per_partition: 10
max_partitions_per_run: 6
devices: {gpus: none, cpu_workers: 2}
regression:
  data: {num_train: 30, num_val: 10, seed: 0}
  cfg: {k: 5, batch_size: 10, num_workers: 1, device: cpu, solver: gram}
checks: {min_completed_fraction: 0.0, min_mean_val_r2: null}
"""


def write_experiment(tmp_path: Path, text: str, name: str) -> Experiment:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return load_experiment(path)


def run(
    experiment: Experiment,
    home: Path,
    instance: dg.DagsterInstance,
    names: list[str],
    partitions: tuple[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    assets = [a for a in experiment_assets(experiment) if isinstance(a, dg.AssetsDefinition)]
    tags = {RANGE_START: partitions[0], RANGE_END: partitions[1]} if partitions else {}
    return dg.materialize(
        assets,
        selection=[dg.AssetKey([experiment.name, n]) for n in names],
        resources=resources(home),
        instance=instance,
        tags=tags,
    )


def stale_status(
    experiment: Experiment, instance: dg.DagsterInstance, name: str, partition: str | None = None
) -> StaleStatus:
    """What Dagster itself says of an asset (the resolver behind the UI's "unsynced")."""
    assets = [a for a in experiment_assets(experiment) if isinstance(a, dg.AssetsDefinition)]
    resolver = get_stale_status_resolver(instance, assets)
    return resolver.get_status(dg.AssetKey([experiment.name, name]), partition)


@pytest.mark.slow
def test_datamodels_stale_after_more_models_complete(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path, STALE, "stale")
    home = tmp_path / "home"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        run(experiment, home, instance, ["store", "model_outputs"], ("00-09", "30-39"))
        run(experiment, home, instance, ["regression_dataset", "datamodels"])
        assert stale_status(experiment, instance, "datamodels") == StaleStatus.FRESH
        assert stale_status(experiment, instance, "regression_dataset") == StaleStatus.FRESH
        dataset_before = metadata_of(instance, experiment, "regression_dataset")

        # the same dataset again: same data version, the datamodels stay fresh
        run(experiment, home, instance, ["regression_dataset"])
        assert stale_status(experiment, instance, "datamodels") == StaleStatus.FRESH

        # more models complete: the dataset is stale; rewritten, it has a new data version
        run(experiment, home, instance, ["model_outputs"], ("40-49", "50-59"))
        assert stale_status(experiment, instance, "regression_dataset") == StaleStatus.STALE
        run(experiment, home, instance, ["regression_dataset"])
        assert metadata_of(instance, experiment, "regression_dataset") != dataset_before
        assert stale_status(experiment, instance, "datamodels") == StaleStatus.STALE
        run(experiment, home, instance, ["datamodels"])
        assert stale_status(experiment, instance, "datamodels") == StaleStatus.FRESH


def metadata_of(instance: dg.DagsterInstance, experiment: Experiment, name: str) -> str:
    """The data version Dagster recorded with the latest materialization of ``name``."""
    record = instance.get_latest_materialization_event(dg.AssetKey([experiment.name, name]))
    assert record is not None and record.asset_materialization is not None
    return record.asset_materialization.tags["dagster/data_version"]


GROW = """
name: grow
spec:
  num_models: {n}
  schema:
    masks: {{shape: [60], dtype: bool_}}
    margins: {{shape: [4], dtype: float16}}
trainer:
  main_import: dm_assets.examples.synthetic.train_synthetic
models_per_partition: 100
max_partitions_per_run: 6
devices: {{gpus: none, cpu_workers: 2}}
checks: {{min_completed_fraction: 0.0}}
"""


def test_growing_keeps_every_row_and_trains_nothing_again(tmp_path: Path) -> None:
    small = write_experiment(tmp_path, GROW.format(n=300), "grow")
    home = tmp_path / "home"
    store_dir = home / "grow" / "store"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        # a few models completed in two of the three partitions
        run(small, home, instance, ["store", "model_outputs"], ("000-099", "000-099"))
        run(small, home, instance, ["model_outputs"], ("200-299", "200-299"))
        with Store.open(store_dir) as store:
            before = {
                name: np.load(store_dir / name).copy()
                for name in ["masks.npy", "margins.npy", "_completed.npy", "_configuration.npy"]
            }
            assert store.completed_mask().sum() == 200

        big = write_experiment(tmp_path, GROW.format(n=600), "grow")
        assert big.partition_keys()[-1] == "500-599" and len(big.partition_keys()) == 6
        assert stale_status(big, instance, "store") == StaleStatus.STALE  # a new spec
        grown = run(big, home, instance, ["store"])
        assert metadata(grown, "grow", "store")["grown_from"] == 300
        with Store.open(store_dir) as store:
            assert store.spec.num_models == 600
            for name, old in before.items():
                new = np.load(store_dir / name)
                assert new.shape[0] == 600
                assert new[:300].tobytes() == old.tobytes(), name
            assert not store.completed_mask()[300:].any()
        # the trained partitions stay fresh: the store's data version is its schema's
        assert stale_status(big, instance, "model_outputs", "000-099") == StaleStatus.FRESH

        # the old partitions train nothing again; a new one trains
        again = run(big, home, instance, ["model_outputs"], ("000-099", "300-399"))
        meta = metadata(again, "grow", "model_outputs")
        assert meta["run_trained"] == 200 and meta["run_skipped"] == 200
        with Store.open(store_dir) as store:
            for name in ["masks.npy", "margins.npy"]:
                rows = np.load(store_dir / name)
                assert rows[:100].tobytes() == before[name][:100].tobytes()
                assert rows[200:300].tobytes() == before[name][200:300].tobytes()

        # shrinking is refused, clearly, and changes nothing
        shrunk = write_experiment(tmp_path, GROW.format(n=200), "grow")
        result = dg.materialize(
            [a for a in experiment_assets(shrunk) if isinstance(a, dg.AssetsDefinition)],
            selection=[dg.AssetKey(["grow", "store"])],
            resources=resources(home),
            instance=instance,
            raise_on_error=False,
        )
        assert not result.success
        failure = result.get_step_failure_events()[0].step_failure_data.error
        assert failure is not None
        assert "num_models = 200" in failure.message and "600" in failure.message
        with Store.open(store_dir) as store:
            assert store.spec.num_models == 600


def code_version(experiment: Experiment, name: str) -> str | None:
    for asset in training_assets(experiment):
        if isinstance(asset, dg.AssetsDefinition):
            key = dg.AssetKey([experiment.name, name])
            if key in asset.keys:
                return asset.code_versions_by_key[key]
    raise AssertionError(name)


TRAINER = """
name: coded
spec:
  num_models: 4
  schema:
    margins: {{shape: [1], dtype: float32}}
trainer:
  main_import: lineage_trainer_{tag}
  args: [--case.scale=1.0]
  {version}
"""


def test_code_version_follows_the_trainer_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    monkeypatch.syspath_prepend(str(code))
    source = code / "lineage_trainer_a.py"
    source.write_text("def main(index, logdir):\n    return {'margins': [1.0]}\n")
    experiment = write_experiment(tmp_path, TRAINER.format(tag="a", version=""), "coded")
    first = code_version(experiment, "model_outputs")
    assert first == training_configuration(experiment).fingerprint()
    assert "lineage_trainer_a" not in sys.modules  # hashed, never imported

    source.write_text("def main(index, logdir):\n    return {'margins': [2.0]}\n")
    changed = code_version(experiment, "model_outputs")
    assert changed is not None and changed != first

    # a declared version replaces the source's hash
    versioned = write_experiment(tmp_path, TRAINER.format(tag="a", version="version: v1"), "coded")
    declared = code_version(versioned, "model_outputs")
    source.write_text("def main(index, logdir):\n    return {'margins': [3.0]}\n")
    assert code_version(versioned, "model_outputs") == declared
    assert training_configuration(versioned).code == "version:v1"

    # a trainer module that cannot be found: no code version, the definitions still load
    missing = write_experiment(tmp_path, TRAINER.format(tag="gone", version=""), "coded")
    assert code_version(missing, "model_outputs") is None
