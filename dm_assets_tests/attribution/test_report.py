"""The report's compute accounting and figure."""

from __future__ import annotations

from pathlib import Path

from dm_assets.attribution.report import ComputePoint, _curve_points, lds_vs_compute_figure
from dm_assets.evaluation.figures import save_png


def test_curve_compute_is_models_times_seconds_plus_fit_seconds() -> None:
    evaluation = {
        "curve": {
            "points": [
                {"n_models": 200, "lds": 0.5, "seconds": 3.0},
                {"n_models": 100, "lds": 0.4, "seconds": 1.0},
            ],
            "folds": 5,
        }
    }
    points, source = _curve_points(evaluation, 0.5)
    assert [p["models"] for p in points] == [100, 200]
    assert [p["seconds"] for p in points] == [51.0, 103.0]
    assert "own fit seconds" in source
    old_style, source = _curve_points({"curve": [{"n_models_used": 10, "lds": 0.1}]}, 2.0)
    assert old_style[0]["seconds"] == 20.0 and "not recorded" in source


def test_figure_is_written(tmp_path: Path) -> None:
    fig = lds_vs_compute_figure(
        [ComputePoint("100", 51.0, 0.4), ComputePoint("200", 103.0, 0.5)],
        [ComputePoint("trak", 4.0, 0.2, (0.15, 0.25)), ComputePoint("tracin", 3.0, 0.1)],
        ceiling=0.7,
    )
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert labels[0].startswith("datamodels") and "trak" in labels and "tracin" in labels
    out = save_png(fig, tmp_path / "lds_vs_compute.png")
    assert out.read_bytes().startswith(b"\x89PNG")
