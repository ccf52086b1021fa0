"""``python -m dm_assets.lineage`` on a real small fit (store, dataset, fit, evaluation in
``tmp_path``), run as a user would: the chain from the evaluation back to the training
configuration's arguments and the code, by folder and by experiment name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dm_assets.evaluation.held_out import FitRows, evaluate_fit
from dm_assets.regression.beton_writer import write_beton
from dm_assets.regression.config import load_config
from dm_assets.regression.fit import MANIFEST_FILE, FitFolder
from dm_assets.regression.fit_run import fit_into_folder
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets.training.configuration import configuration_for
from dm_assets_tests.helpers import REPO_ROOT, cli_env, planted_problem

SCHEMA = {
    "masks": {"shape": [20], "dtype": "bool_"},
    "margins": {"shape": [2], "dtype": "float32"},
}
EXPERIMENT = """
name: traced
spec:
  num_models: 200
  schema:
    masks: {shape: [20], dtype: bool_}
    margins: {shape: [2], dtype: float32}
trainer:
  main_import: dm_assets.examples.minimal.train_minimal
models_per_partition: 100
regression:
  data: {num_train: 100, num_val: 40}
  cfg: {k: 6, batch_size: 50, num_workers: 1, solver: gram, device: cpu}
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> FitFolder:
    """An evaluated fit of 100 + 40 of 180 completed models (0..179, but 50..59 late)."""
    root = tmp_path_factory.mktemp("lineage")
    prob = planted_problem(n=200, p=20, t=2, density=0.3, seed=5)
    done = np.setdiff1d(np.arange(180), np.arange(50, 60))
    spec = Spec.from_dict({"num_models": 200, "schema": SCHEMA})
    with Store.initialize(root / "store", spec) as store:
        config_id = store.register_configuration(
            configuration_for(SCHEMA, "my_trainer", ["--digits.lr", "0.1"], version="v7")
        )
        store.write_rows(
            [(int(i), {"masks": prob.x[i], "margins": prob.y[i]}) for i in done],
            configuration_id=config_id,
        )
    write_beton(root / "store", root / "data.beton", num_workers=1)
    config = load_config(
        None,
        {
            "data": {"data_path": str(root / "data.beton"), "num_train": 100, "num_val": 40},
            "cfg": {
                "k": 6,
                "batch_size": 50,
                "out_dir": str(root / "fit"),
                "device": "cpu",
                "solver": "gram",
                "num_workers": 1,
            },
        },
    )
    fit = fit_into_folder(
        config,
        root / "fit",
        store=root / "store",
        x_name="masks",
        y_name="margins",
        dagster_run_id="dagster-0123",
    ).folder
    fit.record_runs(mlflow_run_id="mlflow-4567")
    rows = FitRows.of(config, store=root / "store", x_name="masks", y_name="margins")
    evaluate_fit(fit, rows, experiment="traced")
    return fit


def lineage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dm_assets.lineage", *args],
        cwd=REPO_ROOT,
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_lineage_of_a_fit_folder(traced: FitFolder) -> None:
    proc = lineage(str(traced.path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    manifest = traced.manifest()
    assert "train 100: 0-49, 60-109" in out  # the late models 50..59 were not there
    assert "validation 40: 110-149" in out
    assert "held-out models: 150-179" in out
    assert manifest.dataset["digest"] in out and manifest.rows["digest"] in out
    assert "--digits.lr=0.1" in out and "my_trainer" in out and "version:v7" in out
    assert "dagster-0123" in out and "mlflow-4567" in out
    assert manifest.configurations[0]["fingerprint"] in out
    assert "dm_assets 0.1.0" in out and "torch" in out


def test_lineage_as_json_by_experiment_name(traced: FitFolder, tmp_path: Path) -> None:
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "traced.yaml").write_text(EXPERIMENT)
    home = tmp_path / "home"
    (home / "traced").mkdir(parents=True)
    traced.point_link(home / "traced" / "datamodels")
    proc = lineage("traced", "--json", env={"DM_HOME": str(home), "DM_EXPERIMENTS": str(folder)})
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["fit"]["path"] == str(traced.path)
    assert facts["models"]["train"] == "0-49, 60-109" and facts["models"]["mixed"] is False
    assert facts["configurations"][0]["args"] == {"digits.lr": "0.1"}
    assert facts["evaluation"]["held_out"] == "150-179"
    assert facts["dataset"]["digest"] == traced.manifest().dataset["digest"]


def test_unknown_names_and_folders_without_a_manifest_exit_2(
    traced: FitFolder, tmp_path: Path
) -> None:
    proc = lineage("no_such_experiment")
    assert proc.returncode == 2
    assert "'no_such_experiment' is neither a fit folder nor an experiment" in proc.stderr
    old = tmp_path / "old_fit"
    old.mkdir()
    for path in traced.path.iterdir():
        if path.name != MANIFEST_FILE:
            (old / path.name).write_bytes(path.read_bytes())
    proc = lineage(str(old))
    assert proc.returncode == 2
    assert "no manifest.json: it was written before fits recorded their lineage" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.path.isdir(old)
