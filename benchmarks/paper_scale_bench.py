"""Benchmark: the datamodels regression at the paper's CIFAR-10 shape on one GPU, measured in
parts and projected to the whole.

Run from the repository root (``benchmarks/gpu_check.sh`` runs it on a GPU machine)::

    python benchmarks/paper_scale_bench.py [--device cuda] [--out PATH] [--tiny]
        [--budget-seconds 240] [--path-targets 256] [--stats-rows 65536]

The shape: 280,000 fitting + 10,000 validation models (``experiments/cifar10.yaml``), masks
over 50,000 training examples (inclusion probability 0.5), 10,000 targets, ``k = 100``
lambdas per target down to ``eps = 1e-2`` (the experiment's ``cfg``). Rows come from
:class:`~dm_assets.regression.device_masks.SeededMasks`: masks hashed on the device from a
seed, targets from planted sparse weights (20 per target, half the variance) plus noise, so
nothing is read from disk. ``--tiny`` is the same code at a CPU's size (3,000 models, 96
examples, 40 targets, k = 20): what the tests run.

Parts, in this order; the JSON is rewritten after each, so a run stopped at its time limit
keeps what it measured, and a part that would start after ``--budget-seconds`` is skipped and
says so:

1. ``stats``: the sufficient statistics of ``--stats-rows`` models at the full ``p`` and ``t``,
   two ways side by side on the same rows: ``accumulate_mask_stats`` (``X^T X`` as int8
   products with int32 sums, exact) and the product's ``accumulate_stats`` (float32 products,
   float64 sums; also exact for 0/1 masks), each at its batch size of 8,192 rows (4,096 on the
   CPU). Reported: seconds of each and their ratio, the ``X^T X`` product alone both ways on
   one batch (what the tensor cores change), whether the two ``X^T X`` agree bit for bit, and
   each projected to 290,000 models (seconds per row times rows: the pass is linear in rows).
2. ``gemm``: the FISTA step's product ``G @ W`` (``p x p`` times ``p x t``) in float64,
   float32, TF32 and bfloat16, at ``t = --path-targets`` and at the full ``t``: seconds (median
   of 3 after 2 warm-ups) and TFLOP/s. Only float64 is what ``fit_gram`` runs today (its CUDA
   default); the others say what a lower-precision solver could gain, not what it would cost
   in iterations.
3. ``path``: ``fit_gram`` (``device=cuda``, float64, refit on train + validation) on all
   290,000 models at the full ``p``, for ``--path-targets`` targets: seconds of its statistics
   and of its path, FISTA iterations, each target's chosen lambda and nonzeros, and how well
   the planted weights came back (the share of each target's 20 planted examples among its 20
   largest weights; the correlation of the weights with the planted ones). On a CUDA
   out-of-memory error the part is retried at 35,000 examples and projected by ``p^2``.
4. ``projection``: the whole regression's seconds = the int8 statistics' rate times 290,000
   models + the path's seconds times ``gemm(float64, full t) / gemm(float64, path targets)``
   (the path is a sequence of such products; the overheads that do not grow with ``t``, such as
   the Lipschitz estimate, are scaled too, so the projection errs long). With float32
   statistics too, for comparison.

The machine (platform, CPUs, torch, CUDA device and driver), the load average before and
after, and every setting are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from dm_assets.regression.bit_stats import int8_gram  # noqa: E402  (the repository on sys.path)
from dm_assets.regression.device_masks import (  # noqa: E402
    SeededMasks,
    accumulate_mask_stats,
)
from dm_assets.regression.gram import fit_gram  # noqa: E402
from dm_assets.regression.stats import accumulate_stats  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """A regression's size and the parts of it that are measured."""

    n_train: int
    n_val: int
    p: int
    t: int
    k: int
    eps: float
    support: int
    stats_rows: int
    stats_batch: int
    path_targets: int
    fallback_p: int


PAPER = Shape(
    n_train=280_000,
    n_val=10_000,
    p=50_000,
    t=10_000,
    k=100,
    eps=1e-2,
    support=20,
    stats_rows=65_536,
    stats_batch=8_192,
    path_targets=256,
    fallback_p=35_000,
)
TINY = Shape(
    n_train=2_400,
    n_val=600,
    p=96,
    t=40,
    k=20,
    eps=1e-2,
    support=4,
    stats_rows=1_024,
    stats_batch=256,
    path_targets=8,
    fallback_p=64,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(on: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of ``fn(*args, **kwargs)``, the queue of the device ``on``
    drained before and after."""
    sync(on)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(on)
    return time.perf_counter() - start, out


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["driver"] = f"unknown ({exc})"
    return info


def stats_part(shape: Shape, device: torch.device) -> dict[str, Any]:
    """Part 1: int8 against float32 statistics, side by side on the same rows."""
    source = SeededMasks(shape.n_train + shape.n_val, shape.p, shape.t, support=shape.support)
    rows = np.arange(shape.stats_rows)
    batch = shape.stats_batch if device.type == "cuda" else min(shape.stats_batch, 4_096)
    source.planted_weights(device)  # made once per device: not part of either pass
    x = source.masks(np.arange(batch), device=device)
    mask_seconds, _ = timed(device, source.masks, np.arange(batch), device=device)
    xt = x.T
    timed(device, int8_gram, x)  # warm-up: cuBLAS picks its kernels
    timed(device, torch.mm, xt, x)
    int8_gram_s, g8 = timed(device, int8_gram, x)
    fp32_gram_s, g32 = timed(device, torch.mm, xt, x)
    gram_equal = bool(torch.equal(g8.to(torch.float64), g32.to(torch.float64)))
    del x, xt, g8, g32
    int8_s, ours = timed(
        device, accumulate_mask_stats, source, rows, batch_size=batch, device=device
    )
    ours_xtx, ours_xty = ours.xtx.cpu(), ours.xty.cpu()
    del ours
    fp32_s, ref = timed(device, accumulate_stats, source, rows, batch_size=batch, device=device)
    xtx_equal = bool(torch.equal(ours_xtx, ref.xtx.cpu()))
    xty_rel = float((ours_xty - ref.xty.cpu()).abs().max() / ref.xty.abs().max().clamp_min(1e-30))
    del ref
    full_rows = shape.n_train + shape.n_val
    return {
        "rows": shape.stats_rows,
        "batch_size": batch,
        "p": shape.p,
        "t": shape.t,
        "mask_seconds_per_batch": mask_seconds,
        "int8_seconds": int8_s,
        "fp32_seconds": fp32_s,
        "time_ratio_fp32_over_int8": fp32_s / int8_s,
        "gram_product_int8_seconds": int8_gram_s,
        "gram_product_fp32_seconds": fp32_gram_s,
        "gram_product_ratio_fp32_over_int8": fp32_gram_s / int8_gram_s,
        "gram_product_int8_tops": 2 * batch * shape.p**2 / int8_gram_s / 1e12,
        "gram_product_equal": gram_equal,
        "xtx_equal": xtx_equal,
        "xty_max_relative_difference": xty_rel,
        "projected_int8_seconds": int8_s / shape.stats_rows * full_rows,
        "projected_fp32_seconds": fp32_s / shape.stats_rows * full_rows,
    }


def gemm_part(shape: Shape, device: torch.device) -> dict[str, Any]:
    """Part 2: ``G @ W`` at the path's width and the full width, per precision."""
    out: dict[str, Any] = {}
    kinds: list[tuple[str, torch.dtype, bool]] = [("float64", torch.float64, False)]
    if device.type == "cuda":
        kinds += [
            ("float32", torch.float32, False),
            ("tf32", torch.float32, True),
            ("bfloat16", torch.bfloat16, False),
        ]
    else:
        kinds += [("float32", torch.float32, False)]
    generator = torch.Generator(device=device).manual_seed(0)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in kinds:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            gram = torch.randn(shape.p, shape.p, device=device, generator=generator).to(dtype)
            for width in (shape.path_targets, shape.t):
                w = torch.randn(shape.p, width, device=device, generator=generator).to(dtype)
                for _ in range(2):
                    timed(device, torch.mm, gram, w)
                runs = [timed(device, torch.mm, gram, w)[0] for _ in range(3)]
                seconds = statistics.median(runs)
                out[f"{name}_t{width}"] = {
                    "seconds": seconds,
                    "tflops": 2 * shape.p**2 * width / seconds / 1e12,
                }
                del w
            del gram
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    return out


def path_part(shape: Shape, device: torch.device) -> dict[str, Any]:
    """Part 3: ``fit_gram`` on every model at the full ``p``, for ``path_targets`` targets."""
    attempts: list[dict[str, Any]] = []
    for p in (shape.p, shape.fallback_p):
        source = SeededMasks(
            shape.n_train + shape.n_val, p, shape.path_targets, support=shape.support
        )
        train = np.arange(shape.n_train)
        val = np.arange(shape.n_train, shape.n_train + shape.n_val)
        try:
            seconds, res = timed(
                device,
                fit_gram,
                source,
                train,
                val,
                k=shape.k,
                eps=shape.eps,
                batch_size=shape.stats_batch,
                device=device,
                engine="fista",  # what runs on CUDA; on the CPU too, so the twin is the same
                dtype=torch.float64,
            )
        except torch.OutOfMemoryError as exc:
            attempts.append({"p": p, "error": f"out of memory: {str(exc).splitlines()[0]}"})
            torch.cuda.empty_cache()
            continue
        planted = source.planted_weights("cpu")
        overlap = []
        for j in range(shape.path_targets):
            top = set(res.weight[:, j].abs().topk(shape.support).indices.tolist())
            overlap.append(len(top & set(torch.nonzero(planted[:, j])[:, 0].tolist())))
        corr = np.corrcoef(res.weight.numpy().ravel(), planted.numpy().ravel())[0, 1]
        steps = (~res.val_mse.isnan()).sum(1).double()
        nonzeros = res.nonzeros.gather(1, res.best_step[:, None])[:, 0].double()
        attempts.append(
            {
                "p": p,
                "targets": shape.path_targets,
                "seconds": seconds,
                "stats_seconds": res.info["stats_seconds"],
                "path_seconds": seconds - res.info["stats_seconds"],
                "iterations": res.info["iterations"],
                "lambdas_walked_mean": float(steps.mean()),
                "best_step_mean": float(res.best_step.double().mean()),
                "nonzeros_at_chosen_lambda_mean": float(nonzeros.mean()),
                "planted_support_recovered": float(np.mean(overlap)) / shape.support,
                "weight_correlation_with_planted": float(corr),
            }
        )
        break
    return {"attempts": attempts}


def projection(shape: Shape, results: dict[str, Any]) -> dict[str, Any]:
    """Part 4: the whole regression's seconds from the measured parts (module doc)."""
    stats, gemm, path = results["stats"], results["gemm"], results["path"]["attempts"][-1]
    if "error" in path:
        return {"error": "no path was measured: " + path["error"]}
    per_t = (
        gemm[f"float64_t{shape.t}"]["seconds"] / gemm[f"float64_t{shape.path_targets}"]["seconds"]
    )
    p_factor = (shape.p / path["p"]) ** 2
    path_seconds = path["path_seconds"] * per_t * p_factor
    return {
        "path_scale_factor": per_t * p_factor,
        "path_seconds": path_seconds,
        "stats_int8_seconds": stats["projected_int8_seconds"],
        "stats_fp32_seconds": stats["projected_fp32_seconds"],
        "total_seconds_int8_stats": stats["projected_int8_seconds"] + path_seconds,
        "total_seconds_fp32_stats": stats["projected_fp32_seconds"] + path_seconds,
        "measured_at_full_p": path["p"] == shape.p,
    }


def write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized run of the same code")
    parser.add_argument("--out", default=None, help="the JSON (default benchmarks/results/...)")
    parser.add_argument("--budget-seconds", type=float, default=240.0)
    parser.add_argument("--path-targets", type=int, default=None)
    parser.add_argument("--stats-rows", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = TINY if args.tiny else PAPER
    if args.path_targets:
        shape = replace(shape, path_targets=args.path_targets)
    if args.stats_rows:
        shape = replace(shape, stats_rows=args.stats_rows)
    name = "paper_scale_tiny.json" if args.tiny else f"paper_scale_{device.type}.json"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {**machine(device), "load_before": os.getloadavg()},
        "shape": asdict(shape),
        "budget_seconds": args.budget_seconds,
        "skipped": [],
    }
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("stats", lambda: stats_part(shape, device)),
        ("gemm", lambda: gemm_part(shape, device)),
        ("path", lambda: path_part(shape, device)),
    ]
    for key, run in parts:
        if time.perf_counter() - started > args.budget_seconds:
            report["skipped"].append(key)
            continue
        t = time.perf_counter()
        report[key] = run()
        report[key]["part_seconds"] = time.perf_counter() - t
        report["machine"]["load_after"] = os.getloadavg()
        write(out, report)
        print(f"{key}: {report[key]['part_seconds']:.1f} s", flush=True)
    if not report["skipped"]:
        report["projection"] = projection(shape, report)
    report["seconds"] = time.perf_counter() - started
    report["machine"]["load_after"] = os.getloadavg()
    write(out, report)
    print(json.dumps({k: report.get(k) for k in ("projection", "skipped", "seconds")}, indent=1))
    problems = [
        f"{what} is not exact"
        for what, ok in (
            ("the int8 X^T X of one batch", report.get("stats", {}).get("gram_product_equal")),
            ("the int8 statistics' X^T X", report.get("stats", {}).get("xtx_equal")),
        )
        if ok is False
    ]
    if "error" in report.get("projection", {}):
        problems.append(report["projection"]["error"])
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems or report["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
