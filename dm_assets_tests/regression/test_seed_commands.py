"""The seed's whole pipeline through its command lines, on the shipped synthetic example: a
store initialized from its spec, filled by the worker, converted by write_dataset, fitted by
compute_datamodels with its config; the datamodels recover the planted weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dm_assets.examples.synthetic import train_synthetic as planted
from dm_assets.store.spec import Spec
from dm_assets_tests.helpers import REPO_ROOT, run_module

EXAMPLE = REPO_ROOT / "dm_assets" / "examples" / "synthetic"
SEED_STYLE_CONFIG = """
data:
    data_path: {beton}
    num_train: 1000
    num_val: 200
    seed: 0
    target_start_ind: 0
    target_end_ind: -1
cfg:
    k: 20
    batch_size: 100
    lr: 1e-4
    eps: 1e-3
    out_dir: {out}
    num_workers: 2
early_stopping:
    check_every: 3
    eps: 5e-1
"""


def compute(*args: str, check: bool = True):
    return run_module("dm_assets.regression.compute_datamodels", *args, check=check, timeout=300)


def test_store_to_datamodels(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert Spec.load(EXAMPLE / "spec.json") == Spec.from_dict(planted.spec())
    run_module(
        "dm_assets.initialize_store",
        f"--logging.logdir={store}",
        f"--logging.spec={EXAMPLE / 'spec.json'}",
        check=True,
    )
    run_module(
        "dm_assets.worker",
        f"--worker.logdir={store}",
        "--worker.indices=0-1499",
        "--worker.main_import=dm_assets.examples.synthetic.train_synthetic",
        check=True,
        timeout=300,
    )
    beton = tmp_path / "data.beton"
    run_module(
        "dm_assets.regression.write_dataset",
        f"--cfg.data_dir={store}",
        f"--cfg.out_path={beton}",
        "--cfg.x_name=masks",
        "--cfg.y_name=margins",
        check=True,
        timeout=300,
    )
    compute(
        "-C",
        str(EXAMPLE / "regression_config.yaml"),
        f"--data.data_path={beton}",
        f"--cfg.out_dir={tmp_path / 'out'}",
        "--cfg.device=cpu",
    )
    saved = torch.load(tmp_path / "out" / "datamodels.pt")
    raw = (saved["weight"] / saved["std"][:, None]).numpy()  # weights on raw masks
    w = planted.planted_weights()
    for j in range(planted.T):
        cos = raw[:, j] @ w[:, j] / np.linalg.norm(raw[:, j]) / np.linalg.norm(w[:, j])
        assert cos > 0.98, (j, cos)
    # held-out models (rows 1200..1499 of the dataset) are predicted well
    masks = np.load(store / "masks.npy")[1200:]
    margins = np.load(store / "margins.npy")[1200:].astype(np.float64)
    pred = ((torch.from_numpy(masks).float() - saved["mean"]) / saved["std"]) @ saved["weight"]
    pred = (pred + saved["bias"]).numpy()
    r2 = 1 - ((pred - margins) ** 2).mean(0) / margins.var(0)
    assert (r2 > 0.9).all(), r2
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_models_in_dataset"] == 1500 and summary["solver"] == "gram"

    # a config in the seed's own words, a target slice, and the other solver
    config = tmp_path / "config.yaml"
    config.write_text(SEED_STYLE_CONFIG.format(beton=beton, out=tmp_path / "out2"))
    proc = compute(
        "-C",
        str(config),
        "--data.target_start_ind=1",
        "--data.target_end_ind=3",
        "--cfg.solver=saga",
        "--cfg.lr=none",
        "--cfg.device=cpu",
    )
    assert "early_stopping.eps=0.5 is the seed's weight-change tolerance" in proc.stderr
    sliced = torch.load(tmp_path / "out2" / "datamodels.pt")
    assert sliced["weight"].shape == (planted.P, 2)
    torch.testing.assert_close(sliced["weight"], saved["weight"][:, 1:3], atol=0.05, rtol=0.05)

    # refusing to overwrite, and a dataset too small for the split
    proc = compute("-C", str(config), check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    proc = compute(
        "-C",
        str(config),
        f"--cfg.out_dir={tmp_path / 'out3'}",
        "--data.num_train=1400",
        check=False,
    )
    assert proc.returncode == 1 and "the dataset has 1500 models" in proc.stderr
    assert not (tmp_path / "out3").exists()
