"""An experiment's latest fit, by name, for the notebooks: the experiment lookup in front of
:mod:`dm_assets.evaluation.analysis` (which knows fit folders and stores, not experiments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dm_assets.evaluation import analysis
from dm_assets.evaluation.held_out import FitRows
from dm_assets.pipeline.experiment import Experiment, load_experiments
from dm_assets.regression.fit import FitFolder, FitFolderError


def find_experiment(name: str) -> Experiment:
    """The experiment named ``name`` (shipped or in ``$DM_EXPERIMENTS``)."""
    experiments = {e.name: e for e in load_experiments()}
    if name not in experiments:
        raise ValueError(f"no experiment {name!r}; the experiments are {sorted(experiments)}")
    return experiments[name]


def load_finished(name: str, home: str | Path | None = None) -> analysis.FinishedFit:
    """The latest fit of experiment ``name`` under ``home`` (default ``$DM_HOME``)."""
    experiment = find_experiment(name)
    regression = experiment.regression
    if regression is None:
        raise ValueError(f"experiment {name!r} has no regression")
    paths = experiment.paths(home)
    try:
        fit = FitFolder.open(paths.datamodels)
    except FitFolderError as exc:
        raise FileNotFoundError(
            f"experiment {name!r} has no fit at {paths.datamodels}: run "
            f"`python -m dm_assets.launch {name}_all` first"
        ) from exc
    config = regression.config(data_path=paths.beton, out_dir=fit.path)
    rows = FitRows.of(config, store=paths.store, x_name=regression.x_name, y_name=regression.y_name)
    return analysis.read_finished(fit, rows)


def example_images(name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The training and target images of experiment ``name`` when its training module offers
    them (:func:`dm_assets.evaluation.analysis.example_images`); else None."""
    trainer = find_experiment(name).trainer
    return analysis.example_images(trainer.main_import, trainer.script_args())


def example_labels(name: str) -> np.ndarray | None:
    """The target labels of experiment ``name`` when its training module offers them."""
    trainer = find_experiment(name).trainer
    return analysis.example_labels(trainer.main_import, trainer.script_args())
