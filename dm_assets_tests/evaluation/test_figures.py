"""Every figure draws and saves a PNG: the LDS curve (from curve points and from
``evaluation.json``), predicted against actual, the regularization path, top examples and
embeddings; no pyplot state is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dm_assets.evaluation.curve import CurvePoint, LdsCurve
from dm_assets.evaluation.figures import (
    embeddings_figure,
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
        CurvePoint(n, lds, (lds - 0.03, lds + 0.02), lds + 0.02, lds - 0.1, 0.5, 0.0, 0.1, result)
        for n, lds in [(50, 0.2), (200, 0.45), (1000, 0.6)]
    ]
    curve = LdsCurve(points, [], None, folds=5, resamples=100, seed=0, level=0.95)
    assert_png(plot_lds_curve(curve, tmp_path / "a" / "curve.png", title="t", ceiling=0.7))
    assert_png(plot_lds_curve(curve.to_dict(), tmp_path / "dict.png", ceiling_ci=(0.6, 0.8)))
    assert_png(plot_lds_curve(None, tmp_path / "empty.png", ceiling=0.7))
    assert_png(plot_predicted_vs_actual(predicted, actual, tmp_path / "pva.png"))
    assert_png(plot_predicted_vs_actual(predicted, actual, tmp_path / "two.png", targets=[3, 1]))
    with pytest.raises(ValueError, match=r"targets \[10\] are not columns"):
        plot_predicted_vs_actual(predicted, actual, tmp_path / "x.png", targets=[10])
    with pytest.raises(ValueError, match="targets has 3 entries but max_panels=2"):
        plot_predicted_vs_actual(
            predicted, actual, tmp_path / "x.png", targets=[0, 1, 2], max_panels=2
        )


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


def test_the_path_figure_draws_without_the_evaluation_imports(tmp_path: Path) -> None:
    # every fit draws it (and logs it to MLflow): scipy.stats and numba, which the held-out
    # evaluation needs, cost a second or more of each fit's step if the figures module pulls
    # them in
    table = write_small_fit(tmp_path / "fit", n_targets=3) / "regularization_path.csv"
    code = (
        "import sys, pandas as pd\n"
        "from dm_assets.evaluation.figures import plot_path\n"
        f"plot_path(pd.read_csv({str(table)!r}), {str(tmp_path / 'p.png')!r})\n"
        "print(sorted(m for m in ('scipy.stats', 'numba') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_SIGNATURE)


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
