"""Looking at fitted datamodels: what the notebooks in ``notebooks/`` call.

A finished experiment is its latest fit (``$DM_HOME/<name>/datamodels``: ``datamodels.pt``,
``regularization_path.csv``, ``summary.json`` and, once evaluated, ``evaluation.json``) with the
store it was fitted from. Figures are returned as :class:`matplotlib.figure.Figure` (no pyplot
state), so a notebook shows them by leaving them as a cell's value.

Weights on the raw mask scale: ``datamodels.pt`` holds weights for standardized masks; divided
by each training example's standard deviation (:func:`raw_weights`) a weight is the predicted
change of the target's output when that training example joins the training set.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dm_assets.pipeline.experiment import Experiment, ExperimentPaths, load_experiments
from dm_assets.store.store import Store


@dataclass
class FinishedExperiment:
    """An experiment's latest fit and the files beside it.

    ``weights``: ``datamodels.pt`` (``weight`` float32 ``(p, t)``, ``bias``, ``mean``, ``std``,
    ``lam``, ``lam_max``); ``path``: the regularization path table (one row per target and
    lambda step); ``summary``: ``summary.json``; ``evaluation``: ``evaluation.json`` or None;
    ``per_target``: ``evaluation_per_target.csv`` (target, lds, pearson, r2) or None.
    """

    experiment: Experiment
    paths: ExperimentPaths
    fit_dir: Path
    weights: dict[str, Any]
    path: pd.DataFrame
    summary: dict[str, Any]
    evaluation: dict[str, Any] | None
    per_target: pd.DataFrame | None


def load_finished(name: str, home: str | Path | None = None) -> FinishedExperiment:
    """The latest fit of experiment ``name`` under ``home`` (default ``$DM_HOME``)."""
    import torch

    experiments = {e.name: e for e in load_experiments()}
    if name not in experiments:
        raise ValueError(f"no experiment {name!r}; the experiments are {sorted(experiments)}")
    experiment = experiments[name]
    paths = experiment.paths(home)
    fit_dir = paths.datamodels.resolve()
    if not (fit_dir / "datamodels.pt").exists():
        raise FileNotFoundError(
            f"experiment {name!r} has no fit at {paths.datamodels}: run "
            f"`python -m dm_assets.launch {name}_all` first"
        )
    evaluation_file = fit_dir / "evaluation.json"
    per_target_file = fit_dir / "evaluation_per_target.csv"
    return FinishedExperiment(
        experiment=experiment,
        paths=paths,
        fit_dir=fit_dir,
        weights=torch.load(fit_dir / "datamodels.pt"),
        path=pd.read_csv(fit_dir / "regularization_path.csv"),
        summary=json.loads((fit_dir / "summary.json").read_text()),
        evaluation=json.loads(evaluation_file.read_text()) if evaluation_file.exists() else None,
        per_target=pd.read_csv(per_target_file) if per_target_file.exists() else None,
    )


def raw_weights(weights: dict[str, Any]) -> np.ndarray:
    """float64 ``(p, t)``: each training example's effect on each target's output, on the raw
    (0/1) mask scale."""
    w = np.asarray(weights["weight"], dtype=np.float64)
    return w / np.asarray(weights["std"], dtype=np.float64)[:, None]


def held_out(finished: FinishedExperiment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(model_indices, predicted, actual)`` on the held-out models (completed models the fit
    never saw), predicted and actual float64 ``(n, t)``."""
    from dm_assets.evaluation.metrics import fitted_and_held_out, predict, read_rows

    regression = finished.experiment.regression
    if regression is None:
        raise ValueError(f"experiment {finished.experiment.name!r} has no regression")
    data = regression.config(data_path=finished.paths.beton, out_dir=finished.fit_dir)["data"]
    with Store.open(finished.paths.store) as store:
        _, held = fitted_and_held_out(
            finished.paths.beton, store, data["num_train"], data["num_val"]
        )
        masks, actual = read_rows(
            store,
            held,
            x_name=regression.x_name,
            y_name=regression.y_name,
            target_start=data["target_start_ind"],
            target_end=data["target_end_ind"],
        )
    return held, predict(finished.weights, masks), actual


def top_examples(raw: np.ndarray, target: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` training examples with the largest positive and the largest negative weights
    for ``target`` (column of ``raw``), strongest first; examples with a zero weight are left
    out, so fewer than ``k`` may come back."""
    column = raw[:, target]
    order = np.argsort(column)
    positive = [i for i in order[::-1][:k] if column[i] > 0]
    negative = [i for i in order[:k] if column[i] < 0]
    return np.asarray(positive, dtype=np.int64), np.asarray(negative, dtype=np.int64)


def embeddings(raw: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Datamodel embeddings: each target's weight vector, scaled to unit length (so a few
    targets with large weights do not decide the axes), projected on the principal components
    of all of them. Returns float64 ``(t, n_components)`` and the fraction of variance each
    component explains."""
    norms = np.linalg.norm(raw, axis=0, keepdims=True)
    unit = raw / np.where(norms > 0, norms, 1.0)
    centered = unit.T - unit.T.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centered, full_matrices=False)
    n = min(n_components, len(s))
    explained = (s**2) / max(float((s**2).sum()), 1e-300)
    return u[:, :n] * s[:n], explained[:n]


def example_images(experiment: Experiment) -> tuple[np.ndarray, np.ndarray] | None:
    """``(train_images, target_images)``, each ``(n, H, W)`` or ``(n, H, W, C)``, when the
    experiment's training module offers ``example_images(script_args)``; else None."""
    module = importlib.import_module(experiment.trainer.main_import)
    provider = getattr(module, "example_images", None)
    if provider is None:
        return None
    train, targets = provider(experiment.trainer.script_args())
    return np.asarray(train), np.asarray(targets)


def example_labels(experiment: Experiment) -> np.ndarray | None:
    """The targets' class labels when the training module offers ``target_labels(args)``."""
    module = importlib.import_module(experiment.trainer.main_import)
    provider = getattr(module, "target_labels", None)
    return None if provider is None else np.asarray(provider(experiment.trainer.script_args()))


# ------------------------------------------------------------------------------------ figures
def figure_predicted_vs_actual(
    predicted: np.ndarray, actual: np.ndarray, targets: Sequence[int]
) -> Figure:
    """One scatter per target: the datamodel's prediction against the model's actual output on
    each held-out model, with the Spearman correlation (the target's LDS) in the title."""
    from scipy.stats import spearmanr

    fig = Figure(figsize=(3.2 * len(targets), 3.2), layout="constrained")
    for i, t in enumerate(targets):
        ax = fig.add_subplot(1, len(targets), i + 1)
        ax.scatter(predicted[:, t], actual[:, t], s=8, alpha=0.6)
        lo = float(min(predicted[:, t].min(), actual[:, t].min()))
        hi = float(max(predicted[:, t].max(), actual[:, t].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
        rho = spearmanr(predicted[:, t], actual[:, t]).statistic
        ax.set_title(f"target {t}: Spearman {rho:.2f}")
        ax.set_xlabel("predicted output")
        if i == 0:
            ax.set_ylabel("actual output (held-out model)")
    return fig


def figure_lds_curve(evaluation: dict[str, Any]) -> Figure:
    """LDS against the number of models used in the fit, from ``evaluation.json``."""
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    curve = evaluation.get("curve") or []
    if curve:
        x = [p.get("n_models_used", p["n_train"]) for p in curve]
        ax.plot(x, [p["lds"] for p in curve], marker="o", label="LDS")
        ax.plot(x, [p["pearson"] for p in curve], marker="s", label="Pearson", alpha=0.7)
        ax.set_xscale("log")
    ax.axhline(evaluation["lds"], color="C0", linestyle=":", label="LDS of the full fit")
    if evaluation.get("noise_ceiling") is not None:
        ax.axhline(evaluation["noise_ceiling"], color="black", linestyle="--", label="ceiling")
    ax.set_xlabel("models used in the fit")
    ax.set_ylabel("held-out correlation")
    ax.legend(fontsize=8)
    return fig


def figure_top_examples(
    raw: np.ndarray,
    targets: Sequence[int],
    images: tuple[np.ndarray, np.ndarray] | None,
    *,
    k: int = 5,
) -> Figure:
    """For each target (a row): its image, then the ``k`` training examples with the largest
    positive weights and the ``k`` with the largest negative weights, each titled with its
    weight. Without images, bars of those weights instead."""
    if images is None:
        fig = Figure(figsize=(8, 2.4 * len(targets)), layout="constrained")
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
    fig = Figure(figsize=(1.3 * cols, 1.6 * len(targets)), layout="constrained")
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


def figure_embeddings(
    raw: np.ndarray, labels: np.ndarray | None = None, *, n_components: int = 2
) -> Figure:
    """Targets placed by the first two principal components of their datamodel weights,
    coloured by class when ``labels`` are given."""
    points, explained = embeddings(raw, n_components)
    fig = Figure(figsize=(5, 4.5), layout="constrained")
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
