"""compute_datamodels: the seed's config, validation of every value, the outputs on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dm_assets.regression.compute_datamodels import (
    choose_solver,
    compute_datamodels,
    path_table,
    write_outputs,
)
from dm_assets.regression.config import ConfigError, load_config, parse_overrides
from dm_assets.regression.data import ArraySource
from dm_assets_tests.helpers import planted_problem

SEED_CONFIG = """
data:
    data_path: 'OUT_DIR/data.beton' # Path to FFCV dataset
    num_train: 90 # Number of models to use for training
    num_val: 10 # Number of models to use for validation
    seed: 0 # Random seed for picking validation set
    target_start_ind: 0 # Select a slice of the data to run on
    target_end_ind: -1 # Select a slice of the data to run on (-1 = end)
cfg:
    k: 10 # Number of lambdas along the regularization path
    batch_size: 10 # Batch size for regression, must divide num_train and num_val
    lr: 1e-4 # Learning rate
    eps: 1e-2 # Multiplicative difference between the highest and lowest lambda
    out_dir: OUT_DIR # Where to save the results
    num_workers: 8 # Number of workers for dataloader
early_stopping:
    check_every: 3 # How often to check for inner and outer-loop convergence
    eps: 5e-1 # Tolerance for inner-loop convergence (see GLMNet docs)
"""


def write_config(tmp_path: Path, text: str = SEED_CONFIG) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_seed_config_loads_with_its_meanings(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert config["cfg"]["lr"] == 1e-4  # YAML 1.1 reads 1e-4 as a string: converted
    assert config["cfg"]["eps"] == 1e-2
    assert config["early_stopping"]["eps"] == 0.5
    assert config["data"]["target_end_ind"] == -1
    assert config["cfg"]["solver"] == "auto" and config["cfg"]["use_bias"] is True


def test_overrides_win(tmp_path: Path) -> None:
    overrides = parse_overrides(
        ["--data.num_train=80", "--cfg.out_dir", "/x/y", "--cfg.use_bias", "--cfg.k=12"]
    )
    config = load_config(write_config(tmp_path), overrides)
    assert config["data"]["num_train"] == 80
    assert config["cfg"]["out_dir"] == "/x/y"
    assert config["cfg"]["k"] == 12


def test_every_problem_reported(tmp_path: Path) -> None:
    text = SEED_CONFIG.replace("k: 10", "k: 0").replace("batch_size: 10", "batch_size: 500")
    text += "extra:\n    a: 1\n"
    overrides = parse_overrides(
        ["--cfg.lrr=3", "--cfg.solver=magic", "--data.num_val=0", "--cfg.device=tpu"]
    )
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text), overrides)
    text_err = str(info.value)
    assert "unknown section 'extra'" in text_err
    assert "unknown key cfg.lrr (did you mean 'lr'?)" in text_err
    # range problems are reported once the keys themselves are right
    overrides = parse_overrides(["--cfg.solver=magic", "--data.num_val=0", "--cfg.device=tpu"])
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text.replace("extra:\n    a: 1\n", "")), overrides)
    problems = info.value.problems
    for needle in [
        "cfg.k=0",
        "cfg.batch_size=500 is larger than data.num_train=90",
        "cfg.solver='magic'",
        "data.num_val=0",
        "cfg.device='tpu'",
    ]:
        assert any(needle in p for p in problems), (needle, problems)


def test_missing_and_badly_typed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, parse_overrides(["--cfg.k=ten"]))
    text = str(info.value)
    for needle in [
        "missing data.data_path",
        "missing data.num_train",
        "missing cfg.out_dir",
        "cfg.k='ten'",
    ]:
        assert needle in text
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_config(tmp_path, "data: [1,\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def array_config(tmp_path: Path, **cfg: object) -> object:
    overrides = {
        "data": {"data_path": "unused", "num_train": 2100, "num_val": 450},
        "cfg": {
            "k": 15,
            "batch_size": 500,
            "out_dir": str(tmp_path / "out"),
            "device": "cpu",
            **cfg,
        },
    }
    return load_config(None, overrides)


@pytest.mark.parametrize("solver", ["gram", "saga"])
def test_fit_and_outputs(tmp_path: Path, solver: str) -> None:
    prob = planted_problem(n=3000, p=80, t=3, seed=11)
    config = array_config(tmp_path, solver=solver)
    fit = compute_datamodels(config, source=ArraySource(prob.x, prob.y))  # type: ignore[arg-type]
    assert fit.summary["solver"] == solver
    assert 0.5 < fit.summary["mean_val_r2"] <= 1
    out = write_outputs(fit, tmp_path / "out", config)  # type: ignore[arg-type]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["datamodels.pt", "regularization_path.csv", "summary.json", "config.yaml"]
    )
    saved = torch.load(out / "datamodels.pt")
    assert saved["weight"].shape == (80, 3) and saved["bias"].shape == (3,)
    assert saved["lam"].shape == (3,) and saved["mean"].shape == (80,)
    # the saved arrays predict new masks exactly as documented
    x_new = torch.from_numpy(prob.x[2550:].astype(np.float32))
    pred = ((x_new - saved["mean"]) / saved["std"]) @ saved["weight"] + saved["bias"]
    torch.testing.assert_close(pred, fit.result.predict(prob.x[2550:]))
    resid = ((pred.numpy() - prob.y[2550:]) ** 2).mean(0)
    assert (resid < prob.y[2550:].var(0)).all()
    table = pd.read_csv(out / "regularization_path.csv")
    assert list(table.columns) == [
        "target",
        "step",
        "lambda",
        "lambda_over_max",
        "train_mse",
        "val_mse",
        "nonzeros",
        "chosen",
    ]
    assert (table.groupby("target")["chosen"].sum() == 1).all()
    assert table.loc[table.step == 0, "nonzeros"].eq(0).all()
    chosen = table[table.chosen == 1].sort_values("target")
    np.testing.assert_allclose(chosen["lambda"], saved["lam"].numpy(), rtol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 2100 and summary["n_features"] == 80
    assert yaml.safe_load((out / "config.yaml").read_text())["cfg"]["solver"] == solver


def test_out_dir_never_overwritten(tmp_path: Path) -> None:
    prob = planted_problem(n=800, p=20, t=1, seed=12)
    config = load_config(
        None,
        {
            "data": {"data_path": "unused", "num_train": 500, "num_val": 100},
            "cfg": {"k": 5, "batch_size": 100, "out_dir": str(tmp_path / "out"), "device": "cpu"},
        },
    )
    fit = compute_datamodels(config, source=ArraySource(prob.x, prob.y))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        write_outputs(fit, tmp_path / "out", config)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_too_few_models_and_device(tmp_path: Path) -> None:
    prob = planted_problem(n=500, p=20, t=1, seed=13)
    config = load_config(
        None,
        {
            "data": {"data_path": "unused", "num_train": 450, "num_val": 100},
            "cfg": {"k": 5, "batch_size": 100, "out_dir": str(tmp_path / "o"), "device": "cpu"},
        },
    )
    with pytest.raises(ConfigError, match="the dataset has 500 models but"):
        compute_datamodels(config, source=ArraySource(prob.x, prob.y))
    if not torch.cuda.is_available():
        config = load_config(
            None,
            {
                "data": {"data_path": "unused", "num_train": 300, "num_val": 100},
                "cfg": {
                    "k": 5,
                    "batch_size": 100,
                    "out_dir": str(tmp_path / "o"),
                    "device": "cuda",
                },
            },
        )
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            compute_datamodels(config, source=ArraySource(prob.x, prob.y))


def test_auto_solver_picks_gram_when_it_fits() -> None:
    assert choose_solver("auto", 2000, torch.device("cpu")) == "gram"
    assert choose_solver("auto", 10_000_000, torch.device("cpu")) == "saga"
    assert choose_solver("saga", 10, torch.device("cpu")) == "saga"


def test_path_table_offsets_targets() -> None:
    prob = planted_problem(n=900, p=20, t=2, seed=14)
    from dm_assets.regression.gram import fit_gram

    res = fit_gram(ArraySource(prob.x, prob.y), np.arange(600), np.arange(600, 800), k=6, eps=0.1)
    table = path_table(res, target_offset=40)
    assert sorted(table.target.unique()) == [40, 41]


def test_the_seed_command_writes_a_manifest(tmp_path: Path) -> None:
    from dm_assets.regression.beton_writer import write_beton
    from dm_assets.regression.compute_datamodels import main
    from dm_assets.regression.fit import FitFolder
    from dm_assets.regression.manifest import rows_digest_of_store
    from dm_assets.store.spec import Spec
    from dm_assets.store.store import Store

    prob = planted_problem(n=300, p=16, t=2, seed=4)
    spec = Spec.from_dict(
        {
            "num_models": 320,
            "schema": {
                "masks": {"shape": [16], "dtype": "bool_"},
                "margins": {"shape": [2], "dtype": "float64"},  # the dataset holds float32
            },
        }
    )
    done = np.setdiff1d(np.arange(300), [3, 4])
    with Store.initialize(tmp_path / "store", spec) as store:
        store.write_rows([(int(i), {"masks": prob.x[i], "margins": prob.y[i]}) for i in done])
    write_beton(tmp_path / "store", tmp_path / "data.beton", num_workers=1)
    code = main(
        [
            f"--data.data_path={tmp_path / 'data.beton'}",
            "--data.num_train=150",
            "--data.num_val=50",
            "--cfg.k=5",
            "--cfg.batch_size=50",
            f"--cfg.out_dir={tmp_path / 'fit'}",
            "--cfg.device=cpu",
            "--cfg.solver=gram",
            "--cfg.num_workers=1",
        ]
    )
    assert code == 0
    manifest = FitFolder.open(tmp_path / "fit").manifest()
    np.testing.assert_array_equal(manifest.train_indices, done[:150])
    np.testing.assert_array_equal(manifest.val_indices, done[150:200])
    assert manifest.store is None and manifest.rows["source"] == "dataset"
    assert manifest.configurations == {} and manifest.configuration_ids["unknown"] == 200
    assert manifest.mixed and manifest.dagster_run_id is None
    # the digest of the rows read from the dataset is the digest of the store's same rows
    with Store.open(tmp_path / "store") as store:
        digest = rows_digest_of_store(store, done[:200], x_name="masks", y_name="margins")
    assert manifest.rows["digest"] == digest
