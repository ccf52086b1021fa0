"""Benchmark: our LASSO path solvers against scikit-learn, side by side in one run.

Run from the repository root::

    .venv/bin/python benchmarks/regression_bench.py [--out benchmarks/results/regression.json]
        [--quick] [--device cpu|cuda] [--solvers gram,saga]

The problem is datamodels-shaped: boolean masks (inclusion probability 0.5) over ``p`` training
examples for ``n`` models; ``t`` targets from 5%-sparse weights plus Gaussian noise as large as
the signal; 90% of the first ``n`` models train, 10% validate, and ``n_test`` further models are
held out. Every target's path has ``k`` lambdas from its own ``lambda_max`` down to
``eps * lambda_max``, and its lambda is chosen on the validation models.

- **Reference** (scikit-learn at its best documented settings for this problem): the masks
  standardized with the training models' statistics and centered, as a Fortran-ordered float64
  array; the Gram matrix ``X^T X`` computed once (``np.dot``, float64) and passed to
  ``lasso_path(X, y, alphas=grid, precompute=G, Xy=X^T y, copy_X=False, check_input=False)``
  per target on the same grid (its default ``tol`` 1e-4, relative to ``y^T y`` like ours);
  validation MSE at each lambda; the best one chosen; held-out MSE of that choice. Why these
  settings: ``enet_path`` validates and converts ``X`` on every call unless told not to. With a
  C-ordered ``X`` (or ``copy_X=True``) it copies the 18,000 x 2,000 float64 matrix per target
  into Fortran order, and with ``check_input=True`` it still scans it for non-finite values,
  although with a precomputed Gram matrix ``X`` is not used by the solver at all.
  ``check_input=False`` ("the input validation checks are skipped ... assumed that they are
  handled by the caller", sklearn's ``enet_path`` docs) needs exactly what we pass: a
  Fortran-ordered float64 ``X``, a C-contiguous Gram matrix and ``Xy``. The benchmark times
  the three settings side by side on ``--settings-targets`` targets (``sklearn_settings`` in
  the JSON) and uses the fastest; the coefficients are identical. Per-target calls run on one
  core (``lasso_path`` has no ``n_jobs``; its coordinate descent is sequential).
- **Ours**: ``fit_gram`` (the default solver) and ``fit_saga`` from an in-memory ``ArraySource``
  with the same k, eps and rows; held-out MSE of ``result.predict``. Both with ``refit=False``
  (the reference does not refit, so the comparison is like for like) and with ``refit=True``
  too (the product's default; ``saga_refit`` is the setting ``test_saga``'s planted fit used
  to time). Our time includes computing the statistics from the raw masks; numba's one-off
  compilation is done before the clock starts and reported separately. SAGA's ``info`` (its
  step size, epochs, checks, the gap estimate's ratio, seconds per phase) is recorded too: the
  numbers its constants were tuned on (``benchmarks/README.md``).

Our solvers stop each target's path early by the product's default rule, the reference
``fast_l1``'s (at the first lambda whose validation MSE does not improve, once 10 are done:
``min_lambdas`` 10, ``patience`` 1); scikit-learn computes the whole grid, from which the best
lambda is chosen, so the held-out MSE ratio also checks that the rule chose as well.
``--rules 5:3`` also times ``gram`` with other rules (``min_lambdas:patience``; 5:3 was the
default until issue 12): most of the path's work is in the steps after each target's best
lambda, which a rule computes only to confirm the best.

``info`` splits our time: ``stats_seconds`` (the statistics passes: ``X^T X`` of the masks
counted from bit-packed columns), ``path_seconds`` (every target's path with its validation
scores), ``refit_seconds``.

Ratios: ``time_ratio = reference seconds / ours`` (above 1: ours is faster) and
``heldout_mse_ratio = ours / reference`` (1.0: the same quality; the goal is at most 1.01).
Timings are the median of ``--repeats`` runs. Record the load average: other work on the
machine skews everything. Runtime: about four minutes on a quiet 2-core machine (the
reference takes about 15 s a repeat, ``saga`` and ``saga_refit`` about 15 s each).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from bench_report import write_report  # benchmarks/ is on sys.path (the script's folder)
from sklearn.linear_model import lasso_path

from dm_assets.regression.config import MIN_LAMBDAS, PATIENCE
from dm_assets.regression.data import ArraySource
from dm_assets.regression.gram import fit_gram
from dm_assets.regression.saga import fit_saga


def make_problem(n: int, n_test: int, p: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n + n_test, p)) < 0.5
    w = np.zeros((p, t), np.float32)
    support = max(1, p // 20)
    for j in range(t):
        idx = rng.choice(p, support, replace=False)
        w[idx, j] = rng.normal(size=support)
    signal = x.astype(np.float32) @ w
    y = signal + rng.normal(size=signal.shape).astype(np.float32) * signal.std(0)
    return {"x": x, "y": y.astype(np.float32)}


SKLEARN_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (memory order of X, keyword arguments of lasso_path besides the Gram matrix)
    "C_order_copy_X": ("C", {}),
    "F_order_no_copy": ("F", {"copy_X": False}),
    "F_order_no_copy_no_check": ("F", {"copy_X": False, "check_input": False}),
}
FASTEST_SETTING = "F_order_no_copy_no_check"


def sklearn_reference(
    x: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    k: int,
    eps: float,
    setting: str = FASTEST_SETTING,
) -> dict[str, Any]:
    order, options = SKLEARN_SETTINGS[setting]
    start = time.perf_counter()
    xf = x.astype(np.float64)
    mean, std = xf[train].mean(0), xf[train].std(0)
    std[std == 0] = 1
    xs = (xf - mean) / std
    xt = xs[train]
    x_center = xt.mean(0)
    xtc = np.asarray(xt - x_center, order=order)
    gram = np.dot(xtc.T, xtc)  # C-contiguous, as check_input=False requires
    chosen_val, heldout = [], []
    for j in range(y.shape[1]):
        yt = y[train, j].astype(np.float64)
        ybar = yt.mean()
        xy = np.dot(xtc.T, yt - ybar)
        lam_max = np.abs(xy).max() / len(train)
        alphas = lam_max * np.geomspace(1, eps, k)
        _, coefs, _ = lasso_path(xtc, yt - ybar, alphas=alphas, precompute=gram, Xy=xy, **options)
        bias = ybar - x_center @ coefs  # (k,)
        val_mse = ((y[val, j][:, None] - xs[val] @ coefs - bias) ** 2).mean(0)
        best = int(np.argmin(val_mse))
        chosen_val.append(val_mse[best])
        pred = xs[test] @ coefs[:, best] + bias[best]
        heldout.append(np.mean((y[test, j] - pred) ** 2))
    return {
        "seconds": time.perf_counter() - start,
        "heldout_mse": float(np.mean(heldout)),
        "val_mse": float(np.mean(chosen_val)),
    }


def ours(
    fit: Callable[..., Any],
    src: ArraySource,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    **kwargs: Any,
) -> dict[str, Any]:
    start = time.perf_counter()
    result = fit(src, train, val, **kwargs)
    seconds = time.perf_counter() - start
    pred = result.predict(src.x[test]).numpy()
    heldout = float(np.mean((y[test] - pred) ** 2))
    best_val = result.val_mse.gather(1, result.best_step[:, None])[:, 0]
    return {
        "seconds": seconds,
        "heldout_mse": heldout,
        "val_mse": float(best_val.mean()),
        "mean_steps": float((~torch.isnan(result.val_mse)).sum(1).float().mean()),
        "mean_nonzeros": float((result.weight != 0).sum(0).float().mean()),
        "info": {k: float(v) for k, v in result.info.items()},
    }


def _rules(text: str) -> list[tuple[int, int]]:
    """``"5:3,10:2"`` -> ``[(5, 3), (10, 2)]`` (``min_lambdas:patience`` pairs)."""
    rules = []
    for rule in filter(None, text.split(",")):
        min_lambdas, patience = rule.split(":")
        rules.append((int(min_lambdas), int(patience)))
    return rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/regression.json")
    parser.add_argument("--quick", action="store_true", help="a small problem (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--solvers", default="gram,saga")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=None, help="models (train + validation)")
    parser.add_argument("--p", type=int, default=None, help="features")
    parser.add_argument("--t", type=int, default=None, help="targets")
    parser.add_argument(
        "--settings-targets",
        type=int,
        default=10,
        help="targets on which scikit-learn's settings are timed side by side (0: skip)",
    )
    parser.add_argument(
        "--rules",
        type=_rules,
        default=[],
        help="also time `gram` with these early-stopping rules, min_lambdas:patience, "
        "e.g. 5:3,10:2 (default: none)",
    )
    args = parser.parse_args()
    n, p, t = (4000, 400, 20) if args.quick else (20_000, 2000, 100)
    n, p, t = args.n or n, args.p or p, args.t or t
    n_test, k, eps = n // 10, 25, 1e-2
    device = torch.device(args.device)
    data = make_problem(n, n_test, p, t)
    x, y = data["x"], data["y"]
    train, val = np.arange(int(0.9 * n)), np.arange(int(0.9 * n), n)
    test = np.arange(n, n + n_test)
    src = ArraySource(x, y)
    load_before = os.getloadavg()

    warm = time.perf_counter()
    fit_gram(
        ArraySource(x[:300, :50], y[:300, :2]),
        np.arange(250),
        np.arange(250, 300),
        k=3,
        eps=0.1,
        device=device,
    )  # numba compiles (cached on disk afterwards)
    compile_seconds = time.perf_counter() - warm

    settings: dict[str, Any] = {}
    if args.settings_targets:
        few = y[:, : args.settings_targets]
        for name in SKLEARN_SETTINGS:
            settings[name] = sklearn_reference(x, few, train, val, test, k, eps, setting=name)
            print(f"  sklearn setting {name}: {settings[name]['seconds']:.2f} s", flush=True)
        settings = {"targets": args.settings_targets, "used": FASTEST_SETTING, **settings}

    runs: dict[str, list[dict[str, Any]]] = {"sklearn": []}
    solvers = args.solvers.split(",")
    configs: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
    common = {"k": k, "eps": eps, "device": device}
    if "gram" in solvers:
        configs["gram"] = (fit_gram, {**common, "refit": False})
        configs["gram_refit"] = (fit_gram, {**common, "refit": True})
    for min_lambdas, patience in args.rules:
        # another early-stopping rule: the steps after a target's best lambda cost most of
        # the path; its held-out MSE ratio says what the rule costs in quality on this problem
        configs[f"gram_rule{min_lambdas}:{patience}"] = (
            fit_gram,
            {**common, "refit": False, "min_lambdas": min_lambdas, "patience": patience},
        )
    if "saga" in solvers:
        configs["saga"] = (fit_saga, {**common, "refit": False, "batch_size": 512})
        configs["saga_refit"] = (fit_saga, {**common, "refit": True, "batch_size": 512})
    for name in configs:
        runs[name] = []
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            if name == "sklearn":
                runs[name].append(sklearn_reference(x, y, train, val, test, k, eps))
            else:
                fit, kwargs = configs[name]
                runs[name].append(ours(fit, src, y, train, val, test, **kwargs))
            print(f"  repeat {r}: {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)

    ref_seconds = statistics.median(run["seconds"] for run in runs["sklearn"])
    ref_mse = runs["sklearn"][0]["heldout_mse"]
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        seconds = statistics.median(run["seconds"] for run in rs)
        summary[name] = {
            "seconds_median": seconds,
            "seconds_all": [run["seconds"] for run in rs],
            "heldout_mse": rs[0]["heldout_mse"],
            "time_ratio_vs_sklearn": ref_seconds / seconds,
            "heldout_mse_ratio_vs_sklearn": rs[0]["heldout_mse"] / ref_mse,
            **{key: v for key, v in rs[0].items() if key not in ("seconds", "heldout_mse")},
        }
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "problem": {
            "n_train": len(train),
            "n_val": len(val),
            "n_test": len(test),
            "p": p,
            "t": t,
            "k": k,
            "eps": eps,
            "density": 0.05,
            "early_stopping": {"min_lambdas": MIN_LAMBDAS, "patience": PATIENCE},
        },
        "numba_compile_seconds": compile_seconds,
        "sklearn_settings": settings,
        "results": summary,
    }
    print(
        f"\nproblem: {len(train)} train / {len(val)} val / {len(test)} held-out models, "
        f"p={p}, t={t}, k={k}, eps={eps}; device {device}"
    )
    print(
        f"{'solver':<12}{'seconds':>10}{'sklearn/ours':>14}{'held-out MSE':>14}{'ours/sklearn':>14}"
    )
    for name, s in summary.items():
        print(
            f"{name:<12}{s['seconds_median']:>10.2f}{s['time_ratio_vs_sklearn']:>14.2f}"
            f"{s['heldout_mse']:>14.4f}{s['heldout_mse_ratio_vs_sklearn']:>14.4f}"
        )
    print(f"wrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
