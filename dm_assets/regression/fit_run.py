"""One regression fit written to its fit folder: the configuration set to a device and a slice
of the targets (:func:`configure_fit`), then the fit and its folder (:func:`fit_into_folder`).

What the pipeline's fitting assets run on a device slot; imports neither dagster nor mlflow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dm_assets.regression.fit import FitFolder

if TYPE_CHECKING:
    from dm_assets.regression.compute_datamodels import Datamodels
    from dm_assets.regression.config import RegressionConfig
    from dm_assets.regression.merge import TargetSlice

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class FitRun:
    """A finished fit: ``fit`` (the result, in memory), ``folder`` (its fit folder on disk),
    ``config`` (the configuration it ran with) and ``seconds`` (wall clock of the fit and the
    writing)."""

    fit: Datamodels
    folder: FitFolder
    config: RegressionConfig
    seconds: float


def configure_fit(
    config: RegressionConfig,
    *,
    device: str | None = None,
    targets: TargetSlice | None = None,
) -> RegressionConfig:
    """``config`` with ``cfg.device: auto`` replaced by ``device`` (``"cpu"``, ``"cuda:1"``;
    a device named in the config is kept) and, with ``targets``, the data section cut to those
    targets (``target_start_ind``, ``target_end_ind``)."""
    values = config.to_dict()
    if device is not None and values["cfg"]["device"] == "auto":
        # the caller's device slot decides which device this process fits on
        values["cfg"]["device"] = device
    if targets is not None:
        values["data"]["target_start_ind"] = targets.start
        values["data"]["target_end_ind"] = targets.end
    return type(config)(values=values, source=config.source)


def fit_into_folder(config: RegressionConfig, out_dir: str | Path) -> FitRun:
    """Fit ``config`` (:func:`~dm_assets.regression.compute_datamodels.compute_datamodels`)
    and write the new fit folder ``out_dir`` (which must not exist).

    Raises the fit's own errors: ``ConfigError`` and ``BetonError`` for a configuration or a
    dataset that cannot be fitted, ``FileExistsError`` for an existing ``out_dir``.
    """
    from dm_assets.regression.compute_datamodels import compute_datamodels, write_outputs

    started = time.perf_counter()
    fit = compute_datamodels(config)
    write_outputs(fit, out_dir, config)
    seconds = time.perf_counter() - started
    logger.info("fitted %s in %.1f s", out_dir, seconds)
    return FitRun(fit=fit, folder=FitFolder.open(out_dir), config=config, seconds=seconds)
