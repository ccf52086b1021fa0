"""A fit folder judged on held-out models without Dagster: a small store in ``tmp_path``, its
dataset, a fit of its first rows, and the evaluation files written beside the fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_assets.evaluation.held_out import (
    FitRows,
    HeldOutError,
    evaluate_fit,
    fitted_and_held_out,
    held_out_predictions,
)
from dm_assets.evaluation.metrics import evaluate, predict
from dm_assets.regression.beton_writer import write_beton
from dm_assets.regression.config import RegressionConfig, load_config
from dm_assets.regression.fit import EVALUATION_FILES, FitFolder
from dm_assets.regression.fit_run import fit_into_folder
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets_tests.helpers import PNG_SIGNATURE, planted_problem

N_MODELS, N_COMPLETED, P, T = 400, 380, 30, 3


def small_experiment(tmp_path: Path) -> tuple[FitFolder, FitRows, RegressionConfig, np.ndarray]:
    """A store of 400 models of which 380 are trained (the last 20 not), its dataset, and a
    fit on the first 200 + 60 completed rows; returns the fit, its rows, its config and the
    planted problem's masks."""
    prob = planted_problem(n=N_MODELS, p=P, t=T, density=0.3, seed=7)
    spec = Spec.from_dict(
        {
            "num_models": N_MODELS,
            "schema": {
                "masks": {"shape": [P], "dtype": "bool_"},
                "margins": {"shape": [T], "dtype": "float32"},
            },
        }
    )
    with Store.initialize(tmp_path / "store", spec) as store:
        store.write_rows(
            [(i, {"masks": prob.x[i], "margins": prob.y[i]}) for i in range(N_COMPLETED)]
        )
    write_beton(tmp_path / "store", tmp_path / "data.beton")
    config = load_config(
        None,
        {
            "data": {"data_path": str(tmp_path / "data.beton"), "num_train": 200, "num_val": 60},
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
    run = fit_into_folder(config, tmp_path / "fit")
    rows = FitRows.of(config, store=tmp_path / "store", x_name="masks", y_name="margins")
    return run.folder, rows, config, prob.x


def test_evaluate_fit_writes_the_files_and_scores_the_unseen_models(tmp_path: Path) -> None:
    fit, rows, config, x = small_experiment(tmp_path)
    assert rows.dataset == tmp_path / "data.beton" and (rows.num_train, rows.num_val) == (200, 60)
    judged = evaluate_fit(fit, rows, config=config, curve_sizes=[50, 200], experiment="small")
    # completed models beyond the 260 the fit used: 260 .. 379
    np.testing.assert_array_equal(judged.held_out, np.arange(260, N_COMPLETED))
    with Store.open(rows.store) as store:
        seen, held = fitted_and_held_out(rows.dataset, store, 200, 60)
        actual = np.asarray(store.read("margins")[held], dtype=np.float64)
    np.testing.assert_array_equal(seen, np.arange(260))
    expected = evaluate(predict(fit.weights(), x[held]), actual)
    assert judged.evaluation.lds == pytest.approx(expected.lds, abs=1e-12)
    assert judged.evaluation.lds > 0.8  # planted weights, 120 held-out models
    assert [p.n_train for p in judged.curve] == [50, 200]
    for name in EVALUATION_FILES:
        assert fit.file(name).stat().st_size > 0
    for name in ("lds_curve.png", "predicted_vs_actual.png"):
        assert fit.file(name).read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads(fit.file("evaluation.json").read_text())
    assert report == fit.evaluation() == judged.report
    assert report["held_out_models"] == 120 and report["targets"] == T
    assert report["lds"] == judged.evaluation.lds and report["noise_ceiling"] is None
    assert [p["n_models_used"] for p in report["curve"]] == [110, 260]  # refit on + 60
    per_target = pd.read_csv(fit.file("evaluation_per_target.csv"))
    assert list(per_target.columns) == ["target", "lds", "pearson", "r2"]
    np.testing.assert_allclose(per_target["lds"], judged.evaluation.lds_per_target)
    assert judged.metrics() == {
        "lds": judged.evaluation.lds,
        "pearson": judged.evaluation.pearson,
        "r2": judged.evaluation.r2,
    }
    # the notebook's reading of the same held-out models
    indices, predicted, observed = held_out_predictions(fit.weights(), rows)
    np.testing.assert_array_equal(indices, judged.held_out)
    assert evaluate(predicted, observed).lds == pytest.approx(judged.evaluation.lds, abs=1e-12)


def test_evaluate_fit_without_a_curve_and_without_held_out_models(tmp_path: Path) -> None:
    fit, rows, config, _ = small_experiment(tmp_path)
    judged = evaluate_fit(fit, rows, config=config, experiment="small")
    assert judged.curve == [] and judged.report["curve"] == []
    assert fit.file("lds_curve.png").read_bytes().startswith(PNG_SIGNATURE)  # says "no curve"
    # a fit that used every completed model but two leaves nothing to judge
    greedy = FitRows.of(config, store=rows.store, x_name="masks", y_name="margins")
    greedy = FitRows(**{**greedy.__dict__, "num_train": 318, "num_val": 60})
    with pytest.raises(HeldOutError, match=r"only 2 held-out model\(s\) of 'small' are trained"):
        evaluate_fit(fit, greedy, config=config, experiment="small")
