"""The seed's CIFAR-10 training script: ``main(index, logdir)`` trains ResNet-9 model ``index`` on
its random half of CIFAR-10's training set and returns its margins on the test set.

Run by the worker (or the pipeline's trainer) with its arguments passed through::

    python -m dm_assets.worker --worker.index=0 --worker.logdir=STORE \\
        --worker.main_import=dm_assets.examples.cifar10.train_cifar \\
        --data.train_dataset=BETONS/train.beton --data.val_dataset=BETONS/val.beton

Returns ``{"masks": bool (n_train,), "margins": float16 (n_val,)}``: the training rows the
model saw and its correct-class margin on every test row, ``n_train`` and ``n_val`` being the
rows of the two datasets (50,000 and 10,000 for CIFAR-10, as in ``spec.json``).

Arguments (fastargs sections; ``--section.key=value``), defaults the seed's:

- ``data.train_dataset``, ``data.val_dataset``: the datasets written by
  ``python -m dm_assets.examples.cifar10.convert``; default
  ``$DM_HOME/cifar10/betons/train.beton`` and ``.../val.beton`` (``DM_HOME`` as the pipeline
  reads it when the model trains, ``.dm`` in the working directory by default).
- ``data.num_workers``: FFCV's decoding threads (4).
- ``training.lr`` (0.5), ``training.epochs`` (24), ``training.lr_peak_epoch`` (5),
  ``training.batch_size`` (512), ``training.momentum`` (0.9), ``training.weight_decay``
  (5e-4), ``training.label_smoothing`` (0.1), ``training.nesterov`` (true),
  ``training.lr_tta`` (true: average the logits of each test image and its mirror),
  ``training.precision`` (fp16, bf16 or fp32; on CUDA only), ``training.translate`` (2),
  ``training.cutout`` (4), ``training.logit_scale`` (0.125), ``training.width`` (64: the
  first layer's channels; smaller for tests), ``training.margin`` (logsumexp, or max as the
  seed's script computes it), ``training.seed`` (0).
- ``mask.alpha`` (0.5): the fraction of training rows each model trains on; ``mask.seed``
  (0): with the model index, picks those rows.
- ``mask.repeat_start`` (-1: none), ``mask.repeats`` (2): held-out replicates. Models
  ``index >= repeat_start`` come in consecutive groups of ``repeats`` that share the mask of the
  group's first index; weights, batch order and augmentations still follow each model's own
  index (:func:`~dm_assets.examples.cifar10.train.mask_index`).

The device is ``$DM_DEVICE`` when set (the launcher sets it), else CUDA when available.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastargs import Param, Section, get_current_config
from fastargs.validation import Checker, OneOf

from dm_assets.cli import parse_bool
from dm_assets.errors import DmError
from dm_assets.examples.cifar10.convert import TRAIN_BETON, VAL_BETON
from dm_assets.examples.cifar10.train import TrainingSettings, train_model
from dm_assets.home import dm_home

EXPERIMENT_NAME = "cifar10"
BETONS_DIR = "betons"
_SECTIONS = ("data", "training", "mask")


class _Boolean(Checker):
    """true/false, yes/no, 1/0 (fastargs' own bool makes the string "0" True)."""

    def check(self, value: object) -> bool:
        return value if isinstance(value, bool) else parse_bool(str(value))

    def help(self) -> str:
        return "true or false"


_DEFAULTS = TrainingSettings()

Section("data", "The datasets written by dm_assets.examples.cifar10.convert").params(
    train_dataset=Param(
        str, "training set .beton (default $DM_HOME/cifar10/betons/train.beton)", default=""
    ),
    val_dataset=Param(
        str, "test set .beton, margins (default $DM_HOME/cifar10/betons/val.beton)", default=""
    ),
    num_workers=Param(int, "FFCV decoding threads", default=4),
)

Section("training", "Hyperparameters").params(
    lr=Param(float, "peak learning rate", default=_DEFAULTS.lr),
    epochs=Param(int, "passes over the model's training rows", default=_DEFAULTS.epochs),
    lr_peak_epoch=Param(
        float, "epoch at which the learning rate peaks", default=_DEFAULTS.lr_peak_epoch
    ),
    batch_size=Param(int, "batch size", default=_DEFAULTS.batch_size),
    momentum=Param(float, "SGD momentum", default=_DEFAULTS.momentum),
    weight_decay=Param(float, "L2 weight decay", default=_DEFAULTS.weight_decay),
    label_smoothing=Param(float, "label smoothing", default=_DEFAULTS.label_smoothing),
    nesterov=Param(_Boolean(), "Nesterov momentum", default=_DEFAULTS.nesterov),
    lr_tta=Param(_Boolean(), "average the logits of each test image and its mirror", default=True),
    precision=Param(
        OneOf(["fp16", "bf16", "fp32"]), "autocast dtype on CUDA", default=_DEFAULTS.precision
    ),
    translate=Param(int, "random translation, pixels", default=_DEFAULTS.translate),
    cutout=Param(int, "cutout square side, pixels (0: none)", default=_DEFAULTS.cutout),
    logit_scale=Param(float, "factor on the final logits", default=_DEFAULTS.logit_scale),
    width=Param(int, "first-layer channels (64: ResNet-9)", default=_DEFAULTS.width),
    margin=Param(
        OneOf(["logsumexp", "max"]),
        "correct logit minus logsumexp (or max) of the others",
        default=_DEFAULTS.margin,
    ),
    seed=Param(int, "with the index, seeds weights, batch order, augmentations", default=0),
)

Section("mask", "Which training rows each model trains on").params(
    alpha=Param(float, "fraction of the training rows each model trains on", default=0.5),
    seed=Param(int, "with the model index, picks the rows", default=0),
    repeat_start=Param(
        int, "first model index of the replicate groups sharing a mask; -1: none", default=-1
    ),
    repeats=Param(int, "models per replicate group (same mask, own seeds)", default=2),
)


class ArgumentsError(DmError, ValueError):
    """The script's arguments are missing or invalid; lists every one."""


def read_arguments(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """This script's ``--section.key=value`` arguments from ``argv`` (default ``sys.argv``),
    collected into the fastargs config and returned as ``{"section.key": value}``; other
    arguments are left alone. Raises :class:`ArgumentsError` listing every invalid one (never
    exits the process, unlike fastargs' own ``validate``)."""
    config = get_current_config()
    ours = [path for path in config.entries if path[0] in _SECTIONS]
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False, exit_on_error=False)
    for path in ours:
        parser.add_argument("--" + ".".join(path), nargs="?", const="true", default=None)
    try:
        args, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    except argparse.ArgumentError as exc:
        raise ArgumentsError(f"bad argument: {exc}") from exc
    config.collect(vars(args))
    values, problems = {}, []
    for path in ours:
        name = ".".join(path)
        try:
            values[name] = config[path]
        except Exception as exc:  # fastargs' ValidationError carries no message
            raw = config.content.get(path)
            problems.append(
                f"--{name}={raw!r}: {type(exc).__name__}; expected "
                f"{config.entries[path].checker.help()}"
            )
    if problems:
        raise ArgumentsError(
            "invalid arguments for dm_assets.examples.cifar10.train_cifar:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return values


def default_dataset_paths(home: str | Path | None = None) -> tuple[Path, Path]:
    """``($DM_HOME/cifar10/betons/train.beton, .../val.beton)``."""
    folder = dm_home(home) / EXPERIMENT_NAME / BETONS_DIR
    return folder / TRAIN_BETON, folder / VAL_BETON


def settings_from(values: dict[str, Any]) -> TrainingSettings:
    """The :class:`TrainingSettings` of the ``training.*`` arguments."""
    return TrainingSettings(
        lr=values["training.lr"],
        epochs=values["training.epochs"],
        lr_peak_epoch=values["training.lr_peak_epoch"],
        batch_size=values["training.batch_size"],
        momentum=values["training.momentum"],
        weight_decay=values["training.weight_decay"],
        label_smoothing=values["training.label_smoothing"],
        nesterov=values["training.nesterov"],
        tta=values["training.lr_tta"],
        precision=values["training.precision"],
        translate=values["training.translate"],
        cutout=values["training.cutout"],
        logit_scale=values["training.logit_scale"],
        width=values["training.width"],
        margin=values["training.margin"],
        seed=values["training.seed"],
    )


def main(index: int, logdir: str) -> dict[str, np.ndarray]:
    """Train model ``index``; ``{"masks": bool (n_train,), "margins": float16 (n_val,)}``.
    ``logdir`` (the store's ``workers/<index>/``) is not written to."""
    values = read_arguments()
    default_train, default_val = default_dataset_paths()
    result = train_model(
        index,
        train_path=values["data.train_dataset"] or default_train,
        val_path=values["data.val_dataset"] or default_val,
        settings=settings_from(values),
        alpha=values["mask.alpha"],
        mask_seed=values["mask.seed"],
        repeat_start=values["mask.repeat_start"],
        repeats=values["mask.repeats"],
        num_workers=values["data.num_workers"],
    )
    return {"masks": result.mask, "margins": result.margins.astype(np.float16)}
