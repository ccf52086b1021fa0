"""Train one digits classifier on a random half of the training images; return its margins.

Written for the seed's worker: ``main(index, logdir)`` reads its settings from the fastargs
section ``digits`` (pass-through arguments such as ``--digits.model=mlp``; every one has a
default, so ``main`` also runs without any) and returns one store row::

    masks    bool    (1000,)  which training images the model saw
    margins  float32 (797,)   its correct-class margin on each target image

The split is :func:`~dm_assets.examples.digits.data.load_split`'s default one (seed 0),
whatever ``digits.seed`` is: that seed only draws the masks.

Model ``index`` is trained as follows.

1. **Mask.** Exactly ``round(alpha * 1000)`` of the 1,000 training images, chosen by
   ``np.random.default_rng([seed, i]).choice(1000, m, replace=False)`` where ``i`` is the
   model's *mask index* (:func:`mask_index`): ``index`` itself, except for replicates (below).
   A rerun of an index reproduces its mask; :func:`mask_for` recomputes it.
2. **Initialization.** PyTorch's default for linear layers, ``U(-1/sqrt(fan_in),
   1/sqrt(fan_in))`` for weights and biases, drawn from a ``torch.Generator`` seeded with
   ``init_seed`` when it is ``>= 0`` (every model starts from the same weights) or, for
   ``init_seed = -1``, with a seed derived from ``(seed, index)`` (:func:`init_seed_for`: every
   model, replicates included, starts from its own weights).
3. **Training.** Adam (learning rate ``lr``, PyTorch's default betas) on the objective
   ``mean cross-entropy over a batch of the mask's images + (weight_decay / 2) * sum of the
   squared weight-matrix entries`` (biases unpenalized). ``linear`` is multinomial logistic
   regression (``logits = x W + b``, 64 -> 10); ``mlp`` has one hidden ReLU layer of ``hidden``
   units (64 -> hidden -> 10). There is no dropout and no augmentation.

   - ``batch_size = 0`` (the default): ``steps`` full-batch steps, the batch being all ``m``
     images of the mask (``epochs`` is unused). The only randomness is then the mask and the
     initialization.
   - ``batch_size > 0``: ``epochs`` passes over the mask's ``m`` images (``steps`` is unused),
     each pass in its own random order cut into ``ceil(m / batch_size)`` minibatches of
     ``batch_size`` images (the last one smaller when ``batch_size`` does not divide ``m``): one
     Adam step per minibatch (PyTorch's fused implementation: the same update, a third faster
     on these tiny steps), ``epochs * ceil(m / batch_size)`` steps in all. The orders are
     ``torch.randperm(m)`` draws, one per epoch, from a ``torch.Generator`` seeded with the
     model's *order seed*, derived from ``(seed, index)`` (:func:`order_seed_for`), so every
     model, replicates included, sees its own sequence of minibatches.

   With one thread the result is a deterministic function of the mask, the initialization seed
   and (with minibatches) the order seed: a rerun of an index reproduces its margins bit for bit.
4. **Output.** On each target image, ``margin = z_y - logsumexp_{k != y} z_k`` for its logits
   ``z`` and its label ``y`` (Ilyas et al. 2022): positive exactly when the image is classified
   correctly.

**Replicates** (for a noise ceiling): with ``repeat_start >= 0``, models ``index >=
repeat_start`` come in consecutive groups of ``repeats`` (``[repeat_start, repeat_start +
repeats)``, the next ``repeats``, ...) that share one mask, the mask of the group's first index.
Nothing else changes: the initialization and the minibatch order follow the model's own index as
for any model. So with ``init_seed = -1`` and ``batch_size > 0`` (``digits_mlp.yaml``) the
replicates of a group differ in their initialization and their minibatch order; with
``init_seed = -1`` and full batches, in their initialization only; with a fixed ``init_seed``
and minibatches, in their order only; with a fixed ``init_seed`` and full batches
(``digits.yaml``) they are the same training run and return identical margins (a noise ceiling
of exactly 1 by construction: that training has no other randomness).

**Any subset** (attribution baselines, e.g. a model of the full training set):
:func:`train_classifier` trains one model on any mask with explicit seeds, e.g.
``train_classifier(np.ones(1000, bool), settings, init_seed=init_seed_for(i, settings),
order_seed=order_seed_for(i, settings))``, and :func:`target_margins` measures it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from fastargs import Param, Section, get_current_config
from fastargs.validation import OneOf

from dm_assets.examples.digits.data import (
    NUM_CLASSES,
    NUM_PIXELS,
    NUM_TARGETS,
    NUM_TRAIN,
    load_split,
)

NUM_MODELS = 5000
"""Models in the shipped experiment (``dm_assets/experiments/digits.yaml``)."""

MODELS = ("linear", "mlp")
# the random streams of a model, kept apart from the mask's ([seed, index]) and each other's
_INIT_STREAM = 1
_ORDER_STREAM = 2


@dataclass(frozen=True)
class DigitsSettings:
    """How every model of an experiment is trained (see the module docstring for each field's
    role); the defaults are the shipped experiment's."""

    seed: int = 0
    alpha: float = 0.5
    model: str = "linear"
    hidden: int = 64
    steps: int = 100
    lr: float = 0.1
    weight_decay: float = 1e-3
    init_seed: int = 0
    batch_size: int = 0
    epochs: int = 10
    repeat_start: int = -1
    repeats: int = 2

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.alpha <= 1 or round(self.alpha * NUM_TRAIN) < 1:
            problems.append(
                f"alpha={self.alpha}: the fraction of the {NUM_TRAIN} training images per model "
                f"must be in (0, 1] and select at least one image (e.g. 0.5)"
            )
        if self.model not in MODELS:
            problems.append(f"model={self.model!r}: choose one of {', '.join(MODELS)}")
        if self.hidden < 1:
            problems.append(f"hidden={self.hidden}: the MLP needs at least one hidden unit")
        if self.steps < 1:
            problems.append(f"steps={self.steps}: train for at least one step")
        if self.batch_size < 0:
            problems.append(
                f"batch_size={self.batch_size}: use 0 (full batch, `steps` steps) or the "
                "minibatch size (`epochs` passes), e.g. 32"
            )
        if self.epochs < 1:
            problems.append(f"epochs={self.epochs}: train for at least one pass over the data")
        if not self.lr > 0:
            problems.append(f"lr={self.lr}: the learning rate must be positive")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} must be 0 or more")
        if self.init_seed < -1:
            problems.append(
                f"init_seed={self.init_seed}: use a seed >= 0 (one initialization shared by "
                "every model) or -1 (each model its own)"
            )
        if self.repeat_start < -1:
            problems.append(
                f"repeat_start={self.repeat_start}: use -1 (no replicates) or the first "
                "replicated model index"
            )
        if self.repeats < 1:
            problems.append(f"repeats={self.repeats}: a replicate group has at least 1 model")
        if problems:
            raise ValueError("invalid digits settings:\n" + "\n".join(f"  - {p}" for p in problems))


_DEFAULTS = DigitsSettings()

Section("digits", "the digits experiment's models (dm_assets.examples.digits)").params(
    seed=Param(
        int, "experiment seed: with the model index it fixes the mask", default=_DEFAULTS.seed
    ),
    alpha=Param(float, "fraction of the 1,000 training images per model", default=_DEFAULTS.alpha),
    model=Param(
        OneOf(list(MODELS)), "linear (logistic regression) or mlp", default=_DEFAULTS.model
    ),
    hidden=Param(int, "hidden units of the mlp", default=_DEFAULTS.hidden),
    steps=Param(int, "full-batch Adam steps (batch_size 0)", default=_DEFAULTS.steps),
    batch_size=Param(
        int, "minibatch size; 0: full batch for `steps` steps", default=_DEFAULTS.batch_size
    ),
    epochs=Param(int, "passes over the mask's images (batch_size > 0)", default=_DEFAULTS.epochs),
    lr=Param(float, "Adam learning rate", default=_DEFAULTS.lr),
    weight_decay=Param(float, "L2 penalty on the weight matrices", default=_DEFAULTS.weight_decay),
    init_seed=Param(
        int, "shared initialization seed; -1: one per model", default=_DEFAULTS.init_seed
    ),
    repeat_start=Param(
        int, "first model index of the replicate groups; -1: none", default=_DEFAULTS.repeat_start
    ),
    repeats=Param(int, "models per replicate group (they share a mask)", default=_DEFAULTS.repeats),
)


def settings_from_config() -> DigitsSettings:
    """The settings from the fastargs section ``digits`` (defaults where not given)."""
    config = get_current_config()
    return DigitsSettings(**{f.name: config[f"digits.{f.name}"] for f in fields(DigitsSettings)})


def spec(num_models: int = NUM_MODELS) -> dict[str, Any]:
    """The store spec of ``spec.json``: ``masks`` bool ``(1000,)``, ``margins`` float32
    ``(797,)`` per model."""
    return {
        "num_models": num_models,
        "schema": {
            "masks": {"shape": [NUM_TRAIN], "dtype": "bool_"},
            "margins": {"shape": [NUM_TARGETS], "dtype": "float32"},
        },
    }


def mask_index(index: int, *, repeat_start: int = -1, repeats: int = 2) -> int:
    """The index whose mask model ``index`` uses: ``index`` itself, or, for a replicate
    (``repeat_start >= 0`` and ``index >= repeat_start``), the first index of its group."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: a replicate group has at least 1 model")
    if repeat_start < 0 or index < repeat_start:
        return index
    return repeat_start + (index - repeat_start) // repeats * repeats


def mask_for(
    index: int, *, seed: int = 0, alpha: float = 0.5, repeat_start: int = -1, repeats: int = 2
) -> np.ndarray:
    """Model ``index``'s mask: bool ``(1000,)``, exactly ``round(alpha * 1000)`` entries true."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha={alpha}: the fraction of training images must be in (0, 1]")
    first = mask_index(index, repeat_start=repeat_start, repeats=repeats)
    chosen = np.random.default_rng([seed, first]).choice(
        NUM_TRAIN, round(alpha * NUM_TRAIN), replace=False
    )
    mask = np.zeros(NUM_TRAIN, dtype=bool)
    mask[chosen] = True
    return mask


def init_seed_for(index: int, settings: DigitsSettings) -> int:
    """The seed of model ``index``'s initialization: ``settings.init_seed`` when fixed, else
    one derived from ``(settings.seed, index)``."""
    if settings.init_seed >= 0:
        return settings.init_seed
    return int(np.random.default_rng([settings.seed, index, _INIT_STREAM]).integers(2**62))


def order_seed_for(index: int, settings: DigitsSettings) -> int:
    """The seed of model ``index``'s minibatch orders (used when ``settings.batch_size > 0``):
    derived from ``(settings.seed, index)``, so every model, replicates included, has its own."""
    return int(np.random.default_rng([settings.seed, index, _ORDER_STREAM]).integers(2**62))


@dataclass
class Classifier:
    """A trained model: ``layers`` is ``[(W, b), ...]``, ``W`` float32 ``(fan_in, fan_out)``,
    ReLU between layers (one layer: linear, two: mlp)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 ``(n, 10)`` for ``images`` float32 ``(n, 64)``."""
        h = images
        for i, (w, b) in enumerate(self.layers):
            if i:
                h = torch.relu(h)
            h = h @ w + b
        return h


def _initial_layers(
    settings: DigitsSettings, init_seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    widths = [NUM_PIXELS, NUM_CLASSES]
    if settings.model == "mlp":
        widths.insert(1, settings.hidden)
    generator = torch.Generator().manual_seed(init_seed)
    layers = []
    for fan_in, fan_out in itertools.pairwise(widths):
        bound = fan_in**-0.5
        w = torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=generator)
        b = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
        layers.append((w.requires_grad_(), b.requires_grad_()))
    return layers


def train_classifier(
    mask: np.ndarray, settings: DigitsSettings, *, init_seed: int, order_seed: int = 0
) -> Classifier:
    """Train one model on the training images where ``mask`` (bool ``(1000,)``, any subset with
    at least one image, e.g. all of them) is true, as the module docstring describes: from the
    initialization of ``init_seed`` (a seed >= 0 for a ``torch.Generator``) and, with
    minibatches (``settings.batch_size > 0``), in the orders of ``order_seed`` (likewise;
    unused with full batches). The same arguments give the same classifier bit for bit (one
    thread). ``settings.init_seed``, ``seed``, ``alpha``, ``repeat_start`` and ``repeats`` are
    not read here: they only choose a store model's mask and seeds (:func:`train_model`)."""
    split = load_split()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (NUM_TRAIN,) or not mask.any():
        raise ValueError(
            f"mask must be bool ({NUM_TRAIN},) with at least one true entry; got shape "
            f"{mask.shape} with {int(mask.sum())} true"
        )
    x = torch.from_numpy(split.train_images[mask])
    y = torch.from_numpy(split.train_labels[mask])
    layers = _initial_layers(settings, init_seed)
    params = [p for layer in layers for p in layer]
    # minibatch steps are many and tiny: PyTorch's fused CPU Adam (the same update, rounded in
    # its own order) takes a third less time per step; full batches keep the original loop
    optimizer = torch.optim.Adam(params, lr=settings.lr, fused=settings.batch_size > 0 or None)
    model = Classifier(layers)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model.logits(images), labels)
        if settings.weight_decay:
            loss = loss + 0.5 * settings.weight_decay * sum((w * w).sum() for w, _ in layers)
        loss.backward()
        optimizer.step()

    if settings.batch_size == 0:
        for _ in range(settings.steps):
            step(x, y)
    else:
        generator = torch.Generator().manual_seed(order_seed)
        for _ in range(settings.epochs):
            for batch in torch.randperm(len(y), generator=generator).split(settings.batch_size):
                step(x[batch], y[batch])
    return Classifier([(w.detach(), b.detach()) for w, b in layers])


def correct_class_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y - logsumexp_{k != y} z_k`` per row: float ``(n,)`` for logits ``(n, c)`` and
    labels int64 ``(n,)``."""
    correct = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def target_margins(classifier: Classifier) -> np.ndarray:
    """float32 ``(797,)``: the classifier's correct-class margin on each target image."""
    split = load_split()
    with torch.no_grad():
        # copies: the split's arrays are read-only, which torch tensors cannot express
        logits = classifier.logits(torch.tensor(split.target_images))
        margins = correct_class_margins(logits, torch.tensor(split.target_labels))
    return margins.numpy().astype(np.float32)


def train_model(index: int, settings: DigitsSettings) -> dict[str, np.ndarray]:
    """Model ``index``'s store row: ``masks`` bool ``(1000,)``, ``margins`` float32 ``(797,)``."""
    mask = mask_for(
        index,
        seed=settings.seed,
        alpha=settings.alpha,
        repeat_start=settings.repeat_start,
        repeats=settings.repeats,
    )
    classifier = train_classifier(
        mask,
        settings,
        init_seed=init_seed_for(index, settings),
        order_seed=order_seed_for(index, settings),
    )
    return {"masks": mask, "margins": target_margins(classifier)}


def main(index: int, logdir: str) -> dict[str, np.ndarray]:
    """The worker's entry point: train model ``index`` with the ``digits`` settings."""
    # workers run one per CPU slot; more threads would only contend (and change nothing)
    torch.set_num_threads(1)
    return train_model(index, settings_from_config())


def _split_seed(script_args: Sequence[str]) -> int:
    # the split is always seed 0 (digits.seed draws the masks only); kept as one place to change
    del script_args
    return 0


def example_images(script_args: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """For the analysis notebook: the training and target images, float32 ``(1000, 8, 8)`` and
    ``(797, 8, 8)`` in [0, 1], row ``j`` being mask entry ``j`` / target ``j``."""
    split = load_split(_split_seed(script_args))
    return split.train_images.reshape(-1, 8, 8), split.target_images.reshape(-1, 8, 8)


def target_labels(script_args: Sequence[str]) -> np.ndarray:
    """For the analysis notebook: each target's digit, int64 ``(797,)``."""
    return np.asarray(load_split(_split_seed(script_args)).target_labels)
