"""Held-out scores in words: the lines the summary and the asset's log print and the markdown
tables of the asset's metadata, all read from ``evaluation.json``'s dict (the fit folder's, or
:attr:`~dm_assets.evaluation.held_out.FitEvaluation.report`), so every place says the same
thing with the same labels.

Every LDS comes with what it was computed on (how many held-out models and masks, against which
ground truth) and, where the evaluation resampled, its 95% interval.

Imports neither dagster nor mlflow (nor numpy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_SINGLE = "one model's output"
_MEAN = "the mean of the seeds' outputs"


def _ci(interval: Sequence[float] | None) -> str:
    if not interval:
        return ""
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]"


def _value(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _truth_phrase(truth: Mapping[str, Any]) -> str:
    """``LDS 0.612 [0.590, 0.633]; noise ceiling 0.851 [..]; LDS/ceiling 0.719 [..]``."""
    parts = [f"LDS {_value(truth.get('lds'))}{_ci(truth.get('lds_ci', truth.get('ci')))}"]
    if truth.get("noise_ceiling") is not None:
        parts.append(
            f"noise ceiling {truth['noise_ceiling']:.3f}{_ci(truth.get('noise_ceiling_ci'))}"
        )
        if truth.get("lds_over_ceiling") is not None:
            parts.append(
                f"LDS/ceiling {truth['lds_over_ceiling']:.3f}"
                f"{_ci(truth.get('lds_over_ceiling_ci'))}"
            )
    else:
        parts.append("noise ceiling n/a (no held-out mask was trained twice)")
    return "; ".join(parts)


def _held_out_phrase(report: Mapping[str, Any]) -> str:
    models = report.get("held_out_models")
    masks = report.get("masks")
    seeds = report.get("seeds")
    text = f"{models} models"
    if masks is not None and masks != models:
        text += f" ({masks} masks" + (f", {seeds} seeds each" if seeds else "") + ")"
    return text


def _interval_note(report: Mapping[str, Any]) -> str:
    boot = report.get("bootstrap") or {}
    if not boot.get("resamples"):
        return "no intervals (evaluation.bootstrap: 0)"
    return (
        f"[95% intervals: {boot['resamples']} bootstrap resamples of the "
        f"{boot.get('unit', 'held-out masks')}]"
    )


def score_lines(report: Mapping[str, Any]) -> list[str]:
    """The scores as a few lines of text: against one model's output (LDS with interval,
    ceiling, LDS/ceiling), against the mean of the seeds' outputs where present, Pearson and
    R^2, and the interval's resampling."""
    truth = report.get("ground_truth") or _SINGLE
    lines = [
        f"{_held_out_phrase(report)} the fit never saw, {report.get('targets')} targets",
        f"vs {truth}: {_truth_phrase(report)}",
    ]
    mean = report.get("mean_of_seeds")
    if mean:
        mean_truth = mean.get("ground_truth") or _MEAN
        lines.append(f"vs {mean_truth} ({mean.get('models')} masks): {_truth_phrase(mean)}")
    lines.append(
        f"Pearson {_value(report.get('pearson'))}, R^2 {_value(report.get('r2'))}; "
        + _interval_note(report)
    )
    grid = report.get("lambda_at_grid_ends")
    if grid and (grid.get("largest") or grid.get("smallest")):
        lines.append(
            f"lambda at the grid's ends: {100 * grid.get('largest', 0):.1f}% of targets at the "
            f"largest (constant prediction), {100 * grid.get('smallest', 0):.1f}% at the "
            "smallest (extend the grid down: lower cfg.eps)"
        )
    return lines


def curve_lines(curve: Mapping[str, Any] | None) -> list[str]:
    """The LDS curve as lines: one per total number N of trained models, then where more
    models stop paying."""
    if not curve or not curve.get("points"):
        return []
    folds = curve.get("folds")
    how = f"lambda by {folds}-fold inside N" if folds else "lambda chosen inside N"
    lines = [f"LDS against N models trained ({how}, refit on all N, same held-out models):"]
    slopes = {s["n_to"]: s for s in curve.get("slopes") or []}
    for point in curve["points"]:
        text = f"  N={point['n_models']}: LDS {point['lds']:.3f}{_ci(point.get('lds_ci'))}"
        slope = slopes.get(point["n_models"])
        if slope is not None:
            text += (
                f", {slope['gain_per_doubling']:+.3f} per doubling since N={slope['n_from']}"
                f"{_ci(slope.get('ci'))}"
            )
        lines.append(text)
    stop = curve.get("stops_paying_at")
    if stop is not None:
        lines.append(
            f"  more models stop paying from N={stop}: the gain per doubling's 95% interval "
            "includes 0"
        )
    else:
        lines.append("  every doubling still pays (each gain's 95% interval is above 0)")
    return lines


def scores_markdown(report: Mapping[str, Any]) -> str:
    """One markdown table: a row per ground truth, columns LDS, interval, ceiling,
    LDS/ceiling, models and masks scored."""
    rows = [(report.get("ground_truth") or _SINGLE, report)]
    if report.get("mean_of_seeds"):
        mean = report["mean_of_seeds"]
        rows.append((mean.get("ground_truth") or _MEAN, mean))
    out = [
        "| ground truth | LDS | 95% interval | noise ceiling | LDS / ceiling | models | masks |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, truth in rows:
        interval = truth.get("lds_ci", truth.get("ci"))
        out.append(
            f"| {label} | {_value(truth.get('lds'))} | {_ci(interval).strip() or 'n/a'} | "
            f"{_value(truth.get('noise_ceiling'))}{_ci(truth.get('noise_ceiling_ci'))} | "
            f"{_value(truth.get('lds_over_ceiling'))}{_ci(truth.get('lds_over_ceiling_ci'))} | "
            f"{truth.get('models', report.get('held_out_models'))} | "
            f"{truth.get('masks', report.get('masks'))} |"
        )
    return "\n".join(out) + f"\n\n{_interval_note(report)}"


def curve_markdown(curve: Mapping[str, Any] | None) -> str:
    """The LDS curve as a markdown table: N, LDS, its interval, the gain per doubling from the
    previous point with its interval, the targets whose lambda sits at the grid's ends."""
    if not curve or not curve.get("points"):
        return "no curve (evaluation.curve_sizes is empty)"
    slopes = {s["n_to"]: s for s in curve.get("slopes") or []}
    out = [
        "| models trained N | LDS | 95% interval | gain per doubling | lambda at top / bottom |",
        "|---|---|---|---|---|",
    ]
    for p in curve["points"]:
        slope = slopes.get(p["n_models"])
        gain = "" if slope is None else f"{slope['gain_per_doubling']:+.3f}{_ci(slope.get('ci'))}"
        ends = f"{100 * p.get('lambda_at_max', 0):.1f}% / {100 * p.get('lambda_at_min', 0):.1f}%"
        out.append(
            f"| {p['n_models']} | {p['lds']:.3f} | {_ci(p.get('lds_ci')).strip()} | {gain} | "
            f"{ends} |"
        )
    stop = curve.get("stops_paying_at")
    out.append(
        ""
        if stop is None
        else f"\nMore models stop paying from N={stop} (gain per doubling's interval includes 0)."
    )
    return "\n".join(out)


def attribution_lines(attributions: Mapping[str, Any]) -> list[str]:
    """One line per baseline method of ``attributions.json`` (``methods``: name -> its
    scores): LDS with interval, LDS/ceiling, seconds."""
    lines = []
    for name, method in (attributions.get("methods") or {}).items():
        ratio = method.get("lds_over_ceiling")
        lines.append(
            f"{name}: LDS {_value(method.get('lds'))}{_ci(method.get('ci', method.get('lds_ci')))}"
            + ("" if ratio is None else f", LDS/ceiling {ratio:.3f}")
            + (
                ""
                if method.get("seconds") is None
                else f", {float(method['seconds']):.1f} s of compute"
            )
        )
    return lines
