"""The digits experiments' attribution task: found from the trainer module, its settings from
the experiment's arguments, its model and output exactly the stored ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dm_assets.attribution import AttributionTaskError, load_attribution_task
from dm_assets.examples.digits.attribution import as_module, attribution_task, settings_from_args
from dm_assets.examples.digits.data import NUM_TARGETS, NUM_TRAIN, load_split
from dm_assets.examples.digits.train_digits import (
    DigitsSettings,
    target_margins,
    train_classifier,
)

SMALL = {
    "digits.model": "mlp",
    "digits.hidden": "8",
    "digits.batch_size": "250",
    "digits.epochs": "2",
    "digits.lr": "0.01",
    "digits.init_seed": "-1",
}


def test_settings_from_text_and_typed_arguments() -> None:
    assert settings_from_args(SMALL) == DigitsSettings(
        model="mlp", hidden=8, batch_size=250, epochs=2, lr=0.01, init_seed=-1
    )
    typed = {"digits.weight_decay": 1.0e-4, "digits.steps": 5, "other.key": "x"}
    assert settings_from_args(typed) == DigitsSettings(weight_decay=1e-4, steps=5)
    with pytest.raises(ValueError, match=r"digits\.depth: not a digits setting"):
        settings_from_args({"digits.depth": "2"})


def test_pipeline_finds_the_sibling_module() -> None:
    task = load_attribution_task("dm_assets.examples.digits.train_digits", SMALL)
    assert task.num_train == NUM_TRAIN and task.num_targets == NUM_TARGETS
    assert task.l2 == DigitsSettings().weight_decay
    with pytest.raises(AttributionTaskError, match="provides no attribution task"):
        load_attribution_task("dm_assets.examples.synthetic.train_synthetic", {})


def test_module_and_output_are_the_stored_ones() -> None:
    settings = settings_from_args(SMALL)
    mask = np.ones(NUM_TRAIN, dtype=bool)
    classifier = train_classifier(mask, settings, init_seed=3, order_seed=4)
    module = as_module(classifier)
    split = load_split()
    images = torch.tensor(split.target_images)
    torch.testing.assert_close(module(images), classifier.logits(images))
    task = attribution_task(settings)
    np.testing.assert_allclose(
        task.target_outputs(module), target_margins(classifier), rtol=1e-5, atol=1e-5
    )


def test_last_checkpoint_is_the_full_model() -> None:
    task = attribution_task(SMALL)
    pairs = task.checkpoints(0, 2) if task.checkpoints else []
    assert [lr for _, lr in pairs] == [0.01, 0.01]
    np.testing.assert_array_equal(
        task.target_outputs(pairs[-1][0]), task.target_outputs(task.full_model(0))
    )
    first = task.target_outputs(pairs[0][0])
    assert not np.array_equal(first, task.target_outputs(pairs[-1][0]))
