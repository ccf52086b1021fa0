"""Every notebook in ``notebooks/`` runs top to bottom on a small finished digits experiment
(trained, fitted and evaluated through the asset graph) and draws its pictures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from dm_assets.pipeline.assets import experiment_assets
from dm_assets.pipeline.experiment import load_experiment
from dm_assets_tests.helpers import REPO_ROOT, resources

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))

SMALL_DIGITS = """
name: digits_small
spec:
  num_models: 560
  schema:
    masks: {shape: [1000], dtype: bool_}
    margins: {shape: [797], dtype: float32}
trainer:
  main_import: dm_assets.examples.digits.train_digits
  args: {digits.steps: 40, digits.repeat_start: 520, digits.repeats: 2}
models_per_partition: 140
max_partitions_per_run: 4
devices: {gpus: none, cpu_workers: 2, threads_per_worker: 1}
regression:
  data: {num_train: 400, num_val: 80}
  cfg: {k: 12, eps: 1.0e-2, batch_size: 240, num_workers: 1, solver: gram, device: cpu}
evaluation: {bootstrap: 200}  # the curve is tested elsewhere (slow with p > N)
attributions: {methods: [trak, tracin], targets: 40}
checks: {min_mean_val_r2: 0.0}
"""


@pytest.fixture(scope="module")
def finished_small_digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("notebooks")
    folder = root / "experiments"
    folder.mkdir()
    (folder / "digits_small.yaml").write_text(SMALL_DIGITS)
    home = root / "home"
    experiment = load_experiment(folder / "digits_small.yaml")
    keys = experiment.partition_keys()
    result = dg.materialize(
        experiment_assets(experiment),
        resources=resources(home),
        instance=dg.DagsterInstance.ephemeral(),
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )
    assert result.success
    # the baselines ran end to end on the fit's held-out models, beside the datamodels' scores
    fit = home / "digits_small" / "datamodels"
    report = json.loads((fit / "attributions.json").read_text())
    assert set(report["methods"]) == {"trak", "tracin"}
    for method in report["methods"].values():
        assert method["dattri_lds"] == pytest.approx(method["lds"], abs=1e-9)
        assert -1 <= method["lds"] <= 1 and method["seconds"] > 0
    assert np.load(fit / "scores_trak.npy").shape == (1000, 40)
    assert (fit / "lds_vs_compute.png").stat().st_size > 0
    return {"DM_HOME": str(home), "DM_EXPERIMENTS": str(folder)}


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_draws(
    path: Path, finished_small_digits: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {**finished_small_digits, "DM_NOTEBOOK_EXPERIMENT": "digits_small"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    notebook = nbformat.read(path, as_version=4)
    # any cell error raises CellExecutionError, naming the cell and the traceback
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    ).execute()
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 4, f"{path.name} drew {len(images)} pictures"
