"""The fit folder: written atomically, read back exactly, evaluation beside it, the link to it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from dm_assets.errors import DmError
from dm_assets.regression.fit import (
    EVALUATION_FILES,
    FIT_FILES,
    MANIFEST_FILE,
    FitFolder,
    FitFolderError,
    ManifestMissingError,
)
from dm_assets.regression.manifest import FitManifest, configuration_summary
from dm_assets_tests.helpers import write_small_fit


def seeded_fit(seed: int = 0, p: int = 12, t: int = 3, k: int = 4) -> dict[str, Any]:
    """The contents of a fit folder (random, not a real fit) as FitFolder.write takes them."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(p, t)).astype(np.float32)
    weight[rng.random((p, t)) < 0.5] = 0.0
    weights = {
        "weight": torch.from_numpy(weight),
        "bias": torch.from_numpy(rng.normal(size=t).astype(np.float32)),
        "lam": torch.from_numpy(rng.random(t).astype(np.float32)),
        "lam_max": torch.from_numpy(1 + rng.random(t).astype(np.float32)),
        "mean": torch.from_numpy(rng.random(p).astype(np.float32)),
        "std": torch.from_numpy(0.5 + rng.random(p).astype(np.float32)),
    }
    target, step = np.repeat(np.arange(t), k), np.tile(np.arange(k), t)
    table = pd.DataFrame(
        {
            "target": target + 5,
            "step": step,
            "lambda": rng.random(t * k),
            "lambda_over_max": rng.random(t * k),
            "train_mse": rng.random(t * k),
            "val_mse": rng.random(t * k),
            "nonzeros": rng.integers(0, p, t * k),
            "chosen": (step == 1).astype(np.int8),
        }
    )
    summary = {
        "solver": "gram",
        "device": "cpu",
        "seconds": float(rng.random()),
        "n_train": 70,
        "n_val": 15,
        "n_features": p,
        "n_targets": t,
        "target_start_ind": 5,
        "mean_val_r2": float(rng.random()),
        "refit": True,
    }
    config = {
        "data": {"data_path": "d.beton", "num_train": 70, "num_val": 15, "target_start_ind": 5},
        "cfg": {"k": k, "device": "cpu", "out_dir": "somewhere"},
        "early_stopping": {"patience": None},
    }
    return {"weights": weights, "path_table": table, "summary": summary, "config": config}


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip(tmp_path: Path, seed: int) -> None:
    contents = seeded_fit(seed)
    written = FitFolder.write(tmp_path / "fits" / "a", **contents)
    assert written.path == (tmp_path / "fits" / "a").resolve()
    assert sorted(p.name for p in written.path.iterdir()) == sorted(FIT_FILES)

    folder = FitFolder.open(tmp_path / "fits" / "a")
    weights = folder.weights()
    assert weights.keys() == contents["weights"].keys()
    for name, tensor in contents["weights"].items():
        assert weights[name].dtype == tensor.dtype and torch.equal(weights[name], tensor), name
    # CSV keeps every float64 digit (pandas writes the shortest repr that reads back exactly)
    pd.testing.assert_frame_equal(folder.path_table(), contents["path_table"], check_dtype=False)
    assert folder.summary() == contents["summary"]
    assert folder.config() == contents["config"]
    assert folder.evaluation() is None and folder.per_target() is None
    assert folder.file("summary.json") == folder.path / "summary.json"
    with pytest.raises(ValueError, match=r"'notes\.txt' is not a fit folder file"):
        folder.file("notes.txt")


def test_write_outputs_writes_a_fit_folder(tmp_path: Path) -> None:
    fit_dir = write_small_fit(tmp_path / "fit", n_targets=2, k=5)
    folder = FitFolder.open(fit_dir)
    assert folder.summary()["n_targets"] == 2
    assert folder.weights()["weight"].shape == (24, 2)
    assert folder.config()["cfg"]["out_dir"] == str(tmp_path / "fit")
    assert set(folder.path_table()["target"]) == {0, 1}


def test_refuses_an_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists; choose a new directory"):
        FitFolder.write(tmp_path / "a", **seeded_fit())
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("name", FIT_FILES)
def test_a_missing_file_is_named(tmp_path: Path, name: str) -> None:
    folder = FitFolder.write(tmp_path / "a", **seeded_fit())
    folder.file(name).unlink()
    with pytest.raises(FitFolderError) as caught:
        FitFolder.open(tmp_path / "a")
    message = str(caught.value)
    assert f"lacks [{name!r}]" in message and str(folder.path) in message
    assert "write_outputs" in message  # the fix
    assert isinstance(caught.value, DmError) and isinstance(caught.value, FileNotFoundError)
    with pytest.raises(FitFolderError, match="is not a directory"):
        FitFolder.open(tmp_path / "absent")


def test_no_partial_folder_after_a_failure(tmp_path: Path) -> None:
    contents = seeded_fit()
    contents["summary"] = dict(contents["summary"], when=object())  # not JSON: fails mid-write
    with pytest.raises(TypeError, match="not JSON serializable"):
        FitFolder.write(tmp_path / "a", **contents)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_evaluation_round_trip(tmp_path: Path) -> None:
    folder = FitFolder.write(tmp_path / "a", **seeded_fit())
    evaluation = {
        "held_out_models": 9,
        "targets": 3,
        "lds": 0.25,
        "pearson": 0.5,
        "r2": -0.125,
        "noise_ceiling": None,
        "curve": [{"n_train": 10, "n_models_used": 12, "lds": 0.1, "pearson": 0.2, "r2": 0.0}],
    }
    per_target = pd.DataFrame(
        {"target": [5, 6, 7], "lds": [0.1, np.nan, 0.4], "pearson": [0.2, np.nan, 0.3]}
    )
    per_target["r2"] = [0.0, np.nan, 0.5]
    folder.write_evaluation(evaluation, per_target)
    assert folder.evaluation() == evaluation
    read = folder.per_target()
    assert read is not None
    pd.testing.assert_frame_equal(read, per_target)
    # written again: replaced, and no temporary file left beside the fit
    folder.write_evaluation(dict(evaluation, lds=0.5), per_target)
    reopened = FitFolder.open(folder.path).evaluation()
    assert reopened is not None and reopened["lds"] == 0.5
    assert sorted(p.name for p in folder.path.iterdir()) == sorted(
        [*FIT_FILES, *EVALUATION_FILES[:2]]
    )
    assert all(name.endswith(".png") for name in EVALUATION_FILES[2:])


def test_point_link_replaces_an_older_link(tmp_path: Path) -> None:
    old = FitFolder.write(tmp_path / "fits" / "old", **seeded_fit(0))
    new = FitFolder.write(tmp_path / "fits" / "new", **seeded_fit(1))
    link = tmp_path / "datamodels"
    old.point_link(link)
    assert os.readlink(link) == os.path.join("fits", "old")  # relative: the folder can move
    opened = FitFolder.open(link)
    assert opened.path == old.path
    new.point_link(link)
    assert os.readlink(link) == os.path.join("fits", "new")
    assert FitFolder.open(link).summary() == new.summary()
    # a folder opened before the link moved keeps reading its own fit
    assert opened.summary() == old.summary() != new.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datamodels", "fits"]


def seeded_manifest(seed: int = 0) -> FitManifest:
    """A manifest (random indices and digests, not of a real fit) as FitFolder.write takes it."""
    rng = np.random.default_rng(seed)
    used = rng.permutation(100)[:40]
    return FitManifest(
        train_indices=used[:30].astype(np.int64),
        val_indices=used[30:].astype(np.int64),
        dataset={"path": "/d.beton", "bytes": 123, "rows": 90, "digest": "sha256:ab"},
        rows={"digest": f"sha256:{seed}", "source": "store", "count": 40},
        regression={"data": {"num_train": 30, "num_val": 10}},
        targets=(5, 8),
        store={"path": "/store", "x_name": "masks", "y_name": "margins"},
        configurations={0: {"fingerprint": "f0", "configuration": {"args": {"a.b": "1"}}}},
        configuration_ids=configuration_summary(np.r_[np.zeros(35), -np.ones(5)]),
        code={"dm_assets": "0.1.0", "git_commit": None, "git_dirty": None},
        versions={"torch": "2", "numpy": "1"},
        dagster_run_id="run-a",
        created="2025-01-01T00:00:00+00:00",
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_manifest_round_trip(tmp_path: Path, seed: int) -> None:
    manifest = seeded_manifest(seed)
    folder = FitFolder.write(tmp_path / "a", **seeded_fit(seed), manifest=manifest)
    assert sorted(p.name for p in folder.path.iterdir()) == sorted([*FIT_FILES, MANIFEST_FILE])
    read = FitFolder.open(tmp_path / "a").manifest()
    assert read.to_dict() == manifest.to_dict()
    np.testing.assert_array_equal(read.fitted_indices, np.r_[read.train_indices, read.val_indices])
    assert read.train_indices.dtype == np.int64 and read.targets == (5, 8)
    assert read.mixed  # 5 rows of unknown configuration
    np.testing.assert_array_equal(read.row_configuration_ids(), np.r_[np.zeros(35), -np.ones(5)])
    assert json.loads(folder.file(MANIFEST_FILE).read_text())["format"] == 1


def test_record_runs_rewrites_only_the_run_ids_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = FitFolder.write(tmp_path / "a", **seeded_fit(), manifest=seeded_manifest())
    recorded = folder.record_runs(mlflow_run_id="mlflow-1")
    assert recorded.mlflow_run_id == "mlflow-1" and recorded.dagster_run_id == "run-a"
    expected = dict(seeded_manifest().to_dict(), mlflow_run_id="mlflow-1")
    assert folder.manifest().to_dict() == expected
    assert folder.record_runs(dagster_run_id="run-b").mlflow_run_id == "mlflow-1"
    before = folder.file(MANIFEST_FILE).read_bytes()

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("dm_assets.regression.fit.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        folder.record_runs(mlflow_run_id="mlflow-2")
    assert folder.file(MANIFEST_FILE).read_bytes() == before  # the old manifest, whole
    assert sorted(p.name for p in folder.path.iterdir()) == sorted([*FIT_FILES, MANIFEST_FILE])


def test_a_manifest_is_written_with_the_fit_or_not_at_all(tmp_path: Path) -> None:
    contents = seeded_fit()
    contents["summary"] = dict(contents["summary"], when=object())  # fails before the manifest
    with pytest.raises(TypeError):
        FitFolder.write(tmp_path / "a", **contents, manifest=seeded_manifest())
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_a_manifest_opens_and_says_why_it_has_none(tmp_path: Path) -> None:
    folder = FitFolder.write(tmp_path / "a", **seeded_fit())
    assert FitFolder.open(tmp_path / "a").summary()  # an older fit folder still opens
    assert not folder.has_manifest()
    with pytest.raises(ManifestMissingError) as caught:
        folder.manifest()
    message = str(caught.value)
    assert "no manifest.json: it was written before fits recorded their lineage" in message
    assert "refit" in message and isinstance(caught.value, DmError)
    with pytest.raises(ManifestMissingError):
        folder.record_runs(mlflow_run_id="x")
