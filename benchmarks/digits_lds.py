"""Benchmark: do the digits datamodels mean something? Seconds per model and the LDS.

Run from the repository root::

    .venv/bin/python benchmarks/digits_lds.py [--train 1500] [--val 250] [--heldout 500]
        [--repeats 2] [--variants shipped,mlp_random_init,mlp_shared_init,digits_mlp]
        [--out benchmarks/results/digits_lds.json]

    # the main job's experiment at its own sizes (3,500 models: about 6 minutes on 2 cores)
    .venv/bin/python benchmarks/digits_lds.py --variants digits_mlp --train 2500 --val 500 \
        --heldout 500 --repeats 4 --out benchmarks/results/digits_mlp_lds.json

For each variant (training settings of ``dm_assets.examples.digits.train_digits``), models are
trained in this process with one thread, exactly as the worker would train them (``main``'s
``train_model(index, settings)``): indices ``[0, train)`` fit the datamodels, the next ``val``
choose each target's lambda, and the last ``heldout`` are held out, as replicate groups of
``repeats`` (``repeat_start`` = the first held-out index: each group of ``repeats`` consecutive
models shares a mask). The datamodels are fitted by ``compute_datamodels`` (gram solver, CPU,
25 lambdas down to 1e-3 lambda_max) from an in-memory ``ArraySource``.

The variants ``shipped`` and ``digits_mlp`` take their model settings from the shipped
experiment files (``dm_assets/experiments/digits.yaml`` and ``digits_mlp.yaml``: every
``digits.*`` trainer argument but ``repeat_start`` and ``repeats``, which this benchmark sets),
so they follow those files; the others are written out below.

Reported per variant:

- ``seconds_per_model``: wall time of ``train_model`` (mask, training, margins), mean over all
  models; ``target_accuracy``: mean accuracy on the 797 targets (margin > 0).
- ``lds``: the linear datamodeling score, the mean over the 797 targets of the Spearman
  correlation, across the held-out models, between the datamodels' prediction and the model's
  actual margin (ranks with ties averaged, then Pearson). ``lds_first_replicates`` uses only the
  first model of each group (distinct masks); ``lds_mean_of_seeds`` scores the prediction of
  each group's mask against the mean of its ``repeats`` models' margins.
- ``noise_ceiling``: the best LDS any function of the mask could reach, estimated from the
  replicate groups as the pipeline does
  (:func:`dm_assets.evaluation.ceiling.estimate_noise_ceiling`); 1 when training is
  deterministic given the mask (a shared initialization, full batches).
  ``replicate_correlation``: the mean over targets of the Spearman correlation between the
  first two models of each group (how well one training run predicts another with the same
  mask; below the ceiling, which compares with a noise-free prediction).
- ``mean_val_r2``, ``mean_nonzeros``, ``fit_seconds``: the regression's own summary.

Record the load average (reported before and after): the machine may be shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_report import write_report  # benchmarks/ is on sys.path (the script's folder)
from scipy.stats import rankdata

from dm_assets.evaluation.ceiling import estimate_noise_ceiling, group_identical_masks
from dm_assets.examples.digits.data import NUM_TARGETS, NUM_TRAIN
from dm_assets.examples.digits.train_digits import DigitsSettings, train_model
from dm_assets.pipeline.experiment import load_experiment
from dm_assets.regression.compute_datamodels import compute_datamodels
from dm_assets.regression.config import load_config
from dm_assets.regression.data import ArraySource

EXPERIMENTS = Path(__file__).resolve().parents[1] / "dm_assets" / "experiments"


def experiment_settings(name: str) -> dict[str, Any]:
    """The ``digits.*`` trainer arguments of ``dm_assets/experiments/<name>.yaml`` as
    :class:`DigitsSettings` fields (typed like the defaults), less ``repeat_start`` and
    ``repeats``."""
    defaults = DigitsSettings()
    args = load_experiment(EXPERIMENTS / f"{name}.yaml").trainer.script_args()
    settings = {}
    for arg in args:
        key, value = arg.removeprefix("--digits.").split("=", 1)
        if key not in ("repeat_start", "repeats"):
            settings[key] = type(getattr(defaults, key))(value)
    return settings


_MLP = {"model": "mlp", "hidden": 64, "steps": 200, "lr": 0.01, "weight_decay": 1e-4}
VARIANTS: dict[str, dict[str, Any]] = {
    # digits.yaml: logistic regression, one initialization shared by every model, full batch
    "shipped": experiment_settings("digits"),
    # one hidden layer, full batch, each model its own random initialization
    "mlp_random_init": {**_MLP, "init_seed": -1},
    # the same MLP with one shared initialization
    "mlp_shared_init": {**_MLP, "init_seed": 0},
    # digits_mlp.yaml (the main job): minibatch MLP, own initialization and order per model
    "digits_mlp": experiment_settings("digits_mlp"),
}
DEFAULT_VARIANTS = "shipped,mlp_random_init"


def spearman_per_column(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b`` (``(n, t)``
    each): float64 ``(t,)``, NaN for a constant column."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(0) / np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))


def run_variant(
    name: str,
    overrides: dict[str, Any],
    *,
    n_train: int,
    n_val: int,
    n_heldout: int,
    repeats: int = 2,
) -> dict[str, Any]:
    n = n_train + n_val + n_heldout
    settings = DigitsSettings(**{**overrides, "repeat_start": n_train + n_val, "repeats": repeats})
    masks = np.zeros((n, NUM_TRAIN), dtype=bool)
    margins = np.zeros((n, NUM_TARGETS), dtype=np.float32)
    start = time.perf_counter()
    for index in range(n):
        row = train_model(index, settings)
        masks[index], margins[index] = row["masks"], row["margins"]
    seconds_per_model = (time.perf_counter() - start) / n
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            None,
            {
                "data": {"data_path": "unused", "num_train": n_train, "num_val": n_val},
                "cfg": {
                    "k": 25,
                    "eps": 1e-3,
                    "batch_size": min(500, n_train),
                    "solver": "gram",
                    "device": "cpu",
                    "out_dir": str(Path(tmp) / "out"),
                },
            },
        )
        fit = compute_datamodels(config, source=ArraySource(masks, margins))
    held = slice(n_train + n_val, n)
    predicted = fit.result.predict(masks[held]).numpy()
    actual = margins[held]
    lds = spearman_per_column(predicted, actual)
    first, second = actual[0::repeats], actual[1::repeats]
    identical = all(np.array_equal(first, actual[r::repeats]) for r in range(1, repeats))
    ceiling = estimate_noise_ceiling(actual, group_identical_masks(masks[held]))
    group_means = actual.reshape(-1, repeats, NUM_TARGETS).mean(axis=1)
    result = {
        "settings": dataclasses.asdict(settings),
        "seconds_per_model": seconds_per_model,
        "target_accuracy": float((margins > 0).mean()),
        "lds": float(np.nanmean(lds)),
        "lds_median": float(np.nanmedian(lds)),
        "lds_first_replicates": float(
            np.nanmean(spearman_per_column(predicted[0::repeats], first))
        ),
        "lds_mean_of_seeds": float(
            np.nanmean(spearman_per_column(predicted[0::repeats], group_means))
        ),
        "noise_ceiling": 1.0 if identical or ceiling is None else ceiling.lds,
        "replicate_correlation": (
            1.0 if identical else float(np.nanmean(spearman_per_column(first, second)))
        ),
        "replicates_identical": identical,
        "mean_val_r2": fit.summary["mean_val_r2"],
        "mean_nonzeros": fit.summary["mean_nonzeros"],
        "fit_seconds": fit.summary["seconds"],
    }
    print(
        f"{name}: {seconds_per_model * 1000:.0f} ms/model, target accuracy "
        f"{result['target_accuracy']:.3f}, LDS {result['lds']:.3f} (first replicates "
        f"{result['lds_first_replicates']:.3f}, mean of {repeats} seeds "
        f"{result['lds_mean_of_seeds']:.3f}), noise ceiling {result['noise_ceiling']:.3f}, "
        f"validation R^2 {result['mean_val_r2']:.3f}, fit {result['fit_seconds']:.1f} s",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1500, help="models that fit")
    parser.add_argument("--val", type=int, default=250, help="models that choose lambda")
    parser.add_argument(
        "--heldout", type=int, default=500, help="held-out models (a multiple of --repeats)"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="held-out models per mask (seeds), at least 2"
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated, of {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--out", default="benchmarks/results/digits_lds.json")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error(f"--repeats={args.repeats}: replicate groups need at least 2 models")
    if args.heldout < 2 * args.repeats or args.heldout % args.repeats:
        parser.error(
            f"--heldout={args.heldout}: use a multiple of --repeats={args.repeats}, at least "
            f"{2 * args.repeats} (two replicate groups)"
        )
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {sorted(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = {
        name: run_variant(
            name,
            VARIANTS[name],
            n_train=args.train,
            n_val=args.val,
            n_heldout=args.heldout,
            repeats=args.repeats,
        )
        for name in names
    }
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "models": {
            "train": args.train,
            "val": args.val,
            "heldout": args.heldout,
            "repeats": args.repeats,
        },
        "results": results,
    }
    print(f"written to {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
