r"""Baseline attribution methods, computed by the ``dattri`` library (0.3.0) on an
:class:`~dm_assets.attribution.task.AttributionTask`.

Each method returns an :class:`Attribution`: a score matrix ``scores`` float64 ``(p, t)``
(training example ``i``, target ``j``) with one sign convention for all, **higher = including
example i RAISES target j's output** (the same direction as a datamodel's weight), and the wall
clock of the attribution and, separately, of training the model(s) it needs.

Below ``L_i`` is training example ``i``'s loss (``task.loss`` on it), ``f_j`` the output of
target ``j`` (``task.output``), gradients are with respect to all the model's parameters
``theta`` (``P`` of them) at a model trained on the full training set.

``influence_cg``
    dattri's ``IFAttributorCG``: ``dattri_ij = grad L_i^T (H + d I)^{-1} grad f_j`` with ``H``
    the Hessian of the mean training loss over all ``p`` examples and ``d`` the damping
    (default: the task's L2 coefficient ``task.l2``, i.e. the Hessian of the training
    objective's penalty; at least ``1e-4`` so that CG has a positive definite system), the
    inverse by ``max_iter`` conjugate-gradient steps (dattri runs exactly ``max_iter``, starting
    from the vector itself). Upweighting example ``i`` by ``eps`` moves the minimizer by
    ``-eps H^{-1} grad L_i``, so including it changes ``f_j`` by about
    ``-(1/p) grad f_j^T H^{-1} grad L_i``: ``scores = -dattri`` (the factor ``1/p`` is left
    out; LDS is invariant to it). One model (seed 0).
``trak``
    dattri's ``TRAKAttributor`` (Park et al. 2023) on ``models`` models trained on the full
    set from seeds ``0 .. models-1`` (dattri's checkpoint ensemble: the average over models of
    ``phi_j^T (Phi^T Phi + r I)^{-1} Phi^T``, times ``Q = 1 - p_i`` averaged over models).
    ``phi`` are gradients of the **output** ``f`` (TRAK's model output function, for training
    examples too: dattri's ``loss_func`` is ``task.output``), divided by ``sqrt(P)`` and
    projected to ``proj_dim`` dimensions by a seeded Gaussian projection; ``p_i`` is the
    probability of example ``i``'s label (``exp(-L_i)``, for a cross-entropy ``task.loss``).
    TRAK's score is already the effect of including ``i`` on ``f_j``: ``scores = dattri``.
    ``proj_dim`` is capped at ``min(P, p)`` (``Phi^T Phi`` is singular beyond ``p``).
``tracin``
    dattri's ``TracInAttributor`` on ``checkpoints`` models along one full-set training run
    (``task.checkpoints(seed=0, n)``) with weights their learning rates:
    ``dattri_ij = sum_k lr_k grad L_i(theta_k)^T grad f_j(theta_k)`` (TracInCP, Pruthi et al.
    2020), exact gradients (identity projection). A gradient step on example ``i`` changes
    ``f_j`` by ``-lr grad f_j^T grad L_i``: ``scores = -dattri``. When the task has no
    ``checkpoints``, the final model of seeds ``0 .. checkpoints-1`` with weight 1 (Grad-Dot in
    dattri's terms); :attr:`Attribution.settings` says which (``variant``). With Adam the
    learning rate is not the step actually taken per unit gradient, so TracIn's first-order
    reading is approximate.

Imports neither dagster nor mlflow; dattri only when a method runs.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dm_assets.attribution.task import AttributionTask
from dm_assets.errors import DmError

logger = logging.getLogger(__name__)

METHODS = ("influence_cg", "trak", "tracin")
"""The baseline methods, in the order they are run and reported."""

MIN_DAMPING = 1e-4
"""The smallest damping of the influence function's Hessian (CG needs a positive definite
system; a trained network's Hessian has near-zero and slightly negative directions)."""


class AttributionError(DmError, RuntimeError):
    """A baseline could not produce finite scores; the message names the setting to change."""


@dataclass(frozen=True, eq=False)
class Attribution:
    """One baseline's result.

    ``method``: its name (:data:`METHODS`); ``scores`` float64 ``(p, t)``: higher = including
    training example ``i`` raises target ``j``'s output; ``attribution_seconds``: wall clock of
    the attribution itself (dattri's caching and scoring); ``training_seconds``: wall clock of
    training the model(s) it needs; ``models_trained``: how many full-set training runs (or
    checkpoint retrainings) that took; ``settings``: the method's settings as run (dattri class,
    projection, damping, ...); ``versions``: dattri's and torch's.
    """

    method: str
    scores: np.ndarray
    attribution_seconds: float
    training_seconds: float
    models_trained: int
    settings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Total compute: training and attribution (wall clock)."""
        return self.attribution_seconds + self.training_seconds


def library_versions() -> dict[str, str]:
    """The versions of dattri and torch installed."""
    return {
        "dattri": importlib.metadata.version("dattri"),
        "torch": torch.__version__,
    }


def _loader(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> DataLoader:
    # unshuffled: dattri writes row r of a batch into row (batch * batch_size + r)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=False)


def _dattri_task(task: AttributionTask, models: Sequence[nn.Module], *, train_rep: str) -> Any:
    """A ``dattri.task.AttributionTask`` over ``models`` (its checkpoints). ``train_rep``:
    ``"loss"`` (dattri's ``loss_func`` is ``task.loss``) or ``"output"`` (``task.output``).

    dattri calls the functions with a batch (influence functions: ``(1, ...)`` per example, the
    whole set for the Hessian) or a single unbatched example (TRAK, TracIn); the input is
    reshaped to ``(-1, *row shape)`` so that both work."""
    from dattri.task import AttributionTask as DattriTask

    row_shape = tuple(task.train_inputs.shape[1:])
    template = copy.deepcopy(models[0])

    def _outputs(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(template, params, (x.reshape(-1, *row_shape),))

    def loss_func(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = data
        return task.loss(_outputs(params, x), y.reshape(-1))

    def output_func(
        params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        x, y = data
        return task.output(_outputs(params, x), y.reshape(-1)).sum()

    return DattriTask(
        loss_func=loss_func if train_rep == "loss" else output_func,
        model=template,
        checkpoints=[{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models],
        target_func=output_func,
    )


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _finite(method: str, scores: torch.Tensor, fix: str) -> np.ndarray:
    out = scores.detach().cpu().numpy().astype(np.float64)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise AttributionError(f"{method}: {bad} of {out.size} scores are NaN or infinite: {fix}")
    return out


def _train(task: AttributionTask, seeds: Sequence[int]) -> tuple[list[nn.Module], float]:
    started = time.perf_counter()
    models = [task.full_model(int(s)) for s in seeds]
    return models, time.perf_counter() - started


def _target_rows(task: AttributionTask, targets: np.ndarray | None) -> np.ndarray:
    if targets is None:
        return np.arange(task.num_targets)
    rows = np.asarray(targets, dtype=np.int64).reshape(-1)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= task.num_targets:
        raise ValueError(
            f"targets must index the task's {task.num_targets} targets; got {rows.size} "
            f"entries in [{rows.min() if rows.size else '-'}, {rows.max() if rows.size else '-'}]"
        )
    return rows


def influence_cg(
    task: AttributionTask,
    *,
    targets: np.ndarray | None = None,
    damping: float | None = None,
    max_iter: int = 20,
    target_batch: int = 256,
    seed: int = 0,
) -> Attribution:
    """Influence functions with a conjugate-gradient inverse Hessian (dattri
    ``IFAttributorCG``; see the module docstring), on one model trained on the full set from
    ``seed``. ``targets``: the task's target rows to attribute (default all); ``damping``
    (default ``max(task.l2, MIN_DAMPING)``); ``max_iter`` CG steps; ``target_batch`` targets
    per CG solve (memory: ``target_batch`` Hessian-vector products at once)."""
    from dattri.algorithm import IFAttributorCG

    rows = _target_rows(task, targets)
    damping = max(task.l2, MIN_DAMPING) if damping is None else float(damping)
    models, training_seconds = _train(task, [seed])
    started = time.perf_counter()
    attributor = IFAttributorCG(
        task=_dattri_task(task, models, train_rep="loss"),
        max_iter=max_iter,
        regularization=damping,
        device="cpu",
    )
    full = _loader(task.train_inputs, task.train_labels, task.num_train)
    attributor.cache(full)
    raw = attributor.attribute(
        full, _loader(task.target_inputs[rows], task.target_labels[rows], target_batch)
    )
    seconds = time.perf_counter() - started
    scores = -_finite(
        "influence_cg",
        raw,
        f"raise the damping (now {damping:g}) or lower max_iter (now {max_iter}; dattri runs "
        "every step, and a converged CG divides 0 by 0)",
    )
    return Attribution(
        method="influence_cg",
        scores=scores,
        attribution_seconds=seconds,
        training_seconds=training_seconds,
        models_trained=1,
        settings={
            "dattri_class": "IFAttributorCG",
            "models": 1,
            "seeds": [seed],
            "damping": damping,
            "max_iter": max_iter,
            "mode": "rev-rev",
            "parameters": _num_params(models[0]),
            "sign": "scores = -dattri (dattri: grad L_i^T H^-1 grad f_j, the loss-increase sign)",
        },
        versions=library_versions(),
    )


def _correct_probability(task: AttributionTask, template: nn.Module) -> Callable[..., torch.Tensor]:
    row_shape = tuple(task.train_inputs.shape[1:])

    def probability(
        params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        x, y = data
        out = torch.func.functional_call(template, params, (x.reshape(-1, *row_shape),))
        return torch.exp(-task.loss(out, y.reshape(-1)))

    return probability


def trak(
    task: AttributionTask,
    *,
    targets: np.ndarray | None = None,
    models: int = 5,
    proj_dim: int = 512,
    regularization: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> Attribution:
    """TRAK (dattri ``TRAKAttributor``; see the module docstring) on ``models`` models trained
    on the full set from seeds ``seed .. seed + models - 1``, gradients projected to
    ``proj_dim`` dimensions (capped at ``min(P, p)``) by a Gaussian projection seeded with
    ``seed``; ``regularization`` is added to ``Phi^T Phi``'s diagonal."""
    from dattri.algorithm import TRAKAttributor

    if models < 1:
        raise ValueError(f"models={models}: TRAK needs at least one trained model")
    rows = _target_rows(task, targets)
    trained, training_seconds = _train(task, range(seed, seed + models))
    n_params = _num_params(trained[0])
    dim = int(min(proj_dim, n_params, task.num_train))
    started = time.perf_counter()
    dattri_task = _dattri_task(task, trained, train_rep="output")
    attributor = TRAKAttributor(
        task=dattri_task,
        correct_probability_func=_correct_probability(task, dattri_task.get_model()),
        projector_kwargs={
            "proj_dim": dim,
            "proj_max_batch_size": 32,
            "proj_seed": seed,
            "proj_type": "normal",
            "device": "cpu",
        },
        regularization=regularization,
        device="cpu",
    )
    attributor.cache(_loader(task.train_inputs, task.train_labels, batch_size))
    raw = attributor.attribute(
        _loader(task.target_inputs[rows], task.target_labels[rows], batch_size)
    )
    seconds = time.perf_counter() - started
    scores = _finite(
        "trak",
        raw,
        f"add regularization (now {regularization:g}) or lower proj_dim (now {dim})",
    )
    return Attribution(
        method="trak",
        scores=scores,
        attribution_seconds=seconds,
        training_seconds=training_seconds,
        models_trained=models,
        settings={
            "dattri_class": "TRAKAttributor",
            "models": models,
            "seeds": list(range(seed, seed + models)),
            "proj_dim": dim,
            "proj_dim_requested": proj_dim,
            "proj_type": "normal",
            "proj_seed": seed,
            "regularization": regularization,
            "parameters": n_params,
            "features": "gradients of task.output (train and target)",
            "sign": "scores = dattri (TRAK's score is the effect of including i)",
        },
        versions=library_versions(),
    )


def tracin(
    task: AttributionTask,
    *,
    targets: np.ndarray | None = None,
    checkpoints: int = 5,
    batch_size: int = 256,
    seed: int = 0,
) -> Attribution:
    """TracInCP (dattri ``TracInAttributor``; see the module docstring) on ``checkpoints``
    models along the full-set training run of ``seed``, or Grad-Dot on the final models of
    ``checkpoints`` seeds when the task cannot give checkpoints."""
    from dattri.algorithm import TracInAttributor

    if checkpoints < 1:
        raise ValueError(f"checkpoints={checkpoints}: TracIn needs at least one model")
    rows = _target_rows(task, targets)
    started = time.perf_counter()
    if task.checkpoints is not None:
        pairs = task.checkpoints(seed, checkpoints)
        if not pairs:
            raise AttributionError(f"task.checkpoints({seed}, {checkpoints}) returned no models")
        models = [m for m, _ in pairs]
        weights = [float(lr) for _, lr in pairs]
        variant = "TracInCP: checkpoints along one full-set run, weights = learning rates"
        seeds = [seed]
    else:
        models, _ = _train(task, range(seed, seed + checkpoints))
        weights = [1.0] * checkpoints
        variant = "Grad-Dot: final models of several seeds, weights 1 (no checkpoints given)"
        seeds = list(range(seed, seed + checkpoints))
    training_seconds = time.perf_counter() - started
    started = time.perf_counter()
    attributor = TracInAttributor(
        task=_dattri_task(task, models, train_rep="loss"),
        weight_list=torch.tensor(weights),
        normalized_grad=False,
        projector_kwargs={
            "proj_dim": _num_params(models[0]),
            "proj_max_batch_size": 32,
            "proj_seed": seed,
            "proj_type": "identity",
            "device": "cpu",
        },
        device="cpu",
    )
    raw = attributor.attribute(
        _loader(task.train_inputs, task.train_labels, batch_size),
        _loader(task.target_inputs[rows], task.target_labels[rows], batch_size),
    )
    seconds = time.perf_counter() - started
    scores = -_finite("tracin", raw, "check that the checkpoints' outputs are finite")
    return Attribution(
        method="tracin",
        scores=scores,
        attribution_seconds=seconds,
        training_seconds=training_seconds,
        models_trained=len(seeds),
        settings={
            "dattri_class": "TracInAttributor",
            "variant": variant,
            "checkpoints": len(models),
            "weights": weights,
            "seeds": seeds,
            "normalized_grad": False,
            "proj_type": "identity (exact gradients)",
            "parameters": _num_params(models[0]),
            "sign": "scores = -dattri (a gradient step on L_i lowers the loss)",
        },
        versions=library_versions(),
    )


_RUNNERS: dict[str, Callable[..., Attribution]] = {
    "influence_cg": influence_cg,
    "trak": trak,
    "tracin": tracin,
}


def run_method(
    method: str,
    task: AttributionTask,
    *,
    targets: np.ndarray | None = None,
    **settings: Any,
) -> Attribution:
    """Run baseline ``method`` (one of :data:`METHODS`) on ``task``'s targets ``targets``
    (default all) with its keyword ``settings`` (see each method)."""
    if method not in _RUNNERS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    logger.info("attributing %s with %s", task.description or "the task", method)
    result = _RUNNERS[method](task, targets=targets, **settings)
    logger.info(
        "%s: %.1f s attribution + %.1f s training",
        method,
        result.attribution_seconds,
        result.training_seconds,
    )
    return result
