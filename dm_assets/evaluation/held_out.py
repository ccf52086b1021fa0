"""Held-out models: the completed models a fit never saw (neither fitted on nor used to choose
lambda), their rows, and a fit judged on them with its evaluation files and figures written
beside it (:func:`evaluate_fit`).

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dm_assets.errors import DmError
from dm_assets.store.store import Store

if TYPE_CHECKING:
    from dm_assets.evaluation.curve import CurvePoint
    from dm_assets.evaluation.metrics import Evaluation
    from dm_assets.regression.config import RegressionConfig
    from dm_assets.regression.fit import FitFolder


class HeldOutError(DmError, ValueError):
    """Too few held-out models are trained to judge a fit."""


@dataclass(frozen=True)
class FitRows:
    """Where a fit's models are and how the fit split them.

    ``store``: the store the dataset was written from; ``dataset``: the FFCV dataset the fit
    read (its row order decides which models were used); ``x_name``, ``y_name``: the store keys
    of the masks and the outputs; ``num_train``, ``num_val``: the dataset's first rows that
    fitted and chose lambda; ``target_start``, ``target_end``: the fitted targets, columns
    ``[target_start, target_end)`` of the outputs (-1: to the end).
    """

    store: Path
    dataset: Path
    x_name: str
    y_name: str
    num_train: int
    num_val: int
    target_start: int = 0
    target_end: int = -1

    @classmethod
    def of(
        cls, config: RegressionConfig, *, store: str | Path, x_name: str, y_name: str
    ) -> FitRows:
        """The rows of the fit configured by ``config`` (its ``data`` section: ``data_path``,
        ``num_train``, ``num_val``, ``target_start_ind``, ``target_end_ind``)."""
        data = config["data"]
        return cls(
            store=Path(store),
            dataset=Path(data["data_path"]),
            x_name=x_name,
            y_name=y_name,
            num_train=int(data["num_train"]),
            num_val=int(data["num_val"]),
            target_start=int(data["target_start_ind"]),
            target_end=int(data["target_end_ind"]),
        )


def fitted_and_held_out(
    dataset_path: str | Path, store: Store, num_train: int, num_val: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(seen, held)``: the model indices the fit used (the dataset's first
    ``num_train + num_val`` rows, in their order) and the held-out ones (completed models of
    ``store`` that are not among them, in increasing order); int64 arrays."""
    from dm_assets.regression.beton_reader import beton_info

    seen = beton_info(dataset_path).model_indices[: num_train + num_val]
    return seen, np.setdiff1d(store.completed_indices(), seen)


def read_rows(
    store: Store,
    indices: np.ndarray,
    *,
    x_name: str,
    y_name: str,
    target_start: int = 0,
    target_end: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """The masks ``(n, p)`` and the outputs float64 ``(n, t)`` of models ``indices``, the
    outputs cut to the regression's targets ``[target_start, target_end)`` (-1: to the end)."""
    masks = np.asarray(store.read(x_name)[indices])
    outputs = np.asarray(store.read(y_name)[indices], dtype=np.float64).reshape(len(indices), -1)
    return masks, outputs[:, target_start : None if target_end == -1 else target_end]


def held_out_predictions(
    weights: dict[str, Any], rows: FitRows
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(model_indices, predicted, actual)`` on the held-out models: int64 ``(n,)`` and
    float64 ``(n, t)`` twice, ``weights`` being the fit's ``datamodels.pt``."""
    from dm_assets.evaluation.metrics import predict

    with Store.open(rows.store) as store:
        _, held = fitted_and_held_out(rows.dataset, store, rows.num_train, rows.num_val)
        masks, actual = read_rows(
            store,
            held,
            x_name=rows.x_name,
            y_name=rows.y_name,
            target_start=rows.target_start,
            target_end=rows.target_end,
        )
    return held, predict(weights, masks), actual


@dataclass(frozen=True, eq=False)
class FitEvaluation:
    """A fit judged on held-out models: ``held_out`` their indices (int64 ``(n,)``),
    ``evaluation`` the scores, ``curve`` the LDS curve (empty without curve sizes), ``report``
    what ``evaluation.json`` holds."""

    held_out: np.ndarray
    evaluation: Evaluation
    curve: list[CurvePoint]
    report: dict[str, Any]

    def metrics(self) -> dict[str, float]:
        """LDS, Pearson, R^2 and, where replicates allowed it, the noise ceiling."""
        out = {
            "lds": self.evaluation.lds,
            "pearson": self.evaluation.pearson,
            "r2": self.evaluation.r2,
        }
        if self.evaluation.noise_ceiling is not None:
            out["noise_ceiling"] = self.evaluation.noise_ceiling
        return out


def evaluate_fit(
    fit: FitFolder,
    rows: FitRows,
    *,
    config: RegressionConfig,
    curve_sizes: Sequence[int] = (),
    experiment: str,
) -> FitEvaluation:
    """Judge the fit in ``fit`` on the held-out models of ``rows`` and write the evaluation
    files beside it (:data:`~dm_assets.regression.fit.EVALUATION_FILES`).

    Parameters
    ----------
    fit : FitFolder
        The fit to judge; its weights predict, and its folder receives the files.
    rows : FitRows
        The store and dataset it was fitted from, and its split of the dataset's rows.
    config : RegressionConfig
        The fit's configuration: the LDS curve refits with its settings.
    curve_sizes : sequence of int
        Training-model counts to refit on for the LDS curve (increasing, each at most
        ``rows.num_train``); empty: no curve (the curve's figure says so).
    experiment : str
        The experiment's name, in messages and the curve's title.

    Raises
    ------
    HeldOutError
        Fewer than 3 held-out models are trained.
    """
    import pandas as pd

    from dm_assets.evaluation.ceiling import group_identical_masks
    from dm_assets.evaluation.curve import lds_curve
    from dm_assets.evaluation.figures import plot_lds_curve, plot_predicted_vs_actual
    from dm_assets.evaluation.metrics import evaluate, predict

    weights = fit.weights()
    with Store.open(rows.store) as store:
        seen, held = fitted_and_held_out(rows.dataset, store, rows.num_train, rows.num_val)
        if len(held) < 3:
            raise HeldOutError(
                f"only {len(held)} held-out model(s) of {experiment!r} are trained "
                f"(completed models beyond the {len(seen)} the fit used): train the "
                "partitions after them",
                source=rows.store,
            )
        # the curve refits on the seen models and scores the held-out ones: read them all
        # once; without a curve only the held-out rows are needed
        order = np.concatenate([seen, held]) if curve_sizes else held
        x, y = read_rows(
            store,
            order,
            x_name=rows.x_name,
            y_name=rows.y_name,
            target_start=rows.target_start,
            target_end=rows.target_end,
        )
    masks, actual = x[len(order) - len(held) :], y[len(order) - len(held) :]
    predicted = predict(weights, masks)
    result = evaluate(predicted, actual, groups=group_identical_masks(masks))
    curve = []
    if curve_sizes:
        curve = lds_curve(
            x,
            y,
            sizes=curve_sizes,
            num_train=rows.num_train,
            num_val=rows.num_val,
            held_out=slice(len(seen), len(order)),
            config=config,
        )
    ceiling = result.noise_ceiling
    plot_lds_curve(
        curve, fit.file("lds_curve.png"), title=f"{experiment}: LDS on held-out", ceiling=ceiling
    )
    plot_predicted_vs_actual(predicted, actual, fit.file("predicted_vs_actual.png"))
    report = {
        "held_out_models": len(held),
        "targets": int(result.n_targets),
        "lds": result.lds,
        "pearson": result.pearson,
        "r2": result.r2,
        "noise_ceiling": ceiling,
        "curve": [p.to_dict() for p in curve],
    }
    per_target = pd.DataFrame(
        {
            "target": np.arange(result.n_targets) + rows.target_start,
            "lds": result.lds_per_target,
            "pearson": result.pearson_per_target,
            "r2": result.r2_per_target,
        }
    )
    # written last: evaluation.json present means the figures are there too
    fit.write_evaluation(report, per_target)
    return FitEvaluation(held_out=held, evaluation=result, curve=curve, report=report)
