"""Time the CIFAR-10 example on this machine's GPU: a few real-size models on generated data of
CIFAR-10's shape, in this process and through the worker command line.

    python -m dm_assets.examples.cifar10.gpu_check [--models 3] [--worker-models 2]
        [--precision fp16] [--epochs 24] [--work-dir DIR] [--json PATH] [--tiny]

Steps: write 50,000 + 10,000 generated images in CIFAR-10's python format
(:func:`~dm_assets.examples.cifar10.convert.make_fake_cifar`: learnable classes), convert them
to ``train.beton`` / ``val.beton``, train ``--models`` ResNet-9 models in this process with the
seed's recipe (24 epochs, batch 512, mixed precision), then ``--worker-models`` more through
``python -m dm_assets.worker`` into a fresh store, as the pipeline runs them. It prints, and
writes as JSON with ``--json``, the seconds of each model (the first includes FFCV's pipeline
compilation and cuDNN's autotuning), the steady seconds per model (the median of the others),
test accuracy on the generated data, and the GPU-hours 300,000 models would take.

Exit status 1 when a check fails: a model's outputs with the wrong shapes or dtypes, non-finite
margins, a mask without ``alpha * n_train`` rows, or (not with ``--tiny``) a test accuracy
under 0.5 on data a working pipeline learns. ``--tiny`` runs the same code on the CPU in
seconds: 100 + 40 images, one epoch, an 8-channel network (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dm_assets.cli import configure_logging, make_parser
from dm_assets.examples.cifar10.convert import convert, make_fake_cifar
from dm_assets.examples.cifar10.train import TrainingSettings, pick_device, train_model

logger = logging.getLogger(__name__)

PAPER_NUM_MODELS = 300_000
MIN_ACCURACY = 0.5  # the generated classes are easy: a pipeline that learns gets near 1.0


@dataclass(frozen=True)
class Scale:
    """Data and training sizes of one check."""

    n_train: int
    n_test: int
    settings: TrainingSettings


def full_scale(precision: str = "fp16", epochs: int = 24) -> Scale:
    """CIFAR-10's sizes and the seed's recipe."""
    settings = replace(TrainingSettings(), precision=precision, epochs=epochs)  # type: ignore[arg-type]
    if settings.lr_peak_epoch >= epochs:
        settings = replace(settings, lr_peak_epoch=epochs / 5)
    return Scale(50_000, 10_000, settings)


def tiny_scale() -> Scale:
    """Seconds on a CPU: the same code on 100 + 40 images, one epoch, a narrow network."""
    settings = replace(
        TrainingSettings(), epochs=1, lr_peak_epoch=0.5, batch_size=10, width=8, lr=0.2
    )
    return Scale(100, 40, settings)


def _check_outputs(
    name: str, masks: np.ndarray, margins: np.ndarray, scale: Scale, alpha: float
) -> list[str]:
    problems = []
    if masks.dtype != np.bool_ or masks.shape != (scale.n_train,):
        problems.append(f"{name}: masks {masks.dtype} {masks.shape}, not bool ({scale.n_train},)")
    elif int(masks.sum()) != round(alpha * scale.n_train):
        problems.append(f"{name}: {int(masks.sum())} rows in the mask, not alpha * n_train")
    if margins.shape != (scale.n_test,):
        problems.append(f"{name}: margins shape {margins.shape}, not ({scale.n_test},)")
    if not np.isfinite(margins).all():
        problems.append(f"{name}: {int((~np.isfinite(margins)).sum())} non-finite margins")
    return problems


def _settings_args(s: TrainingSettings) -> list[str]:
    names = {"tta": "lr_tta"}
    return [
        f"--training.{names.get(k, k)}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in asdict(s).items()
    ]


def run_worker_models(
    work: Path, betons: dict[str, Path], scale: Scale, count: int, num_workers: int
) -> tuple[list[float], list[str]]:
    """Train models ``0 .. count-1`` through ``python -m dm_assets.worker`` into a fresh store;
    ``(seconds of each model, problems)``."""
    store = work / "store"
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "num_models": count,
                "schema": {
                    "masks": {"shape": [scale.n_train], "dtype": "bool_"},
                    "margins": {"shape": [scale.n_test], "dtype": "float16"},
                },
            }
        )
    )
    python = [sys.executable, "-m"]
    subprocess.run(
        [
            *python,
            "dm_assets.initialize_store",
            f"--logging.logdir={store}",
            f"--logging.spec={spec}",
        ],
        check=True,
    )
    report = work / "worker_report.json"
    proc = subprocess.run(
        [
            *python,
            "dm_assets.worker",
            f"--worker.indices=0-{count - 1}",
            "--worker.main_import=dm_assets.examples.cifar10.train_cifar",
            f"--worker.logdir={store}",
            f"--worker.report={report}",
            f"--data.train_dataset={betons['train']}",
            f"--data.val_dataset={betons['val']}",
            f"--data.num_workers={num_workers}",
            *_settings_args(scale.settings),
        ],
        check=False,
    )
    problems = [] if proc.returncode == 0 else [f"the worker exited {proc.returncode}"]
    if not report.exists():
        return [], [*problems, "the worker wrote no report"]
    outcomes = json.loads(report.read_text())["outcomes"]
    completed = np.load(store / "_completed.npy")
    masks = np.load(store / "masks.npy")
    margins = np.load(store / "margins.npy")
    for i in range(count):
        if not completed[i]:
            problems.append(f"worker model {i}: not completed")
            continue
        problems += _check_outputs(f"worker model {i}", masks[i], margins[i], scale, 0.5)
    return [float(o["seconds"]) for o in outcomes], problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(
        "python -m dm_assets.examples.cifar10.gpu_check",
        "Train a few CIFAR-10-sized ResNet-9 models on generated data; print seconds per model.",
    )
    parser.add_argument("--models", type=int, default=3, help="models trained in this process")
    parser.add_argument(
        "--worker-models", type=int, default=2, help="models trained through the worker CLI"
    )
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--num-workers", type=int, default=8, help="FFCV decoding threads")
    parser.add_argument("--work-dir", default=None, help="keep the data here (default: a tmp dir)")
    parser.add_argument("--json", default=None, help="also write the results here as JSON")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized run of the same code")
    args = parser.parse_args(argv)
    configure_logging()
    scale = tiny_scale() if args.tiny else full_scale(args.precision, args.epochs)
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="cifar10_gpu_check_") as tmp:
            return _run(args, scale, Path(tmp))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    return _run(args, scale, work)


def _run(args: argparse.Namespace, scale: Scale, work: Path) -> int:
    device = pick_device()
    started = time.perf_counter()
    make_fake_cifar(work / "cifar-10-batches-py", scale.n_train, scale.n_test, seed=0)
    betons = convert(
        work / "cifar-10-batches-py", work / "betons", num_workers=min(8, os.cpu_count() or 1)
    )
    data_seconds = time.perf_counter() - started
    problems: list[str] = []
    seconds, accuracies = [], []
    for index in range(args.models):
        started = time.perf_counter()
        result = train_model(
            index,
            train_path=betons["train"],
            val_path=betons["val"],
            settings=scale.settings,
            num_workers=args.num_workers,
            device=device,
        )
        seconds.append(time.perf_counter() - started)
        accuracies.append(result.accuracy)
        problems += _check_outputs(
            f"model {index}", result.mask, result.margins.astype(np.float16), scale, 0.5
        )
        if not args.tiny and result.accuracy < MIN_ACCURACY:
            problems.append(
                f"model {index}: test accuracy {result.accuracy:.3f} < {MIN_ACCURACY} on "
                "generated data a working pipeline learns"
            )
    worker_seconds: list[float] = []
    if args.worker_models > 0:
        worker_seconds, worker_problems = run_worker_models(
            work, betons, scale, args.worker_models, args.num_workers
        )
        problems += worker_problems
    steady = seconds[1:] or seconds
    per_model = statistics.median(steady) if steady else float("nan")
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host": platform.node(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "n_train": scale.n_train,
        "n_test": scale.n_test,
        "settings": asdict(scale.settings),
        "data_seconds": round(data_seconds, 2),
        "model_seconds": [round(s, 3) for s in seconds],
        "seconds_per_model": round(per_model, 3),
        "worker_model_seconds": [round(s, 3) for s in worker_seconds],
        "test_accuracy": [round(a, 4) for a in accuracies],
        "gpu_hours_for_300k_models": round(per_model * PAPER_NUM_MODELS / 3600, 1),
        "problems": problems,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
