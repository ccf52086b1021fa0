"""Every figure draws and saves a PNG: the LDS curve (from curve points and from
``evaluation.json``), predicted against actual, the regularization path, top examples and
embeddings; no pyplot state is left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from dm_assets.evaluation.curve import CurvePoint
from dm_assets.evaluation.figures import (
    embeddings_figure,
    lds_curve_figure,
    path_figure,
    plot_lds_curve,
    plot_path,
    plot_predicted_vs_actual,
    save_png,
    top_examples_figure,
)
from dm_assets.evaluation.metrics import evaluate
from dm_assets_tests.helpers import PNG_SIGNATURE, write_small_fit


def correlated(seed: int, n: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and outputs ``(n, t)`` correlated to a different degree per target."""
    rng = np.random.default_rng(seed)
    actual = rng.normal(size=(n, t))
    predicted = actual + rng.normal(size=(n, t)) * rng.uniform(0.2, 3.0, size=t)
    return predicted, actual


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plots_write_pngs(tmp_path: Path) -> None:
    predicted, actual = correlated(15, n=80, t=10)
    result = evaluate(predicted, actual)
    points = [
        CurvePoint(n, n + 100, lds, lds + 0.02, lds - 0.1, 0.5, result)
        for n, lds in [(50, 0.2), (200, 0.45), (1000, 0.6)]
    ]
    no_refit = [CurvePoint(n, n, 0.5, 0.5, 0.2, 0.1, result) for n in (100, 200)]
    assert_png(plot_lds_curve(points, tmp_path / "a" / "curve.png", title="t", ceiling=0.7))
    assert_png(plot_lds_curve(points[1:2], tmp_path / "one.png"))
    assert_png(plot_lds_curve(no_refit, tmp_path / "linear.png"))
    assert_png(plot_lds_curve([], tmp_path / "empty.png", ceiling=0.7))
    assert_png(plot_predicted_vs_actual(predicted, actual, tmp_path / "pva.png"))
    assert_png(plot_predicted_vs_actual(predicted, actual, tmp_path / "two.png", targets=[3, 1]))
    with pytest.raises(ValueError, match=r"targets \[10\] are not columns"):
        plot_predicted_vs_actual(predicted, actual, tmp_path / "x.png", targets=[10])
    with pytest.raises(ValueError, match="targets has 3 entries but max_panels=2"):
        plot_predicted_vs_actual(
            predicted, actual, tmp_path / "x.png", targets=[0, 1, 2], max_panels=2
        )


def test_lds_curve_from_the_evaluation_file(tmp_path: Path) -> None:
    report = {
        "lds": 0.62,
        "noise_ceiling": 0.8,
        "curve": [
            {"n_train": 50, "n_models_used": 150, "lds": 0.3, "pearson": 0.35, "r2": 0.1},
            {"n_train": 400, "n_models_used": 500, "lds": 0.6, "pearson": 0.62, "r2": 0.3},
        ],
    }
    fig = lds_curve_figure(report["curve"], ceiling=report["noise_ceiling"], full_lds=report["lds"])
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == [
        "LDS (Spearman)",
        "Pearson",
        "LDS of the full fit",
        "noise ceiling (LDS) 0.800",
    ]
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), [150, 500])
    # an evaluation.json written before n_models_used existed: the training rows
    old = [{k: v for k, v in p.items() if k != "n_models_used"} for p in report["curve"]]
    np.testing.assert_array_equal(
        lds_curve_figure(old).axes[0].get_lines()[0].get_xdata(), [50, 400]
    )
    assert_png(save_png(fig, tmp_path / "curve.png"))


def test_path_plot_names_a_missing_column(tmp_path: Path) -> None:
    table = pd.read_csv(write_small_fit(tmp_path / "fit", n_targets=3) / "regularization_path.csv")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['chosen'\]"):
        plot_path(table.drop(columns="chosen"), tmp_path / "never-written.png")
    assert not (tmp_path / "never-written.png").exists()
    with pytest.raises(ValueError, match="no rows"):
        path_figure(table.iloc[:0])


@pytest.mark.parametrize("n_targets", [3, 70])
def test_path_plot_writes_a_png(tmp_path: Path, n_targets: int) -> None:
    import matplotlib.pyplot as plt

    figures_before = plt.get_fignums()
    out = write_small_fit(tmp_path / "fit", n_targets=n_targets)
    table = pd.read_csv(out / "regularization_path.csv")
    png = plot_path(table, tmp_path / "plots" / "path.png", title="demo fit")
    assert png == tmp_path / "plots" / "path.png"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert plt.get_fignums() == figures_before  # no pyplot figure left open


def test_top_examples_and_embeddings(tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    raw = rng.normal(size=(30, 8)) * (rng.random((30, 8)) < 0.5)
    images = (rng.random((30, 6, 6)), rng.random((8, 6, 6)))
    with_images = top_examples_figure(raw, [0, 3], images, k=3)
    assert len(with_images.axes) == 2 * (1 + 2 * 3)  # per target: itself and 2k examples
    assert_png(save_png(with_images, tmp_path / "top.png"))
    bars = top_examples_figure(raw, [1], None, k=3)
    assert len(bars.axes) == 1
    labels = np.arange(8) % 3
    assert_png(save_png(embeddings_figure(raw, labels), tmp_path / "embeddings.png"))
    assert_png(save_png(embeddings_figure(raw), tmp_path / "plain.png"))
    one = embeddings_figure(raw[:, :1])
    assert one.axes[0].texts[0].get_text() == "fewer than two targets"
