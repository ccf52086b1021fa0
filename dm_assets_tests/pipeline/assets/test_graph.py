"""The asset graph, materialized in process into temporary folders: files, metadata, checks,
partition ranges, failures, and the MLflow run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from dm_assets.pipeline import warmup
from dm_assets.pipeline.assets import experiment_assets
from dm_assets.pipeline.definitions import build_definitions
from dm_assets.pipeline.experiment import Experiment, load_experiment, load_experiments
from dm_assets.pipeline.jobs import experiment_jobs, job_specs
from dm_assets.store.store import Store
from dm_assets.ui import MLFLOW_UI_URL
from dm_assets_tests.helpers import checks, metadata, resources

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def shipped(name: str) -> Experiment:
    return next(e for e in load_experiments(extra="") if e.name == name)


def materialize(
    experiment: Experiment,
    home: Path,
    *,
    first: str | None = None,
    last: str | None = None,
    keys: list[str] | None = None,
) -> dg.ExecuteInProcessResult:
    assets = experiment_assets(experiment)
    if keys is not None:
        selection = [dg.AssetKey([experiment.name, k]) for k in keys]
        assets_sel: list = [a for a in assets if isinstance(a, dg.AssetsDefinition)]
        return dg.materialize(
            assets_sel,
            selection=selection,
            resources=resources(home),
            instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
            tags=_range(experiment, first, last),
        )
    return dg.materialize(
        assets,
        resources=resources(home),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        tags=_range(experiment, first, last),
    )


def _range(experiment: Experiment, first: str | None, last: str | None) -> dict[str, str]:
    keys = experiment.partition_keys()
    return {RANGE_START: first or keys[0], RANGE_END: last or first or keys[-1]}


@pytest.mark.slow
def test_minimal_experiment_whole_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the training step starts the warm-up of the fit's imports, the fit and evaluation wait
    started: list[frozenset[str]] = []
    waits: list[float] = []
    monkeypatch.setattr(warmup, "_thread", None)
    monkeypatch.setattr(warmup, "_seconds", None)
    monkeypatch.setattr(warmup, "DELAY_SECONDS", 0.0)  # this training is shorter than the delay
    monkeypatch.setattr(warmup, "start", lambda assets: started.append(assets) or True)
    monkeypatch.setattr(warmup, "wait", lambda: waits.append(0.0) or 0.0)
    experiment = shipped("minimal")
    home = tmp_path / "home"
    result = materialize(experiment, home)
    assert result.success
    assert started == [{"datamodels", "datamodel_eval"}] and len(waits) == 2
    root = home / "minimal"

    with Store.open(root / "store") as store:
        assert store.completed_mask().all()
        masks = np.asarray(store.read("masks"))
    assert masks.shape == (300, 60)

    training = metadata(result, "minimal", "model_outputs")
    assert training["run_models"] == 300 and training["run_trained"] == 300
    assert training["run_skipped"] == 0 and training["run_failed"] == 0
    assert training["run_partitions"] == 6
    # the last partition's own counts
    assert (training["models"], training["trained"], training["skipped"]) == (50, 50, 0)
    assert training["seconds_per_model"] > 0

    dataset = metadata(result, "minimal", "regression_dataset")
    assert dataset["rows"] == 300 and (dataset["idx_min"], dataset["idx_max"]) == (0, 299)
    assert (root / "data.beton").stat().st_size == dataset["bytes"]

    fit = metadata(result, "minimal", "datamodels")
    fit_dir = Path(fit["fit_dir"])
    assert (root / "datamodels").resolve() == fit_dir.resolve()
    for name in ("datamodels.pt", "regularization_path.csv", "summary.json", "config.yaml"):
        assert (fit_dir / name).is_file()
    weights = torch.load(fit_dir / "datamodels.pt")
    assert weights["weight"].shape == (60, 4)
    assert fit["targets"] == 4 and fit["mean_val_r2"] > 0.8
    # the fit's lineage, from its manifest: which models, which dataset, which configuration
    manifest = json.loads((fit_dir / "manifest.json").read_text())
    assert (fit["train_models"], fit["val_models"]) == (200, 50)
    assert fit["train_models"] == len(manifest["train_indices"])
    assert fit["dataset_digest"] == manifest["dataset"]["digest"] != ""
    assert fit["rows_digest"] == manifest["rows"]["digest"] != ""
    assert fit["mixed_configurations"] is False
    assert list(fit["configuration_ids"].values()) == [250]
    summary = json.loads((fit_dir / "summary.json").read_text())
    assert summary["n_train"] == 200 and summary["n_val"] == 50

    evaluated = checks(result)
    assert set(evaluated) == {
        "store_completeness",
        "rows_match_store",
        "finite_weights",
        "mean_val_r2_floor",
        "lds_floor",
    }

    # held-out evaluation: the 50 models after num_train + num_val, files beside the fit
    judged = metadata(result, "minimal", "datamodel_eval")
    assert judged["held_out_models"] == 50 and judged["targets"] == 4
    assert 0.7 < judged["lds"] <= 1 and 0 < judged["r2"] <= 1
    report = json.loads((fit_dir / "evaluation.json").read_text())
    assert [p["n_models"] for p in report["curve"]["points"]] == [50, 100, 200]
    assert report["lds"] == pytest.approx(judged["lds"], abs=5e-5)  # metadata rounds to 4
    low, high = report["ci"]
    assert judged["lds_95ci"] == f"[{low:.4f}, {high:.4f}]"
    assert "| one model's output |" in judged["scores"]
    for name in ("evaluation_per_target.csv", "lds_curve.png", "predicted_vs_actual.png"):
        assert (fit_dir / name).stat().st_size > 0
    assert all(e.passed for e in evaluated.values()), evaluated

    # the MLflow run holds one point per lambda step, tagged with the Dagster run
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    mlflow_experiment = client.get_experiment_by_name("minimal")
    assert mlflow_experiment is not None
    (run,) = client.search_runs([mlflow_experiment.experiment_id])
    assert run.data.tags["dagster.run_id"] == result.run_id
    assert run.info.run_id == fit["mlflow_run_id"] == judged["mlflow_run_id"]
    # Dagster links to the run in the MLflow UI that `python -m dm_assets.ui mlflow` serves
    runs_url = f"{MLFLOW_UI_URL}/#/experiments/{mlflow_experiment.experiment_id}"
    assert fit["mlflow_run"] == judged["mlflow_run"] == f"{runs_url}/runs/{run.info.run_id}"
    assert fit["mlflow_ui"] == judged["mlflow_ui"] == runs_url
    assert "dagster.partition" not in run.data.tags  # no partition: no empty tag
    assert "Datamodels of experiment `minimal`" in run.data.tags["mlflow.note.content"]
    history = client.get_metric_history(run.info.run_id, "path/mean_val_mse")
    assert len(history) >= 5
    assert sorted(m.step for m in history) == list(range(len(history)))
    assert client.get_metric_history(run.info.run_id, "eval/lds")[0].value == report["lds"]
    assert client.get_metric_history(run.info.run_id, "eval/lds_ci_low")[0].value == low
    curve = client.get_metric_history(run.info.run_id, "eval/lds_curve")
    assert len(curve) == 3

    # materializing again trains nothing and keeps every row; a run that only trains has
    # nothing to warm up
    again = materialize(experiment, home, keys=["store", "model_outputs"])
    assert again.success
    assert len(started) == 1
    rerun = metadata(again, "minimal", "model_outputs")
    assert rerun["run_trained"] == 0 and rerun["run_skipped"] == 300
    with Store.open(root / "store") as store:
        assert np.array_equal(np.asarray(store.read("masks")), masks)


def test_each_partition_records_its_own_counts_and_the_plan_comes_first(tmp_path: Path) -> None:
    experiment = shipped("minimal")
    home = tmp_path / "home"
    instance = dg.DagsterInstance.ephemeral()
    assets = [a for a in experiment_assets(experiment) if isinstance(a, dg.AssetsDefinition)]
    selection = [dg.AssetKey(["minimal", "store"]), dg.AssetKey(["minimal", "model_outputs"])]

    def train(first: str, last: str) -> dg.ExecuteInProcessResult:
        result = dg.materialize(
            assets,
            selection=selection,
            resources=resources(home),
            instance=instance,
            tags=_range(experiment, first, last),
        )
        assert result.success
        return result

    train("050-099", "050-099")
    result = train("050-099", "100-149")
    per = {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node("minimal__model_outputs")
    }
    assert set(per) == {"050-099", "100-149"}
    # each partition's own counts: the first was trained by the first run
    counts = {
        p: tuple(meta[k] for k in ("models", "trained", "skipped", "failed"))
        for p, meta in per.items()
    }
    assert counts == {"050-099": (50, 0, 50, 0), "100-149": (50, 50, 0, 0)}
    for meta in per.values():
        # the run's totals, under their own names
        assert (meta["run_partitions"], meta["run_models"]) == (2, 100)
        assert (meta["run_trained"], meta["run_skipped"], meta["run_failed"]) == (50, 50, 0)
        assert "partitions" not in meta
        # rounded for display: 4 significant digits
        for key in ("seconds_per_model", "wall_seconds"):
            value = meta[key]
            assert isinstance(value, float) and value > 0, key
            assert value == float(f"{value:.4g}"), key

    # said before training: how many are trained and how many skipped
    messages = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    plan = "100 model(s) selected: 50 to train, 50 skipped (already completed: 50-99)"
    assert any(m.endswith(plan) for m in messages), messages
    first_plan = next(i for i, m in enumerate(messages) if m.endswith(plan))
    summary = next(i for i, m in enumerate(messages) if "50 trained, 50 skipped" in m)
    assert first_plan < summary


def test_partition_range_trains_only_its_models(tmp_path: Path) -> None:
    experiment = shipped("minimal")
    home = tmp_path / "home"
    result = materialize(
        experiment, home, first="050-099", last="100-149", keys=["store", "model_outputs"]
    )
    assert result.success
    training = metadata(result, "minimal", "model_outputs")
    assert training["run_models"] == 100 and training["run_trained"] == 100
    with Store.open(home / "minimal" / "store") as store:
        assert store.completed_indices().tolist() == list(range(50, 150))
    partitions = {
        m.partition for m in result.asset_materializations_for_node("minimal__model_outputs")
    }
    assert partitions == {"050-099", "100-149"}
    # only a third of the store is done: the completeness check says so (a warning)
    completeness = checks(result)["store_completeness"]
    assert not completeness.passed
    assert completeness.severity == dg.AssetCheckSeverity.WARN
    assert completeness.metadata["completed"].value == 100


FLAKY = """
name: flaky
spec:
  num_models: 12
  schema:
    masks: {shape: [6], dtype: bool_}
    margins: {shape: [2], dtype: float32}
trainer:
  main_import: dm_assets_tests.scripts.planted_failing
  args: [--failing.indices=5]
  retries: 1
models_per_partition: 4
devices: {gpus: none, cpu_workers: 2}
"""


def test_failing_model_fails_the_run_naming_it_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "flaky.yaml"
    path.write_text(textwrap.dedent(FLAKY))
    experiment = load_experiment(path)
    home = tmp_path / "home"
    result = materialize(experiment, home, keys=["store", "model_outputs"])
    assert not result.success
    failure = next(
        e for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    ).step_failure_data
    assert "model(s) still failing" in failure.error.message
    assert "[5]" in failure.error.message
    with Store.open(home / "flaky" / "store") as store:
        assert store.completed_indices().tolist() == [i for i in range(12) if i != 5]
    # the partitions without a failing model are materialized; the one with model 5 is not
    partitions = {
        m.partition for m in result.asset_materializations_for_node("flaky__model_outputs")
    }
    assert partitions == {"00-03", "08-11"}


def test_seed_minimal_pass_through_arguments_reach_the_script(tmp_path: Path) -> None:
    experiment = shipped("seed_minimal")
    home = tmp_path / "home"
    result = materialize(experiment, home, first="0", last="3")
    assert result.success
    with Store.open(home / "seed_minimal" / "store") as store:
        assert store.completed_indices().tolist() == [0, 1, 2, 3]
        numbers = np.asarray(store.read("random_numbers"))
    assert (numbers[:4] == 2).all()


def test_definitions_load_with_every_experiment() -> None:
    from dm_assets.pipeline.definitions import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    for name in ("minimal", "synthetic"):
        for asset in ("store", "model_outputs", "regression_dataset", "datamodels"):
            assert f"{name}/{asset}" in keys
    assert "minimal/datamodel_eval" in keys
    assert "seed_minimal/model_outputs" in keys
    assert "seed_minimal/datamodels" not in keys
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"minimal_train", "minimal_fit", "minimal_all", "seed_minimal_train"} <= jobs
    outputs = graph.get(dg.AssetKey(["minimal", "model_outputs"]))
    assert outputs.partitions_def is not None
    assert len(outputs.partitions_def.get_partition_keys()) == 6
    assert outputs.pools == {"gpu"}


def test_jobs_and_build_definitions_per_experiment(tmp_path: Path) -> None:
    experiment = shipped("minimal")
    jobs = {j.name for j in experiment_jobs(experiment)}
    specs = {s.name: s.partition_keys for s in job_specs(experiment)}
    assert jobs == {"minimal_train", "minimal_fit", "minimal_all"} == set(specs)
    defs = build_definitions([experiment], resources(tmp_path))
    dg.Definitions.validate_loadable(defs)
