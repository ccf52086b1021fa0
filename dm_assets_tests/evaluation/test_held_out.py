"""A fit folder judged on held-out models without Dagster: a small store in ``tmp_path``, its
dataset, a fit of its first rows, and the evaluation files written beside the fit. Which models
are held out comes from the fit's manifest: not from the current settings or dataset, and never
a model whose rows changed since the fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_assets.evaluation.held_out import (
    FitRows,
    HeldOutError,
    RowsChangedError,
    evaluate_fit,
    held_out_predictions,
    held_out_set,
)
from dm_assets.evaluation.metrics import evaluate, predict
from dm_assets.regression.beton_writer import write_beton
from dm_assets.regression.config import RegressionConfig, load_config
from dm_assets.regression.fit import EVALUATION_FILES, MANIFEST_FILE, FitFolder
from dm_assets.regression.fit_run import fit_into_folder
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets.training.configuration import configuration_for
from dm_assets_tests.helpers import PNG_SIGNATURE, Problem, planted_problem

N_MODELS, N_COMPLETED, P, T = 400, 380, 30, 3
SPEC = {
    "num_models": N_MODELS,
    "schema": {
        "masks": {"shape": [P], "dtype": "bool_"},
        "margins": {"shape": [T], "dtype": "float32"},
    },
}
LATE = np.arange(100, 120)  # models that complete after the fit in the growing scenario


def fit_config(tmp_path: Path, num_train: int = 200, num_val: int = 60) -> RegressionConfig:
    return load_config(
        None,
        {
            "data": {
                "data_path": str(tmp_path / "data.beton"),
                "num_train": num_train,
                "num_val": num_val,
            },
            "cfg": {
                "k": 8,
                "batch_size": 100,
                "out_dir": str(tmp_path / "fit"),
                "device": "cpu",
                "solver": "gram",
                "num_workers": 1,
            },
        },
    )


def small_experiment(
    tmp_path: Path, *, completed: np.ndarray | None = None, num_train: int = 200
) -> tuple[FitFolder, FitRows, RegressionConfig, Problem]:
    """A store of 400 models of which ``completed`` are trained (default the first 380) with
    a recorded training configuration (id 0), its dataset, and a fit (with its manifest) on
    the dataset's first ``num_train`` + 60 rows; returns the fit, its rows, its config and the
    planted problem."""
    prob = planted_problem(n=N_MODELS, p=P, t=T, density=0.3, seed=7)
    spec = Spec.from_dict(SPEC)
    done = np.arange(N_COMPLETED) if completed is None else completed
    with Store.initialize(tmp_path / "store", spec) as store:
        config_id = store.register_configuration(
            configuration_for(SPEC["schema"], "trainer.module", ["--x.lr=0.1"], version="1")
        )
        store.write_rows(
            [(int(i), {"masks": prob.x[i], "margins": prob.y[i]}) for i in done],
            configuration_id=config_id,
        )
    write_beton(tmp_path / "store", tmp_path / "data.beton")
    config = fit_config(tmp_path, num_train=num_train)
    run = fit_into_folder(
        config,
        tmp_path / "fit",
        store=tmp_path / "store",
        x_name="masks",
        y_name="margins",
        dagster_run_id="dagster-run-1",
    )
    rows = FitRows.of(config, store=tmp_path / "store", x_name="masks", y_name="margins")
    return run.folder, rows, config, prob


def test_the_manifest_records_the_models_dataset_and_configuration(tmp_path: Path) -> None:
    fit, _, _, _ = small_experiment(tmp_path)
    manifest = fit.manifest()
    np.testing.assert_array_equal(manifest.train_indices, np.arange(200))
    np.testing.assert_array_equal(manifest.val_indices, np.arange(200, 260))
    data = tmp_path / "data.beton"
    assert manifest.dataset["path"] == str(data.resolve())
    assert manifest.dataset["bytes"] == data.stat().st_size and manifest.dataset["rows"] == 380
    assert manifest.dataset["digest"].startswith("sha256:")
    assert manifest.store == {
        "path": str((tmp_path / "store").resolve()),
        "x_name": "masks",
        "y_name": "margins",
    }
    assert manifest.rows["source"] == "store" and manifest.rows["count"] == 260
    assert manifest.configuration_ids == {
        "runs": [[0, 260]],
        "counts": {"0": 260},
        "unknown": 0,
        "mixed": False,
    }
    assert manifest.configurations[0]["configuration"]["args"] == {"x.lr": "0.1"}
    assert manifest.targets == (0, T) and manifest.regression["data"]["num_train"] == 200
    assert manifest.dagster_run_id == "dagster-run-1" and manifest.mlflow_run_id is None
    assert set(manifest.versions) >= {"torch", "numpy", "dagster", "mlflow"}
    assert manifest.code["dm_assets"]


def test_evaluate_fit_writes_the_files_and_scores_the_unseen_models(tmp_path: Path) -> None:
    fit, rows, config, prob = small_experiment(tmp_path)
    x = prob.x
    assert rows.dataset == tmp_path / "data.beton" and (rows.num_train, rows.num_val) == (200, 60)
    judged = evaluate_fit(fit, rows, config=config, curve_sizes=[50, 200], experiment="small")
    # completed models beyond the 260 the fit used: 260 .. 379
    np.testing.assert_array_equal(judged.held_out, np.arange(260, N_COMPLETED))
    with Store.open(rows.store) as store:
        chosen = held_out_set(fit, store, x_name="masks", y_name="margins")
        seen, held = chosen.fitted, chosen.held_out
        actual = np.asarray(store.read("margins")[held], dtype=np.float64)
    np.testing.assert_array_equal(seen, np.arange(260))
    expected = evaluate(predict(fit.weights(), x[held]), actual)
    assert judged.evaluation.lds == pytest.approx(expected.lds, abs=1e-12)
    assert judged.evaluation.lds > 0.8  # planted weights, 120 held-out models
    assert judged.curve is not None
    assert [p.n_models for p in judged.curve.points] == [50, 200]
    for name in EVALUATION_FILES:
        assert fit.file(name).stat().st_size > 0
    for name in ("lds_curve.png", "predicted_vs_actual.png"):
        assert fit.file(name).read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads(fit.file("evaluation.json").read_text())
    assert report == fit.evaluation() == judged.report
    assert report["held_out_models"] == 120 and report["targets"] == T
    assert report["held_out_indices"] == list(range(260, N_COMPLETED))
    assert report["excluded_same_mask"] == []
    assert report["rows_digest"] == fit.manifest().rows["digest"]
    assert report["lds"] == judged.evaluation.lds and report["noise_ceiling"] is None
    # each point counts every model it used (K-fold lambda choice inside N, refit on N)
    assert [p["n_models"] for p in report["curve"]["points"]] == [50, 200]
    assert report["curve"]["folds"] == 5 and len(report["curve"]["slopes"]) == 1
    low, high = report["ci"]
    assert report["lds_ci"] == report["ci"] if "lds_ci" in report else True
    assert low < high and abs(report["lds"] - (low + high) / 2) < high - low
    assert report["bootstrap"]["resamples"] == 1000 and report["mean_of_seeds"] is None
    per_target = pd.read_csv(fit.file("evaluation_per_target.csv"))
    assert list(per_target.columns) == ["target", "lds", "pearson", "r2"]
    np.testing.assert_allclose(per_target["lds"], judged.evaluation.lds_per_target)
    assert judged.metrics() == {
        "lds": judged.evaluation.lds,
        "lds_ci_low": low,
        "lds_ci_high": high,
        "pearson": judged.evaluation.pearson,
        "r2": judged.evaluation.r2,
    }
    # the notebook's reading of the same held-out models
    indices, predicted, observed = held_out_predictions(fit, rows)
    np.testing.assert_array_equal(indices, judged.held_out)
    assert evaluate(predicted, observed).lds == pytest.approx(judged.evaluation.lds, abs=1e-12)


def test_evaluate_fit_without_a_curve_and_without_held_out_models(tmp_path: Path) -> None:
    fit, rows, config, _ = small_experiment(tmp_path)
    judged = evaluate_fit(fit, rows, config=config, experiment="small")
    assert judged.curve is None and judged.report["curve"] is None
    assert fit.file("lds_curve.png").read_bytes().startswith(PNG_SIGNATURE)  # says "no curve"
    # a fit that used every completed model but two leaves nothing to judge
    greedy_dir = tmp_path / "greedy"
    greedy = fit_into_folder(
        fit_config(tmp_path, num_train=318),
        greedy_dir,
        store=rows.store,
        x_name="masks",
        y_name="margins",
    ).folder
    with pytest.raises(HeldOutError, match=r"only 2 held-out model\(s\) of 'small' are trained"):
        evaluate_fit(greedy, rows, config=config, experiment="small")


def test_more_models_and_a_rewritten_dataset_keep_the_held_out_set_and_lds(
    tmp_path: Path,
) -> None:
    # models 100..119 finish late: the fit's 260 rows are models 0..99 and 120..279
    early = np.setdiff1d(np.arange(N_COMPLETED), LATE)
    fit, rows, config, prob = small_experiment(tmp_path, completed=early)
    before = evaluate_fit(fit, rows, config=config, experiment="small")
    fitted = fit.manifest().fitted_indices
    np.testing.assert_array_equal(fitted, np.setdiff1d(np.arange(280), LATE))
    np.testing.assert_array_equal(before.held_out, np.arange(280, N_COMPLETED))
    # the late models complete and the dataset is rewritten: its first 260 rows are now
    # models 0..259, so a split read from the dataset would call models 260..279 held out
    with Store.open(rows.store) as store:
        config_id = store.register_configuration(
            configuration_for(SPEC["schema"], "trainer.module", ["--x.lr=0.1"], version="1")
        )
        store.write_rows(
            [(int(i), {"masks": prob.x[i], "margins": prob.y[i]}) for i in LATE],
            configuration_id=config_id,
        )
    write_beton(rows.store, rows.dataset)
    after = evaluate_fit(fit, rows, config=config, experiment="small")
    np.testing.assert_array_equal(after.held_out, np.union1d(before.held_out, LATE))
    assert not np.isin(after.held_out, fitted).any()
    # on the models held out before, the same predictions: the same LDS
    with Store.open(rows.store) as store:
        actual = np.asarray(store.read("margins")[before.held_out], dtype=np.float64)
    again = evaluate(predict(fit.weights(), prob.x[before.held_out]), actual)
    assert again.lds == pytest.approx(before.evaluation.lds, abs=1e-12)
    # and with no new model, a rewritten dataset changes nothing at all
    write_beton(rows.store, rows.dataset)
    same = evaluate_fit(fit, rows, config=config, experiment="small")
    np.testing.assert_array_equal(same.held_out, after.held_out)
    assert same.evaluation.lds == after.evaluation.lds


def test_editing_the_split_after_the_fit_changes_nothing(tmp_path: Path) -> None:
    fit, rows, config, _ = small_experiment(tmp_path)
    judged = evaluate_fit(fit, rows, config=config, experiment="small")
    edited = FitRows(**{**rows.__dict__, "num_train": 100, "num_val": 20})
    again = evaluate_fit(
        fit, edited, config=fit_config(tmp_path, 100, 20), curve_sizes=[50], experiment="small"
    )
    np.testing.assert_array_equal(again.held_out, judged.held_out)
    assert again.evaluation.lds == judged.evaluation.lds
    assert again.curve is not None  # the curve's N counts the fit's own models, 0 .. 259
    assert again.curve.points[0].n_models == 50 and again.curve.points[0].fit.n == 50


def test_a_row_retrained_under_another_configuration_is_refused(tmp_path: Path) -> None:
    fit, rows, config, prob = small_experiment(tmp_path)
    with Store.open(rows.store) as store:
        other = store.register_configuration(
            configuration_for(SPEC["schema"], "trainer.module", ["--x.lr=2.0"], version="1")
        )
        store.write_row(
            5,
            {"masks": prob.x[5], "margins": prob.y[5] + 1},
            overwrite=True,
            configuration_id=other,
        )
    with pytest.raises(RowsChangedError) as raised:
        evaluate_fit(fit, rows, config=config, experiment="small")
    message = str(raised.value)
    assert "model 5: configuration 0 -> 1 (x.lr: 0.1 -> 2.0" in message
    assert "refit" in message
    with pytest.raises(RowsChangedError):
        held_out_predictions(fit, rows)  # the notebook's reading refuses alike


def test_rewritten_values_under_the_same_configuration_are_refused(tmp_path: Path) -> None:
    fit, rows, config, prob = small_experiment(tmp_path)
    with Store.open(rows.store) as store:
        store.write_row(
            250,
            {"masks": prob.x[250], "margins": prob.y[250] * 2},
            overwrite=True,
            configuration_id=0,
        )
    with pytest.raises(RowsChangedError, match="masks or outputs of the 260 models"):
        evaluate_fit(fit, rows, config=config, experiment="small")


def test_a_held_out_model_with_a_fitted_mask_is_left_out(tmp_path: Path) -> None:
    fit, rows, config, prob = small_experiment(tmp_path)
    with Store.open(rows.store) as store:
        # model 385 (not trained at the fit) repeats model 10's mask: a replicate
        store.write_row(385, {"masks": prob.x[10], "margins": prob.y[10]}, configuration_id=0)
    judged = evaluate_fit(fit, rows, config=config, experiment="small")
    np.testing.assert_array_equal(judged.held_out, np.arange(260, N_COMPLETED))
    assert judged.report["excluded_same_mask"] == [385]


def test_a_fit_without_a_manifest_gets_a_clear_message(tmp_path: Path) -> None:
    fit, rows, config, _ = small_experiment(tmp_path)
    fit.file(MANIFEST_FILE).unlink()  # as a fit folder written before manifests
    with pytest.raises(HeldOutError, match=r"no manifest\.json: it was written before"):
        evaluate_fit(fit, rows, config=config, experiment="small")


def test_a_fit_not_told_its_store_is_checked_by_its_rows_digest(tmp_path: Path) -> None:
    _, rows, _, prob = small_experiment(tmp_path)
    # as the seed's command fits: the manifest read the rows from the dataset, ids unknown
    blind = fit_into_folder(fit_config(tmp_path), tmp_path / "blind").folder
    assert blind.manifest().store is None and blind.manifest().mixed
    judged = evaluate_fit(blind, rows, experiment="small")
    np.testing.assert_array_equal(judged.held_out, np.arange(260, N_COMPLETED))
    with Store.open(rows.store) as store:
        store.write_row(
            7, {"masks": prob.x[7], "margins": prob.y[7] - 1}, overwrite=True, configuration_id=0
        )
    with pytest.raises(RowsChangedError, match="rows digest"):
        evaluate_fit(blind, rows, experiment="small")
