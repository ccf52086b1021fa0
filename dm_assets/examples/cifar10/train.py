"""Train one ResNet-9 on a subset of CIFAR-10 and measure its correct-class margins: the science
of the CIFAR-10 example, with every setting an argument (``train_cifar.py`` reads them from the
command line).

Model ``index`` trains on the training rows its mask selects (:func:`make_mask`: exactly
``round(alpha * n_train)`` rows, drawn from ``(mask_seed, i)`` with ``i`` the model's mask index,
:func:`mask_index`: ``index`` itself except for replicates, below; so a rerun of the index
trains on the same rows), for ``epochs`` passes, each in its own shuffled order, with:

- SGD (momentum, Nesterov by default, weight decay on every parameter) and the seed's
  triangular learning-rate schedule, per step: 0 at the start, ``lr`` at ``lr_peak_epoch``, 0
  at the end (:func:`lr_multipliers`);
- cross-entropy with label smoothing;
- per batch, on the device: normalization, random flip, translation by up to 2 pixels and a
  4 x 4 cutout (:mod:`augment`);
- on CUDA, mixed precision (autocast to float16 with a gradient scaler, or bfloat16) and
  channels-last layout; on the CPU plain float32.

It then reports, on every test row in order, the correct-class margin (:func:`class_margins`)
of the logits averaged over the image and its mirror (``tta``).

The initial weights, the batch orders and the augmentations each come from their own seed,
derived from ``(settings.seed, index, stream)``: every model, replicates included, has its own.

**Replicates** (held-out masks trained several times, for the noise ceiling and the
mean-of-seeds ground truth): with ``repeat_start >= 0``, models ``index >= repeat_start`` come
in consecutive groups of ``repeats`` (``[repeat_start, repeat_start + repeats)``, the next
``repeats``, ...) that share the mask of the group's first index; everything else (weights,
orders, augmentations) still follows the model's own ``index``, so the replicates of a mask
differ only by training noise.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from dm_assets.examples.cifar10.augment import augment, normalize
from dm_assets.examples.cifar10.convert import NUM_CLASSES
from dm_assets.examples.cifar10.data import ImageBeton, image_beton
from dm_assets.examples.cifar10.model import DEFAULT_LOGIT_SCALE, DEFAULT_WIDTH, resnet9

logger = logging.getLogger(__name__)

DEVICE_ENV = "DM_DEVICE"
Precision = Literal["fp16", "bf16", "fp32"]
MarginKind = Literal["logsumexp", "max"]


@dataclass(frozen=True)
class TrainingSettings:
    """How one model trains; the defaults are the seed's (FFCV's CIFAR-10 recipe)."""

    lr: float = 0.5
    epochs: int = 24
    lr_peak_epoch: float = 5.0
    batch_size: int = 512
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    nesterov: bool = True
    tta: bool = True
    precision: Precision = "fp16"
    """autocast dtype on CUDA (``fp16`` with a gradient scaler, ``bf16``, or ``fp32``: none);
    the CPU always computes in float32."""
    translate: int = 2
    cutout: int = 4
    logit_scale: float = DEFAULT_LOGIT_SCALE
    width: int = DEFAULT_WIDTH
    """the network's first-layer channels (64: ResNet-9; smaller trains faster, for tests)"""
    margin: MarginKind = "logsumexp"
    """``logsumexp``: correct logit minus the logsumexp of the others (the log-odds of the
    correct class); ``max``: minus the largest other logit (the seed's script)."""
    seed: int = 0
    """with the model index, seeds the initialization, the batch order and the augmentations."""

    def problems(self) -> list[str]:
        """Every setting out of range, each with the value received."""
        out = []
        for name in ("lr", "epochs", "batch_size", "width"):
            if not getattr(self, name) > 0:
                out.append(f"training.{name}={getattr(self, name)!r} must be positive")
        if not 0 < self.lr_peak_epoch < self.epochs:
            out.append(
                f"training.lr_peak_epoch={self.lr_peak_epoch!r} must lie strictly between 0 and "
                f"training.epochs={self.epochs} (it may be fractional, e.g. 0.5 for one epoch)"
            )
        for name in ("momentum", "weight_decay", "translate", "cutout"):
            if getattr(self, name) < 0:
                out.append(f"training.{name}={getattr(self, name)!r} must be 0 or more")
        if not 0 <= self.label_smoothing < 1:
            out.append(f"training.label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if self.cutout > 32:
            out.append(f"training.cutout={self.cutout} must be at most the image size, 32")
        if self.precision not in ("fp16", "bf16", "fp32"):
            out.append(f"training.precision={self.precision!r}: choose fp16, bf16 or fp32")
        if self.margin not in ("logsumexp", "max"):
            out.append(f"training.margin={self.margin!r}: choose logsumexp or max")
        return out


def mask_index(index: int, *, repeat_start: int = -1, repeats: int = 2) -> int:
    """The index whose mask model ``index`` uses: ``index`` itself, or, for a replicate
    (``repeat_start >= 0`` and ``index >= repeat_start``), the first index of its group of
    ``repeats``."""
    if repeats < 1:
        raise ValueError(f"mask.repeats={repeats}: a replicate group has at least 1 model")
    if repeat_start < 0 or index < repeat_start:
        return index
    return repeat_start + (index - repeat_start) // repeats * repeats


def make_mask(index: int, n_train: int, alpha: float, seed: int = 0) -> np.ndarray:
    """Model ``index``'s training subset: bool ``(n_train,)`` with exactly
    ``round(alpha * n_train)`` True entries, uniformly chosen, the same for the same arguments."""
    if not 0 < alpha <= 1:
        raise ValueError(f"mask.alpha={alpha!r} must be in (0, 1]: the fraction of rows kept")
    if index < 0:
        raise ValueError(f"index={index} must be 0 or more")
    rng = np.random.default_rng([seed, index])
    mask = np.zeros(n_train, dtype=bool)
    mask[rng.choice(n_train, size=round(alpha * n_train), replace=False)] = True
    return mask


def lr_multipliers(epochs: int, peak_epoch: float, steps_per_epoch: int) -> np.ndarray:
    """The learning rate at each optimizer step, as a fraction of the peak: float64
    ``(epochs * steps_per_epoch + 1,)``, rising linearly from 0 to 1 at ``peak_epoch`` and
    falling linearly back to 0 at the end (the seed's schedule)."""
    total = epochs * steps_per_epoch
    steps = np.arange(total + 1)
    return np.interp(steps, [0, peak_epoch * steps_per_epoch, total], [0.0, 1.0, 0.0])


def class_margins(
    logits: torch.Tensor, labels: torch.Tensor, kind: MarginKind = "logsumexp"
) -> torch.Tensor:
    """Correct-class margins: float32 ``(b,)`` from ``logits`` ``(b, classes)`` and ``labels``
    int ``(b,)``: the correct class's logit minus ``logsumexp`` of the other logits (``kind``
    ``"logsumexp"``, the log-odds of the correct class under softmax) or minus the largest
    other logit (``"max"``)."""
    logits = logits.float()
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    rest = torch.logsumexp(others, 1) if kind == "logsumexp" else others.amax(1)
    return correct - rest


def pick_device(environ: Mapping[str, str] | None = None) -> torch.device:
    """``$DM_DEVICE`` (``cuda``, ``cuda:N`` or ``cpu``; the launcher sets it, with
    ``CUDA_VISIBLE_DEVICES`` showing the one GPU it leased) when set, else CUDA when
    available, else the CPU."""
    environ = os.environ if environ is None else environ
    wanted = environ.get(DEVICE_ENV, "").strip()
    if not wanted:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError as exc:
        raise ValueError(f"${DEVICE_ENV}={wanted!r}: use cuda, cuda:N or cpu") from exc
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"${DEVICE_ENV}={wanted!r}: use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"${DEVICE_ENV}={wanted!r} but torch sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{environ.get('CUDA_VISIBLE_DEVICES')!r}); set {DEVICE_ENV}=cpu or fix the GPU"
        )
    return device


@dataclass(frozen=True)
class ModelResult:
    """One trained model: ``mask`` bool ``(n_train,)``, ``margins`` float32 ``(n_val,)``, its
    test ``accuracy`` (with ``tta``), the mean training loss of its last epoch, and seconds
    spent training and evaluating."""

    mask: np.ndarray
    margins: np.ndarray
    accuracy: float
    last_epoch_loss: float
    train_seconds: float
    eval_seconds: float


def _autocast(device: torch.device, precision: Precision) -> torch.autocast:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    enabled = device.type == "cuda" and dtype is not None
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _seed(index: int, seed: int, stream: int) -> int:
    """A 63-bit seed for one random stream of model ``index``."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0] >> 1)


def train_model(
    index: int,
    *,
    train_path: str | os.PathLike[str],
    val_path: str | os.PathLike[str],
    settings: TrainingSettings = TrainingSettings(),
    alpha: float = 0.5,
    mask_seed: int = 0,
    repeat_start: int = -1,
    repeats: int = 2,
    num_workers: int = 4,
    device: torch.device | None = None,
) -> ModelResult:
    """Train model ``index`` on its mask's rows of ``train_path`` and measure its margins on
    every row of ``val_path`` (both written by :mod:`convert`; their sizes set the mask's and
    the margins' lengths). ``repeat_start`` and ``repeats``: replicate groups sharing a mask
    (module docstring; ``repeat_start = -1``: none). Raises ``ValueError`` naming every bad
    setting."""
    problems = settings.problems()
    if not 0 < alpha <= 1:
        problems.append(f"mask.alpha={alpha!r} must be in (0, 1]")
    if repeat_start < -1:
        problems.append(
            f"mask.repeat_start={repeat_start}: use -1 (no replicates) or the first replicated "
            "model index"
        )
    if repeats < 1:
        problems.append(f"mask.repeats={repeats}: a replicate group has at least 1 model")
    if problems:
        raise ValueError("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))
    device = pick_device() if device is None else device
    if device.type == "cuda" and device.index is None:
        # an explicit index: the augmentations' generator must match the tensors' device
        device = torch.device("cuda", torch.cuda.current_device())
    train = image_beton(train_path, batch_size=settings.batch_size, num_workers=num_workers)
    val = image_beton(val_path, batch_size=settings.batch_size, num_workers=num_workers)
    first = mask_index(index, repeat_start=repeat_start, repeats=repeats)
    mask = make_mask(first, train.n_rows, alpha, mask_seed)
    rows = np.flatnonzero(mask)
    steps_per_epoch = len(rows) // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"training.batch_size={settings.batch_size} is more than the {len(rows)} rows model "
            f"{index} trains on ({alpha} of {train.n_rows}); use a smaller batch size"
        )
    torch.manual_seed(_seed(index, settings.seed, 0))  # the initial weights
    generator = torch.Generator(device=device)
    generator.manual_seed(_seed(index, settings.seed, 1))
    model = resnet9(NUM_CLASSES, settings.logit_scale, settings.width).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    started = time.perf_counter()
    loss = _fit(model, train, rows, settings, device, generator, _seed(index, settings.seed, 2))
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    margins, accuracy = evaluate(model, val, settings, device)
    eval_seconds = time.perf_counter() - started
    logger.info(
        "model %d on %s: %d rows, %d epochs in %.1f s (last epoch loss %.3f); test accuracy "
        "%.4f, mean margin %.3f (%.1f s)",
        index,
        device,
        len(rows),
        settings.epochs,
        train_seconds,
        loss,
        accuracy,
        float(margins.mean()),
        eval_seconds,
    )
    return ModelResult(mask, margins, accuracy, loss, train_seconds, eval_seconds)


def _fit(
    model: nn.Module,
    train: ImageBeton,
    rows: np.ndarray,
    s: TrainingSettings,
    device: torch.device,
    generator: torch.Generator,
    order_seed: int,
) -> float:
    """Train ``model`` in place on ``rows``; the mean loss of the last epoch."""
    steps_per_epoch = len(rows) // s.batch_size
    schedule = lr_multipliers(s.epochs, s.lr_peak_epoch, steps_per_epoch)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=s.lr,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
        nesterov=s.nesterov and s.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.__getitem__)
    use_scaler = device.type == "cuda" and s.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)
    order_rng = np.random.default_rng(order_seed)
    model.train()
    total = torch.zeros((), device=device)
    for _ in range(s.epochs):
        total.zero_()
        order = order_rng.permutation(rows)
        for images, labels in train.batches(order, device=device, drop_last=True):
            x = augment(
                normalize(images),
                translate=s.translate,
                cutout_size=s.cutout,
                generator=generator,
            )
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, s.precision):
                loss = loss_fn(model(x), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += loss.detach().float()
    last = float(total) / steps_per_epoch
    if not math.isfinite(last):
        raise FloatingPointError(
            f"the training loss is {last} after {s.epochs} epochs; lower training.lr (now "
            f"{s.lr}) or use training.precision=fp32"
        )
    return last


@torch.no_grad()
def evaluate(
    model: nn.Module, val: ImageBeton, s: TrainingSettings, device: torch.device
) -> tuple[np.ndarray, float]:
    """``(margins, accuracy)`` of ``model`` on every row of ``val`` in order: margins float32
    ``(n_val,)`` (:func:`class_margins` of the logits, averaged with the mirrored image's when
    ``s.tta``), accuracy the fraction of rows whose largest logit is the label's."""
    model.eval()
    margins, correct = [], torch.zeros((), device=device, dtype=torch.int64)
    for images, labels in val.batches(np.arange(val.n_rows), device=device):
        x = normalize(images)
        with _autocast(device, s.precision):
            logits = model(x).float()
            if s.tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        margins.append(class_margins(logits, labels, s.margin))
        correct += (logits.argmax(1) == labels).sum()
    out = torch.cat(margins).cpu().numpy().astype(np.float32)
    return out, int(correct) / max(1, val.n_rows)


__all__ = [
    "ModelResult",
    "TrainingSettings",
    "class_margins",
    "evaluate",
    "lr_multipliers",
    "make_mask",
    "mask_index",
    "pick_device",
    "train_model",
]
