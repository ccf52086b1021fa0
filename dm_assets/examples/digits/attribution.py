"""The digits experiments' attribution task (:class:`~dm_assets.attribution.AttributionTask`),
for the baselines of ``<name>/attributions`` (:mod:`dm_assets.attribution`).

The pipeline finds :func:`attribution_task` here as the sibling ``attribution`` module of the
trainer ``dm_assets.examples.digits.train_digits`` and calls it with the experiment's
``trainer.args`` (the ``digits.*`` keys; :func:`settings_from_args`). The task is exactly the
store's models' training (:func:`~dm_assets.examples.digits.train_digits.train_classifier`):

- training examples: the 1,000 training images ``(1000, 64)`` and labels, row ``i`` = mask
  entry ``i``; targets: the 797 target images and labels, row ``j`` = margins column ``j``;
- ``train(mask, seed)``: ``train_classifier`` on ``mask`` with the experiment's settings, the
  initialization seed being the experiment's shared ``init_seed`` when it has one (every model
  of the experiment starts there) and otherwise derived from ``seed``, the minibatch-order seed
  derived from ``seed``; the classifier's ``(W, b)`` layers become an ``nn.Sequential`` of
  ``nn.Linear`` (weight ``W^T``) and ``nn.ReLU``;
- ``loss``: mean cross-entropy; ``l2``: ``digits.weight_decay`` (the penalty is
  ``(weight_decay / 2) * sum W^2`` on the weight matrices; the influence function's damping
  applies it to the biases too);
- ``output``: the correct-class margin ``z_y - logsumexp_{k != y} z_k``, what the store holds;
- ``checkpoints(seed, n)``: the models after ``ceil(k * E / n)`` epochs (``k = 1 .. n``) of
  the full-set run of ``seed`` (``E = digits.epochs``; full-batch training: steps instead),
  each retrained from the start: training is deterministic, so a run cut after ``e`` epochs is
  that prefix of the longer run; learning rate ``digits.lr`` (Adam's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from dm_assets.attribution.task import AttributionTask
from dm_assets.examples.digits.data import load_split
from dm_assets.examples.digits.train_digits import (
    Classifier,
    DigitsSettings,
    correct_class_margins,
    train_classifier,
)

SECTION = "digits"
# the random streams of the baselines' full-set models, apart from the store models' streams
_ATTRIBUTION_STREAM = 97
_INIT, _ORDER = 1, 2


def settings_from_args(args: Mapping[str, Any]) -> DigitsSettings:
    """:class:`DigitsSettings` from the trainer's pass-through arguments ``{"digits.model":
    "mlp", ...}`` (values typed, as a YAML mapping gives them, or strings, as a command line
    does; keys of other sections are ignored, defaults fill the rest)."""
    defaults = DigitsSettings()
    known = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(DigitsSettings)}
    values: dict[str, Any] = {}
    problems = []
    for key, value in args.items():
        section, _, name = str(key).lstrip("-").partition(".")
        if section != SECTION:
            continue
        if name not in known:
            problems.append(f"{key}: not a digits setting (known: {', '.join(sorted(known))})")
            continue
        kind = known[name]
        try:
            values[name] = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            problems.append(f"{key}={value!r}: expected a {kind.__name__}")
    if problems:
        raise ValueError("invalid digits arguments:\n" + "\n".join(f"  - {p}" for p in problems))
    return DigitsSettings(**values)


def as_module(classifier: Classifier) -> nn.Sequential:
    """The classifier as ``nn.Sequential(Linear, ReLU, Linear, ...)``, same logits."""
    layers: list[nn.Module] = []
    for i, (w, b) in enumerate(classifier.layers):
        if i:
            layers.append(nn.ReLU())
        linear = nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(w.T)
            linear.bias.copy_(b)
        layers.append(linear)
    return nn.Sequential(*layers)


def _seeds(settings: DigitsSettings, seed: int) -> tuple[int, int]:
    streams = [
        int(np.random.default_rng([_ATTRIBUTION_STREAM, seed, s]).integers(2**62))
        for s in (_INIT, _ORDER)
    ]
    init = settings.init_seed if settings.init_seed >= 0 else streams[0]
    return init, streams[1]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels)


def attribution_task(args: Mapping[str, Any] | DigitsSettings | None = None) -> AttributionTask:
    """The digits attribution task for the experiment's settings (``trainer.args`` as a mapping,
    or :class:`DigitsSettings`; default: the defaults). See the module docstring."""
    settings = args if isinstance(args, DigitsSettings) else settings_from_args(args or {})
    split = load_split()

    def train(mask: np.ndarray, seed: int) -> nn.Module:
        init, order = _seeds(settings, seed)
        return as_module(train_classifier(mask, settings, init_seed=init, order_seed=order))

    def checkpoints(seed: int, n: int) -> list[tuple[nn.Module, float]]:
        minibatch = settings.batch_size > 0
        total = settings.epochs if minibatch else settings.steps
        cuts = sorted({math.ceil(k * total / n) for k in range(1, n + 1)})
        mask = np.ones(len(split.train_labels), dtype=bool)
        init, order = _seeds(settings, seed)
        out: list[tuple[nn.Module, float]] = []
        for cut in cuts:
            if minibatch:
                shorter = dataclasses.replace(settings, epochs=cut)
            else:
                shorter = dataclasses.replace(settings, steps=cut)
            model = as_module(train_classifier(mask, shorter, init_seed=init, order_seed=order))
            out.append((model, settings.lr))
        return out

    return AttributionTask(
        train_inputs=torch.tensor(split.train_images),
        train_labels=torch.tensor(split.train_labels),
        target_inputs=torch.tensor(split.target_images),
        target_labels=torch.tensor(split.target_labels),
        train=train,
        loss=_cross_entropy,
        output=correct_class_margins,
        l2=settings.weight_decay,
        checkpoints=checkpoints,
        description=f"digits {settings.model}"
        + (f" ({settings.hidden} hidden)" if settings.model == "mlp" else ""),
    )
