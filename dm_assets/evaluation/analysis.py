"""Looking at fitted datamodels: what the notebooks in ``notebooks/`` call (their figures are
in :mod:`dm_assets.evaluation.figures`).

A finished fit is its fit folder (``datamodels.pt``, ``regularization_path.csv``,
``summary.json``, ``manifest.json`` and, once evaluated, ``evaluation.json`` and
``evaluation_per_target.csv``) with the store of the models it was fitted from
(:class:`~dm_assets.evaluation.held_out.FitRows`). The held-out models are the manifest's (the
models completed and neither fitted on nor used to choose lambda), as the evaluation's.
:func:`dm_assets.pipeline.finished.load_finished` finds an experiment's latest fit by name.

Weights on the raw mask scale: ``datamodels.pt`` holds weights for standardized masks; divided
by each training example's standard deviation (:func:`raw_weights`) they act on the 0/1 mask.

**What a weight means (read before interpreting one).** When every model trains on the same
number ``m`` of examples (the shipped experiments draw masks of exactly ``alpha * p``), the mask
columns sum to ``m`` on every row: adding the same constant ``c`` to every raw weight changes
every prediction by ``c * m``, which the intercept absorbs. The centered design has rank
``p - 1``, the data cannot tell those solutions apart, and only **differences** of weights are
identified: ``w_j - w_k`` is the predicted change of the output when example ``j`` replaces
example ``k`` in the training set. The LASSO picks, among the equivalent solutions, the one with
the smallest penalty, which puts zero at a (``std``-weighted) median of the raw weights: a
weight is the effect of example ``j`` **relative to a typical example**, not the effect of
adding ``j`` to the training set (that is not identified by fixed-size masks; masks of varying
size would identify it). Sums over a mask are unaffected: predictions of models trained on
``m`` examples are what the datamodels estimate.

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dm_assets.evaluation.held_out import FitRows, held_out_predictions
from dm_assets.regression.fit import FitFolder
from dm_assets.regression.manifest import FitManifest


@dataclass
class FinishedFit:
    """A fit folder's files, read, and the rows of the models it was fitted from.

    ``weights``: ``datamodels.pt`` (``weight`` float32 ``(p, t)``, ``bias``, ``mean``, ``std``,
    ``lam``, ``lam_max``); ``path``: the regularization path table (one row per target and
    lambda step); ``summary``: ``summary.json``; ``evaluation``: ``evaluation.json`` or None;
    ``per_target``: ``evaluation_per_target.csv`` (target, lds, pearson, r2) or None;
    ``manifest``: ``manifest.json`` (the models, dataset and configurations the fit came from),
    or None for a fit folder written before fits recorded it.
    """

    fit: FitFolder
    rows: FitRows
    weights: dict[str, Any]
    path: pd.DataFrame
    summary: dict[str, Any]
    evaluation: dict[str, Any] | None
    per_target: pd.DataFrame | None
    manifest: FitManifest | None = None

    @property
    def fit_dir(self) -> Path:
        return self.fit.path


def read_finished(fit: FitFolder, rows: FitRows) -> FinishedFit:
    """Every file of the fit folder ``fit``, with ``rows``."""
    return FinishedFit(
        fit=fit,
        rows=rows,
        weights=fit.weights(),
        path=fit.path_table(),
        summary=fit.summary(),
        evaluation=fit.evaluation(),
        per_target=fit.per_target(),
        manifest=fit.manifest() if fit.has_manifest() else None,
    )


def raw_weights(weights: dict[str, Any]) -> np.ndarray:
    """float64 ``(p, t)``: each training example's weight on each target's output, on the raw
    (0/1) mask scale: with fixed-size masks an effect relative to a typical example (only
    differences ``raw[j] - raw[k]``, the effect of swapping ``k`` for ``j``, are identified;
    see the module docstring)."""
    w = np.asarray(weights["weight"], dtype=np.float64)
    return w / np.asarray(weights["std"], dtype=np.float64)[:, None]


def held_out(finished: FinishedFit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(model_indices, predicted, actual)`` on the held-out models (completed models the fit
    never saw, from its manifest), predicted and actual float64 ``(n, t)``. Raises
    :class:`~dm_assets.evaluation.held_out.HeldOutError` for a fit without a manifest or whose
    rows changed since."""
    return held_out_predictions(finished.fit, finished.rows)


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


def example_images(
    main_import: str, script_args: Sequence[str]
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(train_images, target_images)``, each ``(n, H, W)`` or ``(n, H, W, C)``, when the
    training module ``main_import`` offers ``example_images(script_args)``; else None."""
    module = importlib.import_module(main_import)
    provider = getattr(module, "example_images", None)
    if provider is None:
        return None
    train, targets = provider(list(script_args))
    return np.asarray(train), np.asarray(targets)


def example_labels(main_import: str, script_args: Sequence[str]) -> np.ndarray | None:
    """The targets' class labels when the training module ``main_import`` offers
    ``target_labels(script_args)``."""
    module = importlib.import_module(main_import)
    provider = getattr(module, "target_labels", None)
    return None if provider is None else np.asarray(provider(list(script_args)))
