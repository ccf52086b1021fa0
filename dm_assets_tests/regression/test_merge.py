"""Merging fits of slices of the targets: the same answer as one fit of every target, and clear
errors for slices that do not tile a range or come from different training models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dm_assets.regression.beton_writer import write_beton
from dm_assets.regression.compute_datamodels import compute_datamodels, write_outputs
from dm_assets.regression.config import load_config
from dm_assets.regression.data import ArraySource
from dm_assets.regression.fit import FIT_FILES, MANIFEST_FILE, FitFolder
from dm_assets.regression.fit_run import configure_fit, fit_into_folder
from dm_assets.regression.merge import MergeError, TargetSlice, merge_fits, target_slices
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets_tests.helpers import Problem, planted_problem


def fit_targets(prob: Problem, out_dir: Path, start: int, end: int, *, num_train: int = 700):
    """Fit targets ``[start, end)`` of ``prob`` with the gram solver into ``out_dir``."""
    config = load_config(
        None,
        {
            "data": {
                "data_path": "unused",
                "num_train": num_train,
                "num_val": 150,
                "target_start_ind": start,
                "target_end_ind": end,
            },
            "cfg": {
                "k": 12,
                "batch_size": 200,
                "out_dir": str(out_dir),
                "device": "cpu",
                "solver": "gram",
            },
        },
    )
    # the beton source slices the targets; with arrays the test does
    fit = compute_datamodels(config, source=ArraySource(prob.x, prob.y[:, start:end]))
    return write_outputs(fit, out_dir, config)


@pytest.fixture(scope="module")
def planted() -> Problem:
    return planted_problem(n=1000, p=40, t=7, seed=3)


def test_target_slices_tile_the_range_with_sorting_keys() -> None:
    slices = target_slices(0, 797, 200)
    assert [(s.start, s.end) for s in slices] == [(0, 200), (200, 400), (400, 600), (600, 797)]
    assert [s.key for s in slices] == ["t000-199", "t200-399", "t400-599", "t600-796"]
    assert [s.key for s in target_slices(0, 4, 2)] == ["t0-1", "t2-3"]
    assert [s.key for s in target_slices(3, 12, 5)] == ["t03-07", "t08-11"]
    with pytest.raises(ValueError, match="per_slice=0"):
        target_slices(0, 4, 0)


def test_merged_slices_equal_one_fit_of_every_target(tmp_path: Path, planted: Problem) -> None:
    whole = fit_targets(planted, tmp_path / "whole", 0, 7)
    parts = [
        fit_targets(planted, tmp_path / f"slice{a}", a, b) for a, b in ((4, 7), (0, 2), (2, 4))
    ]
    merged = merge_fits(parts, tmp_path / "merged")
    assert sorted(p.name for p in merged.iterdir()) == sorted(FIT_FILES)

    expected = torch.load(whole / "datamodels.pt")
    got = torch.load(merged / "datamodels.pt")
    assert list(got) == list(expected)
    # each target's path is solved on its own from the same statistics, to a duality gap of
    # 1e-6 of var(y): a different set of neighbouring targets moves nothing beyond rounding
    for name in ("weight", "bias", "lam", "lam_max"):
        assert got[name].shape == expected[name].shape, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["mean"], expected["mean"]) and torch.equal(got["std"], expected["std"])

    path = pd.read_csv(merged / "regularization_path.csv")
    reference = pd.read_csv(whole / "regularization_path.csv")
    assert list(path.columns) == list(reference.columns)
    assert path[["target", "step", "nonzeros", "chosen"]].equals(
        reference[["target", "step", "nonzeros", "chosen"]]
    )
    np.testing.assert_allclose(path["val_mse"], reference["val_mse"], rtol=1e-5)

    summary = json.loads((merged / "summary.json").read_text())
    single = json.loads((whole / "summary.json").read_text())
    assert summary["n_targets"] == 7 and summary["target_start_ind"] == 0
    for key in ("n_train", "n_val", "n_features", "n_models_in_dataset", "solver", "device"):
        assert summary[key] == single[key], key
    for key in ("mean_val_r2", "mean_nonzeros", "mean_lambda_over_max"):
        assert summary[key] == pytest.approx(single[key], rel=1e-5), key
    assert [s["target_start_ind"] for s in summary["slices"]] == [0, 2, 4]
    assert summary["seconds"] == pytest.approx(sum(s["seconds"] for s in summary["slices"]))

    config = yaml.safe_load((merged / "config.yaml").read_text())
    assert (config["data"]["target_start_ind"], config["data"]["target_end_ind"]) == (0, 7)
    assert config["cfg"]["out_dir"] == str(tmp_path / "merged")
    load_config(None, config)  # still a valid config


def test_merge_names_gaps_and_overlaps(tmp_path: Path, planted: Problem) -> None:
    a = fit_targets(planted, tmp_path / "a", 0, 2)
    b = fit_targets(planted, tmp_path / "b", 3, 5)
    c = fit_targets(planted, tmp_path / "c", 4, 7)
    with pytest.raises(MergeError) as caught:
        merge_fits([a, b, c], tmp_path / "merged")
    message = str(caught.value)
    assert "gap: targets [2, 3)" in message and "overlap: targets [4, 5)" in message
    assert str(a) in message and str(c) in message
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_slices_of_different_training_models(
    tmp_path: Path, planted: Problem
) -> None:
    a = fit_targets(planted, tmp_path / "a", 0, 2)
    b = fit_targets(planted, tmp_path / "b", 2, 4, num_train=600)
    with pytest.raises(MergeError) as caught:
        merge_fits([a, b], tmp_path / "merged")
    message = str(caught.value)
    assert "standardization" in message and "different training models" in message
    assert "config data.num_train: 700" in message
    # equal counts and configs, but other column statistics (another dataset's first rows)
    c = tmp_path / "c"
    c.mkdir()
    for name in FIT_FILES:
        (c / name).write_bytes((a / name).read_bytes())
    config = yaml.safe_load((a / "config.yaml").read_text())
    config["data"]["target_start_ind"], config["data"]["target_end_ind"] = 2, 4
    (c / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    weights = torch.load(a / "datamodels.pt")
    torch.save(dict(weights, mean=weights["mean"] + 1e-3), c / "datamodels.pt")
    with pytest.raises(MergeError, match="mean: the standardization"):
        merge_fits([a, c], tmp_path / "merged")


def test_merge_refuses_an_existing_out_dir_and_incomplete_folders(
    tmp_path: Path, planted: Problem
) -> None:
    a = fit_targets(planted, tmp_path / "a", 0, 7)
    (tmp_path / "merged").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        merge_fits([a], tmp_path / "merged")
    (a / "summary.json").unlink()
    with pytest.raises(MergeError, match="lacks"):
        merge_fits([a], tmp_path / "other")


@pytest.fixture(scope="module")
def stored(planted: Problem, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted problem's 1000 models in a store (no configuration recorded) and its
    dataset ``data.beton`` beside it; returns the folder."""
    root = tmp_path_factory.mktemp("stored")
    spec = Spec.from_dict(
        {
            "num_models": 1000,
            "schema": {
                "masks": {"shape": [40], "dtype": "bool_"},
                "margins": {"shape": [7], "dtype": "float32"},
            },
        }
    )
    with Store.initialize(root / "store", spec) as store:
        store.write_rows(
            [(i, {"masks": planted.x[i], "margins": planted.y[i]}) for i in range(1000)]
        )
    write_beton(root / "store", root / "data.beton", num_workers=1)
    return root


def fit_slice(stored: Path, out_dir: Path, start: int, end: int) -> Path:
    """Fit targets ``[start, end)`` of the stored dataset, with a manifest."""
    config = load_config(
        None,
        {
            "data": {"data_path": str(stored / "data.beton"), "num_train": 700, "num_val": 150},
            "cfg": {
                "k": 6,
                "batch_size": 200,
                "out_dir": str(out_dir),
                "device": "cpu",
                "solver": "gram",
                "num_workers": 1,
            },
        },
    )
    config = configure_fit(config, targets=TargetSlice(start, end, f"t{start}"))
    run = fit_into_folder(
        config,
        out_dir,
        store=stored / "store",
        x_name="masks",
        y_name="margins",
        dagster_run_id=f"slice-run-{start}",
    )
    return run.folder.path


def test_merged_slices_get_a_manifest_of_their_common_models(tmp_path: Path, stored: Path) -> None:
    parts = [fit_slice(stored, tmp_path / f"s{a}", a, b) for a, b in ((0, 3), (3, 7))]
    merged = FitFolder.open(merge_fits(parts, tmp_path / "merged", dagster_run_id="merge-run"))
    manifest = merged.manifest()
    first = FitFolder.open(parts[0]).manifest()
    np.testing.assert_array_equal(manifest.train_indices, np.arange(700))
    np.testing.assert_array_equal(manifest.val_indices, np.arange(700, 850))
    assert manifest.dataset == first.dataset and manifest.rows == first.rows
    assert manifest.targets == (0, 7) and manifest.dagster_run_id == "merge-run"
    assert manifest.regression["data"]["target_end_ind"] == 7
    assert manifest.configuration_ids["unknown"] == 850 and manifest.mixed
    assert [s["targets"] for s in manifest.slices or []] == [[0, 3], [3, 7]]
    assert [s["dagster_run_id"] for s in manifest.slices or []] == ["slice-run-0", "slice-run-3"]


def test_merge_refuses_slices_whose_manifests_disagree(tmp_path: Path, stored: Path) -> None:
    a = fit_slice(stored, tmp_path / "a", 0, 3)
    b = fit_slice(stored, tmp_path / "b", 3, 7)
    manifest = json.loads((b / MANIFEST_FILE).read_text())
    manifest["train_indices"][0] = 999  # as if fitted on other models
    manifest["rows"]["digest"] = "sha256:other"
    (b / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(MergeError) as caught:
        merge_fits([a, b], tmp_path / "merged")
    message = str(caught.value)
    assert f"train_indices of {b} differ from those of {a}" in message
    assert f"manifest rows of {b} differs" in message
    (b / MANIFEST_FILE).unlink()  # a slice fitted before manifests, beside one with a manifest
    with pytest.raises(MergeError, match=r"has no manifest\.json .* refit it"):
        merge_fits([a, b], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
