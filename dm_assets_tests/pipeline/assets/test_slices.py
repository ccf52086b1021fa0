"""The regression split by targets: slices fitted as partitions of ``<name>/datamodel_slices``,
merged by ``<name>/datamodels``; refitting one slice keeps the others; one MLflow run per slice."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import dagster as dg
import pytest
import torch

from dm_assets.pipeline.assets import experiment_assets
from dm_assets.pipeline.assets.datamodel_slices import experiment_slices, slices_group
from dm_assets.pipeline.definitions import build_definitions
from dm_assets.pipeline.experiment import Experiment, load_experiment
from dm_assets.pipeline.jobs import experiment_jobs, job_specs
from dm_assets_tests.helpers import checks, metadata, resources

# the minimal experiment's planted datamodels (60 training examples, 4 targets), smaller
SLICED = """
name: sliced
spec:
  num_models: 160
  schema:
    masks: {shape: [60], dtype: bool_}
    margins: {shape: [4], dtype: float16}
trainer:
  main_import: dm_assets.examples.synthetic.train_synthetic
models_per_partition: 80
devices: {gpus: none, cpu_workers: 2}
regression:
  data: {num_train: 100, num_val: 30}
  cfg: {k: 12, eps: 1.0e-3, batch_size: 50, num_workers: 1, solver: gram, device: auto}
  targets_per_slice: 2
evaluation: {min_lds: 0.5}
checks: {min_mean_val_r2: 0.5}
"""


@pytest.fixture
def sliced(tmp_path: Path) -> Experiment:
    path = tmp_path / "sliced.yaml"
    path.write_text(textwrap.dedent(SLICED))
    return load_experiment(path)


def run(
    experiment: Experiment, home: Path, keys: list[str], **kwargs: object
) -> dg.ExecuteInProcessResult:
    assets = [a for a in experiment_assets(experiment) if isinstance(a, dg.AssetsDefinition)]
    return dg.materialize(
        assets,
        selection=[dg.AssetKey([experiment.name, k]) for k in keys],
        resources=resources(home),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        **kwargs,  # type: ignore[arg-type]
    )


def test_slices_partition_the_targets_and_the_definitions_load(
    sliced: Experiment, tmp_path: Path
) -> None:
    assert [(s.start, s.end, s.key) for s in experiment_slices(sliced, sliced.regression)] == [  # type: ignore[arg-type]
        (0, 2, "t0-1"),
        (2, 4, "t2-3"),
    ]
    defs = build_definitions([sliced], resources(tmp_path))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey(["sliced", "datamodel_slices"]))
    assert node.partitions_def is not None
    assert node.partitions_def.get_partition_keys() == ["t0-1", "t2-3"]
    assert node.pools == {"gpu"} and node.group_name == slices_group("sliced")
    merged = graph.get(dg.AssetKey(["sliced", "datamodels"]))
    assert merged.partitions_def is None
    specs = {s.name: list(s.partition_keys) for s in job_specs(sliced)}
    assert {j.name for j in experiment_jobs(sliced)} == set(specs)
    assert specs["sliced_slices"] == ["t0-1", "t2-3"] == sliced.slice_keys()
    assert specs["sliced_dataset"] == [] and specs["sliced_fit"] == []
    for job in defs.resolve_all_job_defs():  # every job resolves: one partitioning each
        assert job.name


@pytest.mark.slow
def test_slices_fit_merge_and_refit_one_keeping_the_other(
    sliced: Experiment, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    root = home / "sliced"
    trained = run(
        sliced,
        home,
        ["store", "model_outputs", "regression_dataset"],
        tags={
            "dagster/asset_partition_range_start": "000-079",
            "dagster/asset_partition_range_end": "080-159",
        },
    )
    assert trained.success

    # the merge needs every slice
    early = run(sliced, home, ["datamodels"])
    assert not early.success
    failure = next(e for e in early.all_events if e.event_type_value == "STEP_FAILURE")
    assert "t0-1" in failure.step_failure_data.error.message
    assert "sliced/datamodel_slices" in failure.step_failure_data.error.message

    first = {}
    for key in ("t0-1", "t2-3"):
        result = run(sliced, home, ["datamodel_slices"], partition_key=key)
        assert result.success
        meta = metadata(result, "sliced", "datamodel_slices")
        assert meta["targets"] == 2 and meta["device"] == "cpu"
        first[key] = Path(meta["fit_dir"])
        assert (root / "slices" / key / "latest").resolve() == first[key].resolve()
    assert first["t0-1"].parent == root / "slices" / "t0-1"
    assert json.loads((first["t2-3"] / "summary.json").read_text())["target_start_ind"] == 2

    merged = run(sliced, home, ["datamodels", "datamodel_eval"])
    assert merged.success
    fit = metadata(merged, "sliced", "datamodels")
    fit_dir = Path(fit["fit_dir"])
    assert fit_dir.parent == root / "fits"
    assert (root / "datamodels").resolve() == fit_dir.resolve()
    assert fit["targets"] == 4 and fit["slices"] == 2 and fit["mean_val_r2"] > 0.8
    weights = torch.load(fit_dir / "datamodels.pt")
    assert weights["weight"].shape == (60, 4)
    slice_weights = torch.load(first["t2-3"] / "datamodels.pt")
    assert torch.equal(weights["weight"][:, 2:], slice_weights["weight"])
    evaluated = checks(merged)
    assert set(evaluated) == {"finite_weights", "mean_val_r2_floor", "lds_floor"}
    assert all(e.passed for e in evaluated.values()), evaluated
    judged = metadata(merged, "sliced", "datamodel_eval")
    assert judged["targets"] == 4 and judged["held_out_models"] == 30

    # refit one slice: the other slice's fit stays as it was and the next merge takes both
    kept = first["t0-1"]
    kept_mtime = (kept / "datamodels.pt").stat().st_mtime_ns
    again = run(sliced, home, ["datamodel_slices"], partition_key="t2-3")
    assert again.success
    refit = Path(metadata(again, "sliced", "datamodel_slices")["fit_dir"])
    assert refit != first["t2-3"] and first["t2-3"].is_dir()
    assert (root / "slices" / "t0-1" / "latest").resolve() == kept.resolve()
    assert (kept / "datamodels.pt").stat().st_mtime_ns == kept_mtime
    assert sorted(p.name for p in (root / "slices" / "t0-1").iterdir()) == sorted(
        ["latest", kept.name]
    )
    remerged = run(sliced, home, ["datamodels"])
    assert remerged.success
    new_fit = Path(metadata(remerged, "sliced", "datamodels")["fit_dir"])
    assert new_fit != fit_dir and (root / "datamodels").resolve() == new_fit.resolve()
    parts = json.loads((new_fit / "summary.json").read_text())["slices"]
    assert [p["fit_dir"] for p in parts] == [str(kept.resolve()), str(refit.resolve())]

    # MLflow: one run per slice fit, tagged with its slice, nested under the latest merge
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sliced")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_slice = sorted(
        r.data.tags["dm_assets.slice"] for r in runs if "dm_assets.slice" in r.data.tags
    )
    assert by_slice == ["t0-1", "t2-3", "t2-3"]
    merges = [r for r in runs if "dm_assets.slice" not in r.data.tags]
    assert len(merges) == 2
    latest_merge = metadata(remerged, "sliced", "datamodels")["mlflow_run_id"]
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{latest_merge}'"
    )
    assert {r.data.tags["dm_assets.fit_dir"] for r in children} == {
        str(kept.resolve()),
        str(refit.resolve()),
    }
    assert client.get_run(latest_merge).data.params["slices.t0-1"] == kept.name
    # the evaluation went to the merge it judged
    assert client.get_metric_history(fit["mlflow_run_id"], "eval/lds")[0].value == pytest.approx(
        judged["lds"],
        abs=5e-5,  # the metadata rounds to 4 decimals
    )

    # a run given a range of slices fits them one after the other
    both = run(
        sliced,
        home,
        ["datamodel_slices"],
        tags={
            "dagster/asset_partition_range_start": "t0-1",
            "dagster/asset_partition_range_end": "t2-3",
        },
    )
    assert both.success
    assert metadata(both, "sliced", "datamodel_slices")["slices_fitted"] == 2
    assert {
        m.partition for m in both.asset_materializations_for_node("sliced__datamodel_slices")
    } == {"t0-1", "t2-3"}
    assert (root / "slices" / "t0-1" / "latest").resolve() != kept.resolve()
