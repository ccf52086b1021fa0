"""The early-stopping rule of :class:`PathTracker`, and its defaults (the reference's rule)."""

from __future__ import annotations

import torch

from dm_assets.regression.config import load_config
from dm_assets.regression.path import PathTracker


def _walk(tracker: PathTracker, curves: torch.Tensor) -> list[int]:
    """Feed each target's validation curve ``curves[t, step]`` until the tracker stops it;
    returns the steps each target ran."""
    t, k = curves.shape
    ran = [0] * t
    for step in range(k):
        ids = torch.nonzero(tracker.active)[:, 0]
        if ids.numel() == 0:
            break
        val = curves[ids, step]
        tracker.record(step, ids, val, val, torch.zeros(len(ids), dtype=torch.int64))
        for i in ids.tolist():
            ran[i] += 1
    return ran


def test_the_default_rule_is_the_references() -> None:
    # fast_l1's train_saga: a target stops at the first lambda whose validation MSE got
    # worse, once 10 lambdas are done
    k = 20
    steps = torch.arange(k, dtype=torch.float64)
    curves = torch.stack(
        [
            (steps - 13.0).abs(),  # best at step 13: stops at 14, having seen it get worse
            (steps - 3.0).abs(),  # worse from step 4, but 10 lambdas come first
            -steps,  # always better: the whole grid
        ]
    )
    tracker = PathTracker(torch.ones(3, k))
    ran = _walk(tracker, curves)
    assert ran == [15, 10, 20]
    assert tracker.best_step.tolist() == [13, 3, 19]


def test_patience_waits_for_that_many_worse_lambdas() -> None:
    k = 12
    steps = torch.arange(k, dtype=torch.float64)
    # a dip at step 5 (worse at 6 and 7), the best at step 8
    curve = (steps - 8.0).abs()
    curve[5] = 0.5
    curves = curve[None, :]
    assert _walk(PathTracker(torch.ones(1, k), min_lambdas=3, patience=1), curves) == [7]
    tracker = PathTracker(torch.ones(1, k), min_lambdas=3, patience=3)
    assert _walk(tracker, curves) == [12]
    assert tracker.best_step.tolist() == [8]


def test_the_config_defaults_are_the_trackers() -> None:
    config = load_config(
        None,
        {
            "data": {"data_path": "unused", "num_train": 10, "num_val": 5},
            "cfg": {"k": 3, "batch_size": 5, "out_dir": "unused"},
        },
    )
    tracker = PathTracker(torch.ones(1, 3))
    assert config["early_stopping"]["min_lambdas"] == tracker.min_lambdas == 10
    assert config["early_stopping"]["patience"] == tracker.patience == 1
