"""Summaries of a fit's regularization path: per-step metrics across targets (its figure:
:func:`dm_assets.evaluation.figures.path_figure`).

The input is the table ``write_outputs`` saves as ``regularization_path.csv``: one row per
(target, lambda step) a target reached, with columns ``target`` (int, column in the dataset),
``step`` (int, index on the path, ``0`` = ``lambda_max``), ``lambda``, ``lambda_over_max``,
``train_mse``, ``val_mse`` (floats), ``nonzeros`` (int) and ``chosen`` (1 at the lambda chosen
for that target, else 0). Targets leave the path early when validation stops improving, so later
steps hold fewer targets; every statistic here is over the targets that reached the step.

Imports neither dagster nor mlflow (nor matplotlib).
"""

from __future__ import annotations

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


def check_path_table(table: pd.DataFrame, needed: tuple[str, ...]) -> None:
    """Raise unless ``table`` is a regularization path table with the columns ``needed`` and
    each (target, step) once."""
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
    check_path_table(
        table, ("target", "step", "lambda_over_max", "train_mse", "val_mse", "nonzeros")
    )
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
