"""Fit datamodels from an FFCV dataset: the seed's ``compute_datamodels`` command.

    python -m dm_assets.regression.compute_datamodels -C config.yml [--section.key=value ...]

Rows ``[0, num_train)`` of the dataset fit, the next ``num_val`` choose each target's lambda,
the rest are left for evaluation. ``out_dir`` (which must not exist) receives a fit folder,
written under a temporary name and renamed when complete (:mod:`dm_assets.regression.fit` lists
each file's contents with shapes and dtypes):

``datamodels.pt``           the weights: ``((x - mean) / std) @ weight + bias`` predicts
``regularization_path.csv`` one row per (target, lambda step) reached
``summary.json``            solver, device, seconds, models and features used, mean chosen
                            lambda / lambda_max, mean nonzeros, mean validation R^2
``config.yaml``             the resolved configuration
``manifest.json``           the exact model indices used (the dataset's ``idx`` of its first
                            ``num_train`` and next ``num_val`` rows), the dataset's size and
                            sha256, a digest of the rows used, versions; this command knows no
                            store, so the rows' training configurations are recorded as unknown
                            (:mod:`dm_assets.regression.manifest`)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dm_assets.cli import configure_logging
from dm_assets.regression.beton import BetonError
from dm_assets.regression.config import ConfigError, RegressionConfig, load_config, parse_overrides
from dm_assets.regression.data import RowSource
from dm_assets.regression.fit import FitFolder
from dm_assets.regression.gram import fit_gram
from dm_assets.regression.manifest import FitManifest, ManifestError, build_manifest
from dm_assets.regression.path import LassoPathResult
from dm_assets.regression.stats import accumulate_stats

logger = logging.getLogger(__name__)


@dataclass
class Datamodels:
    """A fit and what describes it: the result, per-target validation R^2, the summary."""

    result: LassoPathResult
    val_r2: torch.Tensor
    summary: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an unavailable GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError([f"cfg.device={name!r} but no CUDA GPU is available: use cpu"])
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                [f"cfg.device={name!r} but only {torch.cuda.device_count()} GPU(s) exist"]
            )
    return device


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_solver(name: str, n_features: int, device: torch.device) -> str:
    """``auto``: ``gram`` when its three float64 ``p x p`` matrices take at most half of the
    device's free memory, else ``saga`` (which streams and needs no ``p x p``)."""
    if name != "auto":
        return name
    need = 3 * 8 * n_features * n_features
    return "gram" if need <= _available_bytes(device) // 2 else "saga"


def open_source(config: RegressionConfig) -> RowSource:
    """The configured dataset as a row source (a ``BetonSource`` whose ``cfg.num_workers``
    threads read it), with the target slice applied."""
    from dm_assets.regression.beton_reader import BetonSource

    d = config["data"]
    return BetonSource(
        d["data_path"],
        num_workers=config["cfg"]["num_workers"],
        target_start=d["target_start_ind"],
        target_end=d["target_end_ind"],
    )


def compute_datamodels(config: RegressionConfig, *, source: RowSource | None = None) -> Datamodels:
    """Fit the configured regression; ``source`` overrides ``data.data_path`` (for arrays)."""
    d, c, e = config["data"], config["cfg"], config["early_stopping"]
    device = resolve_device(c["device"])
    if source is None:
        source = open_source(config)
    num_train, num_val = d["num_train"], d["num_val"]
    if source.n_rows < num_train + num_val:
        raise ConfigError(
            [
                f"the dataset has {source.n_rows} models but data.num_train + data.num_val = "
                f"{num_train + num_val}: train more models or lower them"
            ]
        )
    if e["eps"] is not None:
        logger.warning(
            "early_stopping.eps=%s is the seed's weight-change tolerance, which this solver "
            "does not use (it stops on a relative duality gap): set cfg.tol instead",
            e["eps"],
        )
    solver = choose_solver(c["solver"], source.n_features, device)
    train_rows = np.arange(num_train)
    val_rows = np.arange(num_train, num_train + num_val)
    common: dict[str, Any] = {
        "k": c["k"],
        "eps": c["eps"],
        "batch_size": c["batch_size"],
        "use_bias": c["use_bias"],
        "device": device,
        "min_lambdas": e["min_lambdas"],
        "patience": e["patience"],
        "refit": c["refit"],
    }
    start = time.perf_counter()
    logger.info(
        "fitting %d targets on %d features: %d train and %d validation models, solver %s on %s",
        source.n_targets,
        source.n_features,
        num_train,
        num_val,
        solver,
        device,
    )
    if solver == "gram":
        result = fit_gram(
            source,
            train_rows,
            val_rows,
            tol=c["tol"] or 1e-6,
            max_iter=c["max_iter"] or 5000,
            **common,
        )
    else:
        from dm_assets.regression.saga import fit_saga

        result = fit_saga(
            source,
            train_rows,
            val_rows,
            tol=c["tol"] or 1e-4,
            lr=c["lr"],
            check_every=e["check_every"],
            max_epochs=c["max_iter"] or 200,
            seed=d["seed"],
            cache_bytes=c["cache_bytes"],
            **common,
        )
    seconds = time.perf_counter() - start
    val_stats = accumulate_stats(
        source, val_rows, batch_size=c["batch_size"], device=device, gram=False
    )
    val_var = (val_stats.sum_y2 / val_stats.n - (val_stats.sum_y / val_stats.n) ** 2).cpu()
    best_val = result.val_mse.gather(1, result.best_step[:, None])[:, 0]
    val_r2 = (1 - best_val / val_var.clamp_min(1e-30)).to(torch.float32)
    summary = {
        "solver": solver,
        "device": str(device),
        "seconds": seconds,
        "n_train": num_train,
        "n_val": num_val,
        "n_models_in_dataset": source.n_rows,
        "n_features": source.n_features,
        "n_targets": source.n_targets,
        "target_start_ind": d["target_start_ind"],
        "mean_lambda_over_max": float((result.lam / result.lam_max.clamp_min(1e-30)).mean()),
        "mean_nonzeros": float((result.weight != 0).sum(0).float().mean()),
        "mean_val_r2": float(val_r2.mean()),
        "mean_val_mse": float(best_val.mean()),
        "refit": result.refit,
    }
    logger.info(
        "done in %.1f s: mean validation R^2 %.3f, mean nonzeros %.1f",
        seconds,
        summary["mean_val_r2"],
        summary["mean_nonzeros"],
    )
    return Datamodels(result=result, val_r2=val_r2, summary=summary)


def path_table(result: LassoPathResult, target_offset: int = 0) -> pd.DataFrame:
    """The regularization path, one row per (target, lambda step) a target reached."""
    t, k = result.lambdas.shape
    target = np.repeat(np.arange(t), k)
    step = np.tile(np.arange(k), t)
    frame = pd.DataFrame(
        {
            "target": target + target_offset,
            "step": step,
            "lambda": result.lambdas.numpy().ravel(),
            "lambda_over_max": (result.lambdas / result.lam_max.double()[:, None].clamp_min(1e-30))
            .numpy()
            .ravel(),
            "train_mse": result.train_mse.numpy().ravel(),
            "val_mse": result.val_mse.numpy().ravel(),
            "nonzeros": result.nonzeros.numpy().ravel(),
            "chosen": (step == result.best_step.numpy()[target]).astype(np.int8),
        }
    )
    return frame[frame["nonzeros"] >= 0].reset_index(drop=True)


def write_outputs(
    fit: Datamodels,
    out_dir: str | Path,
    config: RegressionConfig,
    *,
    manifest: FitManifest | None = None,
) -> Path:
    """Write the fit folder ``out_dir`` (see the module docstring) atomically with
    :meth:`FitFolder.write <dm_assets.regression.fit.FitFolder.write>`, with ``manifest``
    (:func:`~dm_assets.regression.manifest.build_manifest`; None for a fit of arrays that no
    dataset describes); refuse an existing one. Returns ``out_dir`` as given."""
    FitFolder.write(
        out_dir,
        weights=fit.result.seed_dict(),
        path_table=path_table(fit.result, config["data"]["target_start_ind"]),
        summary=fit.summary,
        config=config.to_dict(),
        manifest=manifest,
    )
    return Path(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m dm_assets.regression.compute_datamodels -C CONFIG.yml "
        "[--section.key=value ...]"
    )
    if "-h" in args or "--help" in args:
        print(usage)
        print(__doc__)
        return 0
    config_path = None
    for flag in ("-C", "--config-file", "--config"):
        if flag in args:
            i = args.index(flag)
            if i + 1 >= len(args):
                print(f"error: {flag} needs a file\n{usage}", file=sys.stderr)
                return 2
            config_path = args[i + 1]
            del args[i : i + 2]
    configure_logging()
    try:
        config = load_config(config_path, parse_overrides(args))
        out_dir = Path(config["cfg"]["out_dir"])
        if out_dir.exists():
            raise FileExistsError(
                f"cfg.out_dir={out_dir} already exists; choose a new "
                "directory (nothing is overwritten)"
            )
        manifest = build_manifest(config)
        fit = compute_datamodels(config)
        write_outputs(fit, out_dir, config, manifest=manifest)
    except (ConfigError, BetonError, ManifestError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logger.info("wrote %s", out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
