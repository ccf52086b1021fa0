"""path_metrics: per-step statistics of a regularization path, checked by hand (its plot:
dm_assets_tests/evaluation/test_figures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_assets.regression.path_metrics import STEP_METRIC_COLUMNS, step_metrics
from dm_assets_tests.helpers import write_small_fit


def hand_table() -> pd.DataFrame:
    """Three targets of four left on the path for 3, 2 and 1 steps, rows shuffled."""
    rows = [
        # target, step, lambda, lambda_over_max, train_mse, val_mse, nonzeros, chosen
        (0, 0, 2.0, 1.0, 3.0, 4.0, 0, 0),
        (0, 1, 0.2, 0.1, 1.0, 2.0, 2, 0),
        (0, 2, 0.02, 0.01, 0.5, 1.0, 5, 1),
        (1, 0, 4.0, 1.0, 5.0, 6.0, 0, 0),
        (1, 1, 2.0, 0.5, 2.0, 3.0, 4, 1),
        (2, 0, 1.0, 1.0, 7.0, 11.0, 0, 1),
    ]
    columns = [
        "target",
        "step",
        "lambda",
        "lambda_over_max",
        "train_mse",
        "val_mse",
        "nonzeros",
        "chosen",
    ]
    return pd.DataFrame(rows, columns=columns).sample(frac=1.0, random_state=3)


def test_step_metrics_by_hand() -> None:
    got = step_metrics(hand_table(), n_targets=4)
    assert list(got.columns) == list(STEP_METRIC_COLUMNS)
    assert got["step"].dtype == np.int64
    expected = pd.DataFrame(
        {
            "step": np.array([0, 1, 2], dtype=np.int64),
            "mean_val_mse": [7.0, 2.5, 1.0],  # (4 + 6 + 11) / 3, (2 + 3) / 2, 1
            "median_val_mse": [6.0, 2.5, 1.0],
            "mean_train_mse": [5.0, 1.5, 0.5],
            "mean_nonzeros": [0.0, 3.0, 5.0],
            "fraction_on_path": [0.75, 0.5, 0.25],  # 3, 2, 1 of the fit's 4 targets
            "mean_lambda_over_max": [1.0, 0.3, 0.01],
        }
    )
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-15)


def test_step_metrics_of_a_real_fit(tmp_path: Path) -> None:
    out = write_small_fit(tmp_path / "fit", n_targets=4)
    table = pd.read_csv(out / "regularization_path.csv")
    n_targets = json.loads((out / "summary.json").read_text())["n_targets"]
    got = step_metrics(table, n_targets)
    assert got["step"].tolist() == sorted(table["step"].unique())
    # every target starts at lambda_max with no weights; targets leave and never come back
    assert got["fraction_on_path"].iloc[0] == 1.0
    assert got["mean_nonzeros"].iloc[0] == 0.0
    assert got["mean_lambda_over_max"].iloc[0] == pytest.approx(1.0)
    assert (np.diff(got["fraction_on_path"]) <= 0).all()
    assert (np.diff(got["mean_lambda_over_max"]) < 0).all()
    for step, row in got.set_index("step").iterrows():
        at = table[table["step"] == step]
        assert row["mean_val_mse"] == pytest.approx(at["val_mse"].mean(), rel=1e-12)
        assert row["median_val_mse"] == pytest.approx(np.median(at["val_mse"]), rel=1e-12)
        assert row["mean_train_mse"] == pytest.approx(at["train_mse"].mean(), rel=1e-12)
        assert row["mean_nonzeros"] == pytest.approx(at["nonzeros"].mean(), rel=1e-12)
        assert row["fraction_on_path"] == len(at) / n_targets


def test_bad_tables_are_named() -> None:
    table = hand_table()
    with pytest.raises(ValueError, match=r"missing column\(s\) \['val_mse'\].*regularization_path"):
        step_metrics(table.drop(columns="val_mse"), n_targets=4)
    with pytest.raises(ValueError, match="n_targets=2 but the table holds 3 distinct"):
        step_metrics(table, n_targets=2)
    with pytest.raises(ValueError, match=r"repeated \(target, step\)"):
        step_metrics(pd.concat([table, table]), n_targets=4)
    with pytest.raises(TypeError, match="table must be a pandas DataFrame"):
        step_metrics(table.to_dict(), n_targets=4)  # type: ignore[arg-type]
