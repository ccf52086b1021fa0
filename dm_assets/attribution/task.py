"""What an experiment's trainer provides so that baselines can attribute its models: the
:class:`AttributionTask`, and how the pipeline finds it (:func:`load_attribution_task`).

A task describes the experiment's training in the terms gradient-based attribution needs:

- the training examples ``train_inputs`` ``(p, ...)`` and ``train_labels`` ``(p,)``, row ``i``
  being mask entry ``i`` (the store's mask column ``i``);
- the targets ``target_inputs`` ``(t, ...)`` and ``target_labels`` ``(t,)``, row ``j`` being
  the store's output column ``j`` (all of them: the caller cuts the fit's target range);
- ``train(mask, seed)``: a model (``torch.nn.Module`` mapping a batch of inputs ``(b, ...)`` to
  outputs ``(b, ...)``, e.g. logits) trained as the experiment trains its models, on the
  training examples where ``mask`` (bool ``(p,)``) is true, with the randomness of ``seed``;
  the baselines train it on the FULL training set (``mask`` all true);
- ``loss(outputs, labels)``: the training objective's data term, a scalar (the mean over the
  batch), so that ``loss`` of one example is that example's loss;
- ``output(outputs, labels)``: the model output the store records per target, ``(b,)`` (for
  classifiers usually the correct-class margin), so that the baselines attribute exactly the
  quantity the datamodels predict;
- ``l2``: the coefficient ``c`` of an L2 penalty ``(c / 2) * ||theta||^2`` in the training
  objective (0 if none): the Hessian of that penalty, ``c * I``, is the influence function's
  default damping;
- ``checkpoints(seed, n)`` (optional): ``n`` models along one full-set training run of
  ``seed`` (the last being the trained model), each with the learning rate in force then, for
  TracIn.

**How the pipeline finds it.** For an experiment whose ``trainer.main_import`` is module ``M``,
:func:`load_attribution_task` imports ``M`` and, when it has no ``attribution_task``, the
sibling module ``attribution`` of ``M``'s package (``pkg.train_x`` -> ``pkg.attribution``,
which keeps torch-heavy attribution code out of the training workers' imports), and calls its
``attribution_task(args)`` with the experiment's pass-through arguments as a mapping
``{"digits.model": "mlp", ...}`` (values as the YAML gave them, or strings from a command line).

Imports neither dagster nor mlflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dm_assets.errors import DmError

ATTRIBUTION_FUNCTION = "attribution_task"
"""The name of the function a trainer module (or its sibling ``attribution`` module) defines."""


class AttributionTaskError(DmError, ValueError):
    """An experiment's trainer provides no usable attribution task; the message says how to
    add one."""


@dataclass(frozen=True, eq=False)
class AttributionTask:
    """An experiment's training, as the baselines need it (see the module docstring for each
    field)."""

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    target_inputs: torch.Tensor
    target_labels: torch.Tensor
    train: Callable[[np.ndarray, int], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    l2: float = 0.0
    checkpoints: Callable[[int, int], list[tuple[nn.Module, float]]] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        p, t = len(self.train_inputs), len(self.target_inputs)
        if p < 1 or t < 1:
            problems.append(
                f"the task has {p} training examples and {t} targets: need >= 1 of each"
            )
        if self.train_labels.shape[:1] != (p,):
            problems.append(
                f"train_labels has shape {tuple(self.train_labels.shape)}; expected ({p},), one "
                "label per row of train_inputs"
            )
        if self.target_labels.shape[:1] != (t,):
            problems.append(
                f"target_labels has shape {tuple(self.target_labels.shape)}; expected ({t},), "
                "one label per row of target_inputs"
            )
        if self.train_inputs.shape[1:] != self.target_inputs.shape[1:]:
            problems.append(
                f"train_inputs rows have shape {tuple(self.train_inputs.shape[1:])} but "
                f"target_inputs rows {tuple(self.target_inputs.shape[1:])}: the model reads both"
            )
        if not self.l2 >= 0:
            problems.append(f"l2={self.l2}: the L2 penalty's coefficient is 0 or more")
        if problems:
            raise AttributionTaskError(problems)

    @property
    def num_train(self) -> int:
        """``p``: training examples (mask entries)."""
        return len(self.train_inputs)

    @property
    def num_targets(self) -> int:
        """``t``: targets (the store's output columns)."""
        return len(self.target_inputs)

    def full_model(self, seed: int) -> nn.Module:
        """A model trained on every training example with the randomness of ``seed``."""
        return self.train(np.ones(self.num_train, dtype=bool), seed)

    def target_outputs(
        self, model: nn.Module, targets: slice | np.ndarray | None = None
    ) -> np.ndarray:
        """float64 ``(t,)``: ``model``'s output on the targets ``targets`` (default all)."""
        rows = slice(None) if targets is None else targets
        with torch.no_grad():
            out = self.output(model(self.target_inputs[rows]), self.target_labels[rows])
        return out.detach().cpu().numpy().astype(np.float64)


def load_attribution_task(main_import: str, args: Mapping[str, Any]) -> AttributionTask:
    """The attribution task of the trainer module ``main_import`` (see the module docstring):
    ``attribution_task(args)`` from ``main_import`` itself or its sibling module
    ``attribution``.

    Raises
    ------
    AttributionTaskError
        Neither module defines ``attribution_task``, or it returns something else than an
        :class:`AttributionTask`.
    """
    package, _, _ = main_import.rpartition(".")
    candidates = [main_import, f"{package}.attribution" if package else "attribution"]
    tried = []
    for name in candidates:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                tried.append(f"{name} (not found)")
                continue
            raise
        factory = getattr(module, ATTRIBUTION_FUNCTION, None)
        if factory is None:
            tried.append(f"{name} (no {ATTRIBUTION_FUNCTION})")
            continue
        task = factory(dict(args))
        if not isinstance(task, AttributionTask):
            raise AttributionTaskError(
                f"{name}.{ATTRIBUTION_FUNCTION}(args) returned {type(task).__name__}; it must "
                "return dm_assets.attribution.AttributionTask"
            )
        return task
    raise AttributionTaskError(
        f"the trainer {main_import} provides no attribution task (looked in "
        f"{', '.join(tried)}): define {ATTRIBUTION_FUNCTION}(args) -> "
        "dm_assets.attribution.AttributionTask in one of them (see "
        "dm_assets/examples/digits/attribution.py), or drop the experiment's attributions "
        "section"
    )
