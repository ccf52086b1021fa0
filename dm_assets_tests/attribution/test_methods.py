"""The dattri baselines on a tiny convex task where the answer is known: shapes, finite
values, the sign convention (higher = the example raises the target), and influence functions
against actual leave-one-out retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dm_assets.attribution import METHODS, AttributionTask, run_method
from dm_assets.attribution.methods import influence_cg

P, CLASSES, FEATURES = 16, 3, 3
L2 = 0.05
STEPS, LR = 400, 0.5


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    correct = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(P, FEATURES, generator=g)
    y = torch.arange(P) % CLASSES
    x = x + 1.5 * torch.nn.functional.one_hot(y, FEATURES).float()
    # target 0 is a copy of training example 0; the others are new points
    tx = torch.cat([x[:1], torch.randn(3, FEATURES, generator=g)])
    ty = torch.cat([y[:1], torch.tensor([0, 1, 2])])
    return x, y, tx, ty


def _run(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int) -> nn.Module:
    """Full-batch gradient descent on mean cross-entropy + (L2 / 2) ||theta||^2 (deterministic;
    strongly convex, so ``STEPS`` steps reach the minimum)."""
    model = nn.Linear(FEATURES, CLASSES)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        model.weight.copy_(0.1 * torch.randn(CLASSES, FEATURES, generator=gen))
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model(x), y) + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    return model


def tiny_task(*, with_checkpoints: bool = True) -> AttributionTask:
    x, y, tx, ty = _data()

    def train(mask: np.ndarray, seed: int) -> nn.Module:
        keep = torch.from_numpy(np.asarray(mask, dtype=bool))
        return _run(x[keep], y[keep], seed, STEPS)

    def checkpoints(seed: int, n: int) -> list[tuple[nn.Module, float]]:
        return [(_run(x, y, seed, STEPS * (k + 1) // n), LR) for k in range(n)]

    return AttributionTask(
        train_inputs=x,
        train_labels=y,
        target_inputs=tx,
        target_labels=ty,
        train=train,
        loss=_loss,
        output=_margin,
        l2=L2,
        checkpoints=checkpoints if with_checkpoints else None,
        description="tiny softmax regression",
    )


def leave_one_out_effects(task: AttributionTask) -> np.ndarray:
    """float64 ``(p, t)``: output with every example minus output without example ``i``."""
    full = task.target_outputs(task.full_model(0))
    effects = np.empty((task.num_train, task.num_targets))
    for i in range(task.num_train):
        mask = np.ones(task.num_train, dtype=bool)
        mask[i] = False
        effects[i] = full - task.target_outputs(task.train(mask, 0))
    return effects


@pytest.fixture(scope="module")
def task() -> AttributionTask:
    return tiny_task()


@pytest.fixture(scope="module")
def loo(task: AttributionTask) -> np.ndarray:
    return leave_one_out_effects(task)


SETTINGS = {"influence_cg": {"max_iter": 8}, "trak": {"models": 2}, "tracin": {"checkpoints": 3}}


@pytest.mark.parametrize("method", METHODS)
def test_method_shape_finite_timed_and_sign_on_a_duplicate(
    method: str, task: AttributionTask, loo: np.ndarray
) -> None:
    result = run_method(method, task, **SETTINGS[method])
    assert result.method == method
    assert result.scores.shape == (P, 4) and result.scores.dtype == np.float64
    assert np.isfinite(result.scores).all()
    assert result.attribution_seconds > 0 and result.training_seconds > 0
    assert result.seconds == result.attribution_seconds + result.training_seconds
    assert result.versions["dattri"] == "0.3.0"
    # target 0 is training example 0 itself: including it raises its margin (retraining
    # agrees), and the method must say so with a positive score, the largest of the column
    assert loo[0, 0] > 0
    assert result.scores[0, 0] > 0
    assert result.scores[0, 0] == result.scores[:, 0].max()


def test_influence_matches_leave_one_out(task: AttributionTask, loo: np.ndarray) -> None:
    # convex, L2 damping equal to the penalty: the influence function is a first-order
    # approximation of retraining without each example (scale 1/p left out), so the scores
    # correlate with the actual effects almost perfectly on every target
    result = influence_cg(task, max_iter=8)
    for j in range(task.num_targets):
        r = np.corrcoef(result.scores[:, j], loo[:, j])[0, 1]
        assert r > 0.95, (j, r)


def test_targets_select_columns(task: AttributionTask) -> None:
    every = run_method("trak", task, models=1)
    some = run_method("trak", task, models=1, targets=np.array([2, 0]))
    np.testing.assert_allclose(some.scores, every.scores[:, [2, 0]], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="targets must index"):
        run_method("trak", task, models=1, targets=np.array([4]))


def test_tracin_without_checkpoints_is_grad_dot() -> None:
    result = run_method("tracin", tiny_task(with_checkpoints=False), checkpoints=2)
    assert result.settings["variant"].startswith("Grad-Dot")
    assert result.settings["weights"] == [1.0, 1.0]
    assert result.scores[0, 0] > 0


def test_unknown_method_is_refused(task: AttributionTask) -> None:
    with pytest.raises(ValueError, match="choose one of influence_cg, trak, tracin"):
        run_method("lissa", task)
