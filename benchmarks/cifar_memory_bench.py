"""Benchmark: seconds per CIFAR-10 model of the example's own training code, with the images
held on the GPU instead of read through FFCV.

Run from the repository root (``benchmarks/gpu_check.sh`` runs it where FFCV is missing)::

    python benchmarks/cifar_memory_bench.py [--models 3] [--precision fp16] [--epochs 24]
        [--out PATH] [--tiny]

``python -m dm_assets.examples.cifar10.gpu_check`` is the measurement of record: the whole
pipeline, FFCV's decoding included. It needs FFCV, which builds against OpenCV and
libturbojpeg and so is missing on a bare GPU machine. This benchmark times the rest of the
same code: :func:`dm_assets.examples.cifar10.train.train_model` itself (the seed's recipe:
ResNet-9, 24 epochs, batch 512, mixed precision, flip/translate/cutout on the device,
evaluation with the mirrored image), with its ``image_beton`` swapped for
:class:`DeviceImages`, which serves the same batches from uint8 arrays already on the device
(the images are those of ``make_fake_cifar``: generated, CIFAR-10's shape, 50,000 + 10,000).
So the seconds per model are a floor for the pipeline's: FFCV decodes raw 32 x 32 images in
CPU threads ahead of the GPU, which the real run may or may not keep up with.

It prints, and writes as JSON, each model's seconds (the first includes cuDNN's autotuning),
the steady seconds per model (the median of the others), test accuracy on the generated data,
and the GPU-hours for 300,000 models. Exit status 1 when a model's accuracy is under 0.5 (not
with ``--tiny``) or its margins are not finite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from dm_assets.examples.cifar10 import train as train_module  # noqa: E402
from dm_assets.examples.cifar10.convert import (  # noqa: E402
    CifarSplit,
    make_fake_cifar,
    read_cifar_python,
)
from dm_assets.examples.cifar10.gpu_check import (  # noqa: E402
    MIN_ACCURACY,
    PAPER_NUM_MODELS,
    full_scale,
    tiny_scale,
)


class DeviceImages:
    """A split's images uint8 ``(n, 32, 32, 3)`` and labels int64 ``(n,)`` on one device,
    served as :class:`~dm_assets.examples.cifar10.data.ImageBeton` serves them: ``n_rows``,
    ``batch_size``, ``labels``, and ``batches(order, device=, drop_last=)``."""

    def __init__(self, split: CifarSplit, *, batch_size: int, device: torch.device) -> None:
        self.images = torch.from_numpy(split.images).to(device)
        self.gpu_labels = torch.from_numpy(split.labels).to(device)
        self.labels = split.labels
        self.n_rows = len(split)
        self.batch_size = batch_size

    def batches(
        self, order: np.ndarray, *, device: torch.device, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rows ``order`` in batches of ``batch_size``, as ``(images, labels)`` copies."""
        order = np.asarray(order, dtype=np.int64)
        if drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        index = torch.from_numpy(order).to(self.images.device)
        for start in range(0, len(order), self.batch_size):
            rows = index[start : start + self.batch_size]
            yield self.images[rows].to(device), self.gpu_labels[rows].to(device)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    scale = tiny_scale() if args.tiny else full_scale(args.precision, args.epochs)
    device = train_module.pick_device()
    make_fake_cifar(work, scale.n_train, scale.n_test, seed=0)
    train_split, test_split = read_cifar_python(work)
    size = scale.settings.batch_size
    splits = {
        "train": DeviceImages(train_split, batch_size=size, device=device),
        "val": DeviceImages(test_split, batch_size=size, device=device),
    }
    original = train_module.image_beton

    def from_memory(path: str | os.PathLike[str], **_: Any) -> DeviceImages:
        return splits[str(path)]

    seconds, accuracies, problems = [], [], []
    train_module.image_beton = from_memory  # type: ignore[assignment]
    try:
        for index in range(args.models):
            started = time.perf_counter()
            result = train_module.train_model(
                index, train_path="train", val_path="val", settings=scale.settings, device=device
            )
            seconds.append(time.perf_counter() - started)
            accuracies.append(result.accuracy)
            if not np.isfinite(result.margins).all():
                problems.append(f"model {index}: non-finite margins")
            if not args.tiny and result.accuracy < MIN_ACCURACY:
                problems.append(f"model {index}: test accuracy {result.accuracy:.3f} < 0.5")
    finally:
        train_module.image_beton = original
    steady = seconds[1:] or seconds
    per_model = statistics.median(steady)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "loader": "DeviceImages (arrays on the device; no FFCV)",
        "tiny": args.tiny,
        "n_train": scale.n_train,
        "n_test": scale.n_test,
        "settings": asdict(scale.settings),
        "model_seconds": seconds,
        "seconds_per_model": per_model,
        "test_accuracy": accuracies,
        "gpu_hours_for_300k_models": per_model * PAPER_NUM_MODELS / 3600,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized run of the same code")
    parser.add_argument("--out", default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cifar_memory_") as tmp:
        report = run(args, Path(tmp))
    report["machine"].update(load_before=load_before, load_after=os.getloadavg())
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    for problem in report["problems"]:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
