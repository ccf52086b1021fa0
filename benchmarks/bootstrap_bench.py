"""Benchmark: the held-out evaluation's bootstrap at the demo's shape, against another commit's.

Run from the repository root::

    .venv/bin/python benchmarks/bootstrap_bench.py [--compare-to GITREF] [--repeats 3]
        [--out benchmarks/results/bootstrap.json]

The shape of ``digits_mlp``'s evaluation: 125 held-out masks x 4 seeds (500 models), 797
targets, 1,000 resamples. Outputs are a per-mask signal plus per-model noise; predictions are
constant over each mask's models (as a datamodel's, or any attribution's, are), a second one
for the paired ``bootstrap_lds``. Timed: ``score_held_out`` (the LDS, the noise ceiling and the
mean-of-seeds truth with their intervals: what ``datamodel_eval`` runs once per fit and
``attributions`` once per method) and ``bootstrap_lds`` of two predictors (what each point of
the LDS curve runs).

``--compare-to GITREF`` runs the same measurement on that commit's code (a ``git worktree`` of
it in a temporary folder; its numba kernels compiled before timing), alternating with this
checkout's in fresh processes, and checks that both give the same intervals; the ratios are
``reference seconds / ours``. Each process times one call of each after an untimed warm-up
call; the medians over ``--repeats`` are reported. Record the load: other work skews it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_report import write_report  # benchmarks/ is on sys.path (the script's folder)

REPO = Path(__file__).resolve().parents[1]

MEASURE = """
import json, sys, time
import numpy as np
from dm_assets.evaluation.uncertainty import bootstrap_lds, score_held_out

rng = np.random.default_rng(0)
masks, seeds, targets = 125, 4, 797
signal = rng.normal(size=(masks, targets))
groups = np.repeat(np.arange(masks), seeds)
actual = signal[groups] + 0.5 * rng.normal(size=(masks * seeds, targets))
predicted = (signal + 0.7 * rng.normal(size=(masks, targets)))[groups]
other = predicted + (0.3 * rng.normal(size=(masks, targets)))[groups]
score_held_out(predicted[:40], actual[:40], groups=groups[:40], resamples=5)  # load kernels
bootstrap_lds([predicted[:40], other[:40]], actual[:40], groups=groups[:40], resamples=5)
start = time.perf_counter()
scores = score_held_out(predicted, actual, groups=groups, resamples=1000, seed=0)
middle = time.perf_counter()
paired = bootstrap_lds([predicted, other], actual, groups=groups, resamples=1000, seed=0)
end = time.perf_counter()
single, mean = scores.single, scores.mean_of_seeds
print(json.dumps({
    "score_held_out_seconds": middle - start,
    "bootstrap_lds_seconds": end - middle,
    "intervals": [single.lds_ci, single.noise_ceiling_ci, mean.lds_ci, mean.noise_ceiling_ci],
    "paired_means": paired.mean(axis=1).tolist(),
}))
"""


def measure(code_root: Path) -> dict[str, Any]:
    """One fresh process timing the bootstrap with the ``dm_assets`` of ``code_root``."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE],
        cwd=code_root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"measuring {code_root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_results(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-12) -> bool:
    """Whether two measurements' intervals and paired means agree within ``tol``."""
    flat_a = [x for pair in a["intervals"] for x in pair] + a["paired_means"]
    flat_b = [x for pair in b["intervals"] for x in pair] + b["paired_means"]
    return all(abs(x - y) <= tol for x, y in zip(flat_a, flat_b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-to", default="", help="a git commit to time side by side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/bootstrap.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    sides: dict[str, Path] = {"ours": REPO}
    with tempfile.TemporaryDirectory() as tmp:
        if args.compare_to:
            reference = Path(tmp) / "reference"
            add = ["worktree", "add", "--detach", str(reference), args.compare_to]
            subprocess.run(
                ["git", "-C", str(REPO), *add],
                check=True,
                capture_output=True,
            )
            sides["reference"] = reference
            measure(reference)  # compiles its kernels into its own numba cache, untimed
        try:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
            for r in range(args.repeats):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for name in order:
                    runs[name].append(measure(sides[name]))
                    last = runs[name][-1]
                    print(
                        f"  repeat {r}: {name}: score_held_out "
                        f"{last['score_held_out_seconds']:.2f} s, bootstrap_lds "
                        f"{last['bootstrap_lds_seconds']:.2f} s",
                        flush=True,
                    )
        finally:
            if args.compare_to:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(reference)],
                    check=False,
                    capture_output=True,
                )
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        summary[name] = {
            key: statistics.median(run[key] for run in rs)
            for key in ("score_held_out_seconds", "bootstrap_lds_seconds")
        }
        summary[name]["all"] = rs
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "problem": {"masks": 125, "seeds": 4, "targets": 797, "resamples": 1000},
        "compare_to": args.compare_to or None,
        "results": summary,
    }
    if "reference" in summary:
        ours, ref = summary["ours"], summary["reference"]
        report["ratios"] = {
            key: ref[key] / ours[key] for key in ("score_held_out_seconds", "bootstrap_lds_seconds")
        }
        report["same_results"] = same_results(runs["ours"][0], runs["reference"][0])
        print(
            f"reference / ours: {json.dumps(report['ratios'])}; same results: "
            f"{report['same_results']}"
        )
    for name, s in summary.items():
        print(
            f"{name}: score_held_out {s['score_held_out_seconds']:.2f} s, bootstrap_lds (2 "
            f"predictors) {s['bootstrap_lds_seconds']:.2f} s (median of {args.repeats})"
        )
    print(f"wrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
