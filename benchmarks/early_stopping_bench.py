"""Benchmark: what the early-stopping rule chooses, against the whole path, on real fits.

Run from the repository root, after ``make demo`` (it reads the digits_mlp dataset)::

    .venv/bin/python benchmarks/early_stopping_bench.py [--data .dm/digits_mlp/data.beton]
        [--out benchmarks/results/early_stopping.json]

A target's path stops early when its validation MSE has not improved for ``patience`` lambdas,
once ``min_lambdas`` are done. The product's default is the reference ``fast_l1``'s rule
(``min_lambdas`` 10, ``patience`` 1: ``train_saga`` stops a target at the first lambda whose
validation MSE got worse, after ``min_lams_to_try=10``); it was 5 and 3 before issue 12. The
steps a rule saves are the path's costliest (the working set grows as lambda falls), so the
question is only what a rule costs in quality. For each split of the digits_mlp models
(``num_train`` / ``num_val``: the demo's 2,500 / 500, and 1,000 with 60 or 120 validation
models, where the validation curves are noisy), every rule and the whole path (``patience`` =
``k``) are fitted with ``fit_gram`` (``refit=False``, so the choice alone differs) and scored on
the 500 held-out models (rows 3,000-3,499, which no split uses): how many targets chose another
lambda than the whole path, the mean held-out MSE, and the fit's seconds.

Runtime: about 4 minutes on a 2-core machine (the whole path is most of it: its last lambdas
admit most features).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_report import write_report  # benchmarks/ is on sys.path (the script's folder)

from dm_assets.regression.beton_reader import BetonSource
from dm_assets.regression.gram import fit_gram

HELD_OUT = np.arange(3000, 3500)
SPLITS = [(2500, 500, 1e-3), (1000, 60, 1e-2), (1000, 120, 1e-2)]
RULES = [(10, 1), (5, 1), (10, 2), (5, 3)]


def held_out_rows(source: BetonSource) -> tuple[np.ndarray, np.ndarray]:
    """The held-out models' masks and outputs, float64."""
    xs, ys = [], []
    for x, y, _ in source.batches(HELD_OUT, 500, device=torch.device("cpu")):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join(".dm", "digits_mlp", "data.beton"))
    parser.add_argument("--out", default="benchmarks/results/early_stopping.json")
    args = parser.parse_args()
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data} not found: run `make demo` first (or pass --data)")
    source = BetonSource(args.data, num_workers=1)
    if source.n_rows < HELD_OUT[-1] + 1:
        raise SystemExit(f"{args.data} has {source.n_rows} models; this needs digits_mlp's 3,500")
    x_held, y_held = held_out_rows(source)
    k = 25
    load_before = os.getloadavg()
    splits = []
    for num_train, num_val, eps in SPLITS:
        train, val = np.arange(num_train), np.arange(num_train, num_train + num_val)
        runs: dict[str, dict[str, Any]] = {}
        steps: dict[str, np.ndarray] = {}
        for min_lambdas, patience in [*RULES, (k, k)]:
            name = "whole path" if patience == k else f"{min_lambdas}:{patience}"
            start = time.perf_counter()
            res = fit_gram(
                source,
                train,
                val,
                k=k,
                eps=eps,
                batch_size=500,
                min_lambdas=min_lambdas,
                patience=patience,
                refit=False,
            )
            seconds = time.perf_counter() - start
            pred = res.predict(torch.from_numpy(x_held)).double().numpy()
            mse = ((pred - y_held) ** 2).mean(0)
            steps[name] = res.best_step.numpy()
            runs[name] = {
                "min_lambdas": min_lambdas,
                "patience": patience,
                "seconds": seconds,
                "path_seconds": res.info["path_seconds"],
                "heldout_mse_mean": float(mse.mean()),
                "mean_best_step": float(res.best_step.double().mean()),
                "mean_steps_run": float((~torch.isnan(res.val_mse)).sum(1).double().mean()),
            }
            print(
                f"  {num_train}/{num_val}: {name}: {seconds:.1f} s, held-out MSE {mse.mean():.6f}",
                flush=True,
            )
        whole = runs["whole path"]["heldout_mse_mean"]
        for name, run in runs.items():
            run["targets_choosing_otherwise"] = int((steps[name] != steps["whole path"]).sum())
            run["heldout_mse_vs_whole_path"] = run["heldout_mse_mean"] / whole
        splits.append({"num_train": num_train, "num_val": num_val, "eps": eps, "runs": runs})
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "data": {
            "path": str(args.data),
            "models": source.n_rows,
            "features": source.n_features,
            "targets": source.n_targets,
            "held_out_rows": [int(HELD_OUT[0]), int(HELD_OUT[-1]) + 1],
        },
        "k": k,
        "splits": splits,
    }
    print(
        f"\n{'split':<12}{'rule':<12}{'seconds':>9}{'other choice':>14}{'held-out MSE':>14}"
        f"{'vs whole':>10}"
    )
    for split in splits:
        label = f"{split['num_train']}/{split['num_val']}"
        for name, run in split["runs"].items():
            print(
                f"{label:<12}{name:<12}{run['seconds']:>9.1f}"
                f"{run['targets_choosing_otherwise']:>14}{run['heldout_mse_mean']:>14.6f}"
                f"{run['heldout_mse_vs_whole_path']:>10.4f}"
            )
    print(f"wrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
