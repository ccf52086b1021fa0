"""Every figure of a fit, drawn once: the Dagster assets (files beside the fit), MLflow (the
path plot of each run) and the notebook all call these.

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` drawn with matplotlib's
object API (an Agg canvas, no pyplot state, so it works in worker processes and a notebook shows
it by leaving it as a cell's value); :func:`save_png` writes one. The ``plot_*`` functions draw
and save in one call, for the callers that only want the file.

============================  ===================================================  ============
figure                        from                                                 file
============================  ===================================================  ============
:func:`budget_curve_figure`   the LDS curve (:func:`~dm_assets.evaluation.curve.    lds_curve.png
                              lds_curve` or ``evaluation.json``'s ``curve``)
:func:`predicted_vs_actual_   predictions and outputs ``(n, t)`` of held-out       predicted_vs_
figure`                       models                                               actual.png
:func:`path_figure`           ``regularization_path.csv``                          regularization
                                                                                   _path.png
:func:`top_examples_figure`   raw weights ``(p, t)`` and, optionally, images       (notebook)
:func:`embeddings_figure`     raw weights ``(p, t)``                               (notebook)
============================  ===================================================  ============

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dm_assets.regression.path_metrics import PATH_COLUMNS, check_path_table, step_metrics

if TYPE_CHECKING:
    from dm_assets.evaluation.curve import LdsCurve

# The figures' inputs' modules (the curve, the metrics, the analyses) are imported where they are
# used: they pull in scipy.stats and numba, a second and more of every fit's step for a module
# that draws its path figure.

MAX_TARGETS_DRAWN = 50
"""At most this many per-target curves in :func:`path_figure` (evenly spaced over the
targets)."""


def _new_figure(margins: dict[str, float] | None = None, **kwargs: object) -> Figure:
    """A figure with matplotlib's constrained layout, or with fixed ``margins``
    (``subplots_adjust``'s fractions) where a figure's layout is known: the constrained layout
    measures every text's extent at each draw (half of the regularization-path figure's 1.1 s,
    drawn after every fit)."""
    fig = Figure(layout=None if margins else "constrained", **kwargs)  # type: ignore[arg-type]
    if margins:
        fig.subplots_adjust(**margins)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, out_png: str | Path) -> Path:
    """Write ``fig`` to ``out_png`` (a PNG at 110 dpi; parent folders are created); returns
    the path."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    return out


# ------------------------------------------------------------------------------- LDS curve


def _budget_curve_values(
    curve: LdsCurve | Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, str]:
    """``(n, lds, ci, stops_paying_at, x_label)`` of a curve or its ``to_dict()``: ``n``,
    ``lds`` float ``(m,)``, ``ci`` float ``(2, m)`` (NaN where a point has no interval)."""
    from dm_assets.evaluation.curve import LdsCurve

    values = curve.to_dict() if isinstance(curve, LdsCurve) else curve
    points = list(values.get("points", []))
    n = np.array([float(p["n_models"]) for p in points], dtype=np.float64)
    lds = np.array(
        [np.nan if p["lds"] is None else float(p["lds"]) for p in points], dtype=np.float64
    )
    ci = np.full((2, len(points)), np.nan)
    for i, p in enumerate(points):
        pair = p.get("lds_ci")
        if pair is not None and None not in pair:
            ci[:, i] = pair
    stops = values.get("stops_paying_at")
    folds = values.get("folds")
    label = values.get("x_label") or (
        f"models trained (N; lambda chosen by {folds}-fold inside them)"
        if folds
        else "models trained (N)"
    )
    return n, lds, ci, None if stops is None else int(stops), str(label)


def budget_curve_figure(
    curve: LdsCurve | Mapping[str, Any] | None,
    *,
    title: str = "",
    ceiling: float | None = None,
    ceiling_ci: tuple[float, float] | Sequence[float] | None = None,
) -> Figure:
    """Held-out LDS, with its 95% interval, against ``N`` the number of models trained.

    Parameters
    ----------
    curve : LdsCurve, its ``to_dict()``, or None
        The budget-honest curve (:func:`~dm_assets.evaluation.curve.lds_curve`): each point
        used exactly ``N`` models, to choose lambda by K-fold and to fit. None or no points:
        the figure says that no curve was configured.
    title : str
        The axes' title (default: "Held-out LDS against models trained").
    ceiling : float, optional
        The LDS noise ceiling, drawn as a dashed line, with ``ceiling_ci`` ``(lo, hi)`` as a
        shaded band.

    x: ``N`` on a log2 axis (ticks at the sizes, plainly), labelled "models trained (N; lambda
    chosen by K-fold inside them)"; interval bars where the curve has them; a dotted vertical
    line at ``stops_paying_at``, the smallest ``N`` from which the gain per doubling's interval
    includes 0.
    """
    fig = _new_figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    n = lds = np.empty(0)
    ci = np.empty((2, 0))
    stops: int | None = None
    label = "models trained (N)"
    if curve is not None:
        n, lds, ci, stops, label = _budget_curve_values(curve)
    if n.size:
        has_ci = np.isfinite(ci).all(0)
        yerr = np.zeros((2, n.size))
        yerr[0, has_ci] = np.maximum(lds[has_ci] - ci[0, has_ci], 0)
        yerr[1, has_ci] = np.maximum(ci[1, has_ci] - lds[has_ci], 0)
        ax.errorbar(
            n,
            lds,
            yerr=yerr if has_ci.any() else None,
            marker="o",
            capsize=3,
            color="tab:blue",
            label="LDS (Spearman), 95% interval" if has_ci.any() else "LDS (Spearman)",
        )
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(n, labels=[str(int(v)) for v in n])
        if n.size == 1:
            ax.set_xlim(n[0] / 1.5, n[0] * 1.5)
        if stops is not None:
            ax.axvline(
                stops,
                ls=":",
                color="tab:red",
                lw=1.2,
                label=f"from N={stops}: gain per doubling, 95% interval includes 0",
            )
    else:
        ax.text(
            0.5,
            0.5,
            "no curve computed\n(evaluation.curve_sizes is empty)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
    band: list[float] = []
    if ceiling is not None and np.isfinite(ceiling):
        ax.axhline(
            ceiling, ls="--", color="black", lw=1.2, label=f"noise ceiling (LDS) {ceiling:.3f}"
        )
        if ceiling_ci is not None and all(v is not None and np.isfinite(v) for v in ceiling_ci):
            lo, hi = (float(v) for v in ceiling_ci)
            ax.axhspan(lo, hi, color="gray", alpha=0.2, lw=0, label="noise ceiling 95% interval")
            band = [lo, hi]
    shown = np.concatenate([lds, ci.ravel(), [ceiling] if ceiling is not None else [], band])
    shown = shown[np.isfinite(shown)]
    low = min(0.0, float(shown.min()) - 0.05) if shown.size else 0.0
    ax.set_ylim(low, 1.02)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out LDS (mean over targets)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "Held-out LDS against models trained")
    return fig


def plot_lds_curve(
    curve: LdsCurve | Mapping[str, Any] | None,
    out_png: str | Path,
    *,
    title: str = "",
    ceiling: float | None = None,
    ceiling_ci: tuple[float, float] | Sequence[float] | None = None,
) -> Path:
    """:func:`budget_curve_figure` saved to ``out_png``; returns the path."""
    figure = budget_curve_figure(curve, title=title, ceiling=ceiling, ceiling_ci=ceiling_ci)
    return save_png(figure, out_png)


# ------------------------------------------------------------------- predicted against actual


def predicted_vs_actual_figure(
    predicted: np.ndarray,
    actual: np.ndarray,
    *,
    targets: Sequence[int] | None = None,
    max_panels: int = 6,
) -> Figure:
    """Scatter panels of predicted (x) against actual (y) output across held-out models, one per
    target, each titled with its Spearman correlation (the target's LDS), the line ``y = x``
    dashed.

    ``predicted``, ``actual`` ``(n, t)`` as for :func:`~dm_assets.evaluation.metrics.evaluate`.
    ``targets``: the columns to draw (at most ``max_panels``); default: up to ``max_panels``
    targets at evenly spaced quantiles of the per-target Spearman, best to worst, constant
    targets skipped.
    """
    if max_panels < 1:
        raise ValueError(f"max_panels={max_panels} must be at least 1")
    from dm_assets.evaluation.metrics import evaluate

    result = evaluate(predicted, actual)
    pred, act = np.asarray(predicted), np.asarray(actual)
    t = result.n_targets
    if targets is None:
        scored = np.flatnonzero(~np.isnan(result.lds_per_target))
        order = scored[np.argsort(-result.lds_per_target[scored], kind="stable")]
        if len(order) > max_panels:
            order = order[np.linspace(0, len(order) - 1, max_panels).round().astype(int)]
        chosen = [int(j) for j in order]
    else:
        chosen = [int(j) for j in targets]
        bad = [j for j in chosen if not 0 <= j < t]
        if bad:
            raise ValueError(f"targets {bad} are not columns of the {t} targets: use 0 .. {t - 1}")
        if len(chosen) > max_panels:
            raise ValueError(
                f"targets has {len(chosen)} entries but max_panels={max_panels}: pass fewer "
                "targets or raise max_panels"
            )
    cols = max(1, min(3, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / cols))
    fig = _new_figure(figsize=(3.6 * cols, 3.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, j in zip(axes, chosen, strict=False):
        ax.scatter(pred[:, j], act[:, j], s=8, alpha=0.5, edgecolors="none")
        lo = float(min(pred[:, j].min(), act[:, j].min()))
        hi = float(max(pred[:, j].max(), act[:, j].max()))
        ax.plot([lo, hi], [lo, hi], ls="--", color="gray", lw=1)
        ax.set_title(f"target {j}: Spearman {result.lds_per_target[j]:.3f}", fontsize="medium")
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
    for ax in axes[len(chosen) :]:
        ax.set_axis_off()
    if not chosen:
        axes[0].text(0.5, 0.5, "no target varies", ha="center", va="center", color="gray")
    fig.suptitle(f"Datamodel predictions on {result.n_models} held-out models")
    return fig


def plot_predicted_vs_actual(
    predicted: np.ndarray,
    actual: np.ndarray,
    out_png: str | Path,
    *,
    targets: Sequence[int] | None = None,
    max_panels: int = 6,
) -> Path:
    """:func:`predicted_vs_actual_figure` saved to ``out_png``; returns the path."""
    figure = predicted_vs_actual_figure(predicted, actual, targets=targets, max_panels=max_panels)
    return save_png(figure, out_png)


# ----------------------------------------------------------------------- regularization path


def path_figure(table: pd.DataFrame, *, title: str = "") -> Figure:
    """The regularization path of a fit (``regularization_path.csv``, see
    :mod:`~dm_assets.regression.path_metrics`).

    Left: validation MSE of each target (log scale when all are positive) against
    ``lambda / lambda_max`` (log scale, the path running left to right from ``lambda_max``), at
    most :data:`MAX_TARGETS_DRAWN` targets as thin lines with each one's chosen lambda marked,
    and the mean over the targets on the path at each step as a thick line. Right: mean nonzero
    weights and the fraction of targets still on the path at each step.
    """
    check_path_table(table, PATH_COLUMNS)
    if len(table) == 0:
        raise ValueError("table has no rows: there is no path to plot (was the fit empty?)")
    targets = np.sort(table["target"].unique())
    metrics = step_metrics(table, len(targets))
    if len(targets) > MAX_TARGETS_DRAWN:
        drawn = targets[np.linspace(0, len(targets) - 1, MAX_TARGETS_DRAWN).round().astype(int)]
    else:
        drawn = targets

    # fixed margins: room for the y labels on both sides of the right panel and the title
    margins = {"left": 0.06, "right": 0.93, "bottom": 0.1, "top": 0.86 if title else 0.92}
    fig = _new_figure(margins={**margins, "wspace": 0.3}, figsize=(12.0, 4.8))
    left, right = fig.subplots(1, 2)

    shown = table[table["target"].isin(drawn)].sort_values(["target", "step"])
    for _, path in shown.groupby("target", sort=False):
        left.plot(path["lambda_over_max"], path["val_mse"], lw=0.7, alpha=0.45, color="tab:blue")
    chosen = shown[shown["chosen"] == 1]
    left.scatter(
        chosen["lambda_over_max"],
        chosen["val_mse"],
        s=14,
        color="tab:red",
        zorder=3,
        label="chosen lambda",
    )
    left.plot(
        metrics["mean_lambda_over_max"],
        metrics["mean_val_mse"],
        lw=2.5,
        color="black",
        label="mean over targets on the path",
    )
    if (table["lambda_over_max"] > 0).any():
        left.set_xscale("log")
    if (table["val_mse"] > 0).all():
        left.set_yscale("log")  # targets' variances differ by orders of magnitude
    left.invert_xaxis()
    left.set_xlabel("lambda / lambda_max  (path runs left to right)")
    left.set_ylabel("validation MSE")
    count = (
        f"{len(drawn)} of {len(targets)} targets" if len(drawn) < len(targets) else "all targets"
    )
    left.set_title(f"Validation MSE along the path ({count})")
    left.grid(True, which="both", alpha=0.3)
    left.legend(loc="best", fontsize="small")

    right.plot(metrics["step"], metrics["mean_nonzeros"], marker="o", ms=3, color="tab:green")
    right.set_xlabel("step on the path (0 = lambda_max)")
    right.set_ylabel("mean nonzero weights", color="tab:green")
    right.grid(True, alpha=0.3)
    on_path = right.twinx()
    on_path.plot(metrics["step"], metrics["fraction_on_path"], marker="s", ms=3, color="tab:purple")
    on_path.set_ylim(0.0, 1.05)
    on_path.set_ylabel("fraction of targets on the path", color="tab:purple")
    right.set_title("Sparsity and targets remaining per step")

    if title:
        fig.suptitle(title)
    return fig


def plot_path(table: pd.DataFrame, out_png: str | Path, *, title: str = "") -> Path:
    """:func:`path_figure` saved to ``out_png``; returns the path."""
    return save_png(path_figure(table, title=title), out_png)


# ------------------------------------------------------------------ what the weights say


def top_examples_figure(
    raw: np.ndarray,
    targets: Sequence[int],
    images: tuple[np.ndarray, np.ndarray] | None,
    *,
    k: int = 5,
) -> Figure:
    """For each target (a row): its image, then the ``k`` training examples with the largest
    positive weights and the ``k`` with the largest negative weights
    (:func:`~dm_assets.evaluation.analysis.top_examples`), each titled with its weight.

    ``raw``: weights on the raw mask scale, float ``(p, t)``
    (:func:`~dm_assets.evaluation.analysis.raw_weights`); ``images``: ``(train_images,
    target_images)``, each ``(n, H, W)`` or ``(n, H, W, C)``, or None for bars of those weights
    instead.
    """
    from dm_assets.evaluation.analysis import top_examples

    if images is None:
        fig = _new_figure(figsize=(8, 2.4 * len(targets)))
        for row, t in enumerate(targets):
            ax = fig.add_subplot(len(targets), 1, row + 1)
            pos, neg = top_examples(raw, t, k)
            chosen = np.concatenate([pos, neg])
            ax.bar(
                [str(i) for i in chosen],
                raw[chosen, t],
                color=["C2"] * len(pos) + ["C3"] * len(neg),
            )
            ax.set_title(f"target {t}: strongest training examples")
            ax.set_ylabel("weight")
        return fig
    train, target_images = images
    cols = 1 + 2 * k
    fig = _new_figure(figsize=(1.3 * cols, 1.6 * len(targets)))
    gray = train.ndim == 3
    for row, t in enumerate(targets):
        pos, neg = top_examples(raw, t, k)
        ax = fig.add_subplot(len(targets), cols, row * cols + 1)
        ax.imshow(target_images[t], cmap="gray_r" if gray else None)
        ax.set_title(f"target {t}", fontsize=8, fontweight="bold")
        ax.axis("off")
        for j in range(2 * k):
            ax = fig.add_subplot(len(targets), cols, row * cols + 2 + j)
            ax.axis("off")
            group = pos if j < k else neg
            slot = j if j < k else j - k
            if slot >= len(group):
                continue
            i = int(group[slot])
            ax.imshow(train[i], cmap="Greens" if j < k and gray else ("Reds" if gray else None))
            ax.set_title(f"{raw[i, t]:+.3f}", fontsize=7)
    fig.suptitle(
        "target | training examples with the largest positive (green) and negative (red) weights"
    )
    return fig


def embeddings_figure(
    raw: np.ndarray, labels: np.ndarray | None = None, *, n_components: int = 2
) -> Figure:
    """Targets placed by the first two principal components of their datamodel weights
    (:func:`~dm_assets.evaluation.analysis.embeddings` of ``raw`` float ``(p, t)``), coloured by
    class when ``labels`` ``(t,)`` are given."""
    from dm_assets.evaluation.analysis import embeddings

    points, explained = embeddings(raw, n_components)
    fig = _new_figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    if points.shape[1] < 2:
        ax.text(0.5, 0.5, "fewer than two targets", ha="center", transform=ax.transAxes)
        return fig
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=10)
    else:
        for c in np.unique(labels):
            chosen = labels == c
            ax.scatter(points[chosen, 0], points[chosen, 1], s=10, label=str(c))
        ax.legend(title="class", fontsize=7, markerscale=1.5, ncols=2)
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance)")
    ax.set_title("datamodel embeddings")
    return fig
