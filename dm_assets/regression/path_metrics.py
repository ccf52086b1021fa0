"""Summaries of a fit's regularization path: per-step metrics across targets, and a plot.

The input is the table ``write_outputs`` saves as ``regularization_path.csv``: one row per
(target, lambda step) a target reached, with columns ``target`` (int, column in the dataset),
``step`` (int, index on the path, ``0`` = ``lambda_max``), ``lambda``, ``lambda_over_max``,
``train_mse``, ``val_mse`` (floats), ``nonzeros`` (int) and ``chosen`` (1 at the lambda chosen
for that target, else 0). Targets leave the path early when validation stops improving, so later
steps hold fewer targets; every statistic here is over the targets that reached the step.

Imports neither dagster nor mlflow; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PATH_COLUMNS = (
    "target",
    "step",
    "lambda",
    "lambda_over_max",
    "train_mse",
    "val_mse",
    "nonzeros",
    "chosen",
)
"""The columns of ``regularization_path.csv``."""

STEP_METRIC_COLUMNS = (
    "step",
    "mean_val_mse",
    "median_val_mse",
    "mean_train_mse",
    "mean_nonzeros",
    "fraction_on_path",
    "mean_lambda_over_max",
)
"""The columns ``step_metrics`` returns, in order."""

MAX_TARGETS_DRAWN = 50
"""At most this many per-target curves in ``plot_path`` (evenly spaced over the targets)."""


def _check_table(table: pd.DataFrame, needed: tuple[str, ...]) -> None:
    if not isinstance(table, pd.DataFrame):
        raise TypeError(
            f"table must be a pandas DataFrame (regularization_path.csv read with pd.read_csv), "
            f"got {type(table).__name__}"
        )
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(
            f"table is missing column(s) {missing}; got columns {list(table.columns)}. Pass the "
            f"regularization path table written by write_outputs (regularization_path.csv), "
            f"which has columns {list(PATH_COLUMNS)}"
        )
    duplicated = table.duplicated(["target", "step"])
    if duplicated.any():
        first = table.loc[duplicated, ["target", "step"]].iloc[0].tolist()
        raise ValueError(
            f"table has {int(duplicated.sum())} repeated (target, step) row(s), first "
            f"(target, step) = {tuple(first)}: each target's path must appear once (do not "
            f"concatenate the tables of two fits of the same targets)"
        )


def step_metrics(table: pd.DataFrame, n_targets: int) -> pd.DataFrame:
    """Per lambda step, statistics over the targets that reached it.

    Parameters
    ----------
    table : DataFrame
        The regularization path (see the module docstring); ``chosen`` and ``lambda`` are not
        used here and may be absent.
    n_targets : int
        How many targets the fit had (``summary.json``'s ``n_targets``), the denominator of
        ``fraction_on_path``; at least the number of distinct targets in ``table``.

    Returns
    -------
    DataFrame
        One row per step some target reached, sorted by step, with columns ``step`` (int64, the
        path index), ``mean_val_mse``, ``median_val_mse``, ``mean_train_mse``,
        ``mean_nonzeros``, ``fraction_on_path`` (targets at this step / ``n_targets``) and
        ``mean_lambda_over_max`` (all float64). An empty table gives an empty frame.
    """
    _check_table(table, ("target", "step", "lambda_over_max", "train_mse", "val_mse", "nonzeros"))
    distinct = int(table["target"].nunique())
    if isinstance(n_targets, bool) or not isinstance(n_targets, int | np.integer):
        raise TypeError(f"n_targets must be an int (the fit's target count), got {n_targets!r}")
    if n_targets < max(1, distinct):
        raise ValueError(
            f"n_targets={n_targets} but the table holds {distinct} distinct target(s): pass the "
            f"fit's target count (summary.json's n_targets), at least {max(1, distinct)}"
        )
    grouped = table.groupby("step", sort=True)
    out = pd.DataFrame(
        {
            "mean_val_mse": grouped["val_mse"].mean(),
            "median_val_mse": grouped["val_mse"].median(),
            "mean_train_mse": grouped["train_mse"].mean(),
            "mean_nonzeros": grouped["nonzeros"].mean(),
            "fraction_on_path": grouped["target"].nunique() / n_targets,
            "mean_lambda_over_max": grouped["lambda_over_max"].mean(),
        }
    )
    out = out.astype("float64").rename_axis("step").reset_index()
    out["step"] = out["step"].astype("int64")
    return out[list(STEP_METRIC_COLUMNS)]


def plot_path(table: pd.DataFrame, out_png: Path, *, title: str = "") -> Path:
    """Draw the regularization path to ``out_png`` (a PNG; parent folders are created).

    Left: validation MSE of each target (log scale when all are positive) against
    ``lambda / lambda_max`` (log scale, the path running left to right from ``lambda_max``), at
    most ``MAX_TARGETS_DRAWN`` targets as thin lines with each one's chosen lambda marked, and
    the mean over the targets on the path at each step as a thick line. Right: mean nonzero
    weights and the fraction of targets still on the path at each step. Returns ``out_png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_table(table, PATH_COLUMNS)
    if len(table) == 0:
        raise ValueError("table has no rows: there is no path to plot (was the fit empty?)")
    targets = np.sort(table["target"].unique())
    metrics = step_metrics(table, len(targets))
    if len(targets) > MAX_TARGETS_DRAWN:
        drawn = targets[np.linspace(0, len(targets) - 1, MAX_TARGETS_DRAWN).round().astype(int)]
    else:
        drawn = targets

    fig = Figure(figsize=(12.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
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
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=110)
    return out_png
