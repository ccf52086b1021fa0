"""Benchmark: baselines by dattri (influence functions with CG, TRAK, TracIn) against datamodels
on the digits MLP, all scored with the same LDS, interval and held-out models, and timed.

Run from the repository root::

    .venv/bin/python benchmarks/attribution_lds.py [--train 1000] [--val 200] [--masks 50]
        [--seeds 4] [--targets 797] [--curve 300,600,1200] [--workers 2]
        [--out benchmarks/results/attribution_lds.json]

The models are digits MLPs like ``digits_mlp`` (``dm_assets.examples.digits.train_digits``:
64 hidden units, minibatches of 64, 20 epochs, Adam lr 0.01, weight decay 1e-4, each model its
own initialization and minibatch order), trained in this process's workers (one thread each)
exactly as the pipeline's worker trains them (``train_model(index, settings)``): indices
``[0, train)`` fit the datamodels, the next ``val`` choose lambda, then ``masks`` held-out masks
trained ``seeds`` times each (``repeat_start``/``repeats``: the noise ceiling).

- **datamodels**: ``compute_datamodels`` (gram solver, CPU, 25 lambdas down to 1e-3 lambda_max)
  on the first ``N`` trained models for each ``N`` of ``--curve`` (``N / 6`` of them choose
  lambda), and on all ``train + val``; compute = ``N x seconds per model + fit seconds``.
- **baselines**: :func:`dm_assets.attribution.run_method` on the experiment's attribution task
  (:mod:`dm_assets.examples.digits.attribution`) with their default settings; compute = their
  attribution plus training of the full-set model(s) they need, in this process on one thread
  (as each stored model was trained).
- every predictor is scored by :func:`dm_assets.evaluation.uncertainty.score_held_out` on the
  same held-out models (95% bootstrap interval over held-out masks, noise ceiling); each
  baseline also by ``dattri.metric.lds`` (``dattri_lds``).

Writes ``--out`` (JSON) and the figure beside it (``.png``), and prints the table. Record the load
average (reported): the machine may be shared.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_report import write_report  # benchmarks/ is on sys.path (the script's folder)

from dm_assets.attribution import METHODS, dattri_lds, run_method, score_attribution
from dm_assets.attribution.report import ComputePoint, lds_vs_compute_figure
from dm_assets.evaluation.ceiling import group_identical_masks
from dm_assets.evaluation.figures import save_png
from dm_assets.evaluation.uncertainty import score_held_out
from dm_assets.examples.digits.attribution import attribution_task
from dm_assets.examples.digits.data import NUM_TARGETS, NUM_TRAIN
from dm_assets.examples.digits.train_digits import DigitsSettings, train_model
from dm_assets.regression.compute_datamodels import compute_datamodels
from dm_assets.regression.config import load_config
from dm_assets.regression.data import ArraySource

MLP: dict[str, Any] = {
    "model": "mlp",
    "hidden": 64,
    "batch_size": 64,
    "epochs": 20,
    "lr": 0.01,
    "weight_decay": 1e-4,
    "init_seed": -1,
}


def _train_range(args: tuple[int, int, dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, float]:
    torch.set_num_threads(1)
    start, stop, fields = args
    settings = DigitsSettings(**fields)
    masks = np.zeros((stop - start, NUM_TRAIN), dtype=bool)
    margins = np.zeros((stop - start, NUM_TARGETS), dtype=np.float32)
    began = time.perf_counter()
    for k, index in enumerate(range(start, stop)):
        row = train_model(index, settings)
        masks[k], margins[k] = row["masks"], row["margins"]
    return masks, margins, time.perf_counter() - began


def train_models(fields: dict[str, Any], n: int, workers: int) -> tuple[np.ndarray, ...]:
    """Masks ``(n, 1000)``, margins ``(n, 797)`` of models ``0 .. n-1`` and the mean seconds of
    one model in one worker thread."""
    bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
    jobs = [(int(a), int(b), fields) for a, b in itertools.pairwise(bounds) if b > a]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_train_range, jobs))
    masks = np.concatenate([p[0] for p in parts])
    margins = np.concatenate([p[1] for p in parts])
    return masks, margins, np.asarray(sum(p[2] for p in parts) / n)


def fit_datamodels(masks: np.ndarray, margins: np.ndarray, n: int) -> tuple[Any, float]:
    n_val = max(2, n // 6)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            None,
            {
                "data": {"data_path": "unused", "num_train": n - n_val, "num_val": n_val},
                "cfg": {
                    "k": 25,
                    "eps": 1e-3,
                    "batch_size": min(500, n - n_val),
                    "solver": "gram",
                    "device": "cpu",
                    "out_dir": str(Path(tmp) / "out"),
                },
            },
        )
        fit = compute_datamodels(config, source=ArraySource(masks[:n], margins[:n]))
    return fit, float(fit.summary["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--masks", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--targets", type=int, default=NUM_TARGETS)
    parser.add_argument("--curve", default="300,600")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="benchmarks/results/attribution_lds.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()

    fitted = args.train + args.val
    n = fitted + args.masks * args.seeds
    fields = {**MLP, "repeat_start": fitted, "repeats": args.seeds}
    began = time.perf_counter()
    masks, margins, spm_array = train_models(fields, n, args.workers)
    spm = float(spm_array)
    print(
        f"trained {n} models in {time.perf_counter() - began:.0f} s ({spm:.3f} s per model "
        "in one worker thread)",
        flush=True,
    )
    t = args.targets
    held = slice(fitted, n)
    held_masks, actual = masks[held], margins[held, :t].astype(np.float64)
    groups = group_identical_masks(held_masks)

    rows: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    sizes = sorted({int(s) for s in args.curve.split(",") if s} | {fitted})
    for size in sizes:
        fit, fit_seconds = fit_datamodels(masks, margins, size)
        predicted = fit.result.predict(held_masks).numpy()[:, :t].astype(np.float64)
        scored = score_held_out(predicted, actual, groups=groups, resamples=args.resamples)
        point = {
            "models": size,
            **scored.to_dict(),
            "fit_seconds": fit_seconds,
            "seconds": size * spm + fit_seconds,
        }
        curve.append(point)
        print(f"datamodels N={size}: LDS {scored.lds:.3f} {scored.lds_ci}", flush=True)
    full = curve[-1]
    rows.append({"method": "datamodels", **full})

    # the baselines train and attribute on one thread, as every stored model was trained
    torch.set_num_threads(1)
    task = attribution_task(DigitsSettings(**MLP))
    for method in args.methods.split(","):
        result = run_method(method, task, targets=np.arange(t))
        scored = score_attribution(result.scores, held_masks, actual, resamples=args.resamples)
        rows.append(
            {
                "method": method,
                **scored.to_dict(),
                "seconds": result.seconds,
                "attribution_seconds": result.attribution_seconds,
                "training_seconds": result.training_seconds,
                "models_trained": result.models_trained,
                "dattri_lds": dattri_lds(result.scores, held_masks, actual),
                "settings": result.settings,
                "versions": result.versions,
            }
        )
        print(
            f"{method}: LDS {scored.lds:.3f} {scored.lds_ci} in {result.seconds:.1f} s "
            f"(dattri's LDS {rows[-1]['dattri_lds']:.3f})",
            flush=True,
        )

    header = (
        f"{'method':<14}{'LDS':>7}  {'95% interval':<18}{'ceiling':>8}{'LDS/ceil':>9}"
        f"{'seconds':>10}"
    )
    print(header)
    for r in rows:
        ci = r["ci"]
        ci_text = "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
        ceiling = r["noise_ceiling"]
        ratio = r["lds_over_ceiling"]
        print(
            f"{r['method']:<14}{r['lds']:>7.3f}  {ci_text:<18}"
            f"{'n/a' if ceiling is None else f'{ceiling:.3f}':>8}"
            f"{'n/a' if ratio is None else f'{ratio:.3f}':>9}{r['seconds']:>10.1f}"
        )

    out = Path(args.out)
    save_png(
        lds_vs_compute_figure(
            [ComputePoint(str(p["models"]), p["seconds"], p["lds"], None) for p in curve],
            [
                ComputePoint(
                    r["method"], r["seconds"], r["lds"], tuple(r["ci"]) if r["ci"] else None
                )
                for r in rows[1:]
            ],
            ceiling=full["noise_ceiling"],
            title=f"digits MLP: LDS against compute ({t} targets)",
        ),
        out.with_suffix(".png"),
    )
    report = {
        "settings": fields,
        "models": {"fitted": fitted, "held_out_masks": args.masks, "seeds": args.seeds},
        "targets": t,
        "seconds_per_model": spm,
        "seconds_per_model_source": "mean wall time of train_model in the benchmark's workers "
        "(one thread each)",
        "table": rows,
        "curve": curve,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
    }
    write_report(report, out)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
