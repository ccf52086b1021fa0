"""The digits example: a fixed split, reproducible masks and replicates, informative margins,
and the shipped experiment file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastargs import get_current_config

from dm_assets.examples.digits import train_digits
from dm_assets.examples.digits.data import (
    NUM_CLASSES,
    NUM_IMAGES,
    NUM_TARGETS,
    NUM_TRAIN,
    load_split,
)
from dm_assets.examples.digits.train_digits import (
    DigitsSettings,
    correct_class_margins,
    main,
    mask_for,
    mask_index,
    spec,
    target_margins,
    train_classifier,
    train_model,
)
from dm_assets.pipeline.experiment import load_experiment
from dm_assets.store.spec import Spec
from dm_assets_tests.helpers import REPO_ROOT

EXPERIMENT = REPO_ROOT / "dm_assets" / "experiments" / "digits.yaml"
SPEC_FILE = REPO_ROOT / "dm_assets" / "examples" / "digits" / "spec.json"


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    # main() sets one thread for the worker process it runs in; give the test process its own back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_split_is_fixed_disjoint_and_sized() -> None:
    split = load_split()
    assert split.train_images.shape == (NUM_TRAIN, 64) and split.train_images.dtype == np.float32
    assert split.target_images.shape == (NUM_TARGETS, 64)
    assert split.target_images.dtype == np.float32
    assert split.train_labels.shape == (NUM_TRAIN,) and split.train_labels.dtype == np.int64
    assert split.target_labels.shape == (NUM_TARGETS,)
    assert NUM_TRAIN + NUM_TARGETS == NUM_IMAGES == 1797
    ids = np.concatenate([split.train_ids, split.target_ids])
    assert np.array_equal(np.sort(ids), np.arange(NUM_IMAGES))  # disjoint and complete
    for images in (split.train_images, split.target_images):
        assert images.min() == 0.0 and images.max() == 1.0
    # every class is in both halves, in roughly its share
    assert np.bincount(split.train_labels, minlength=NUM_CLASSES).min() > 70
    assert np.bincount(split.target_labels, minlength=NUM_CLASSES).min() > 50
    # the same split when read afresh (not only from the cache), another one for another seed
    fresh = load_split.__wrapped__(0)
    assert np.array_equal(fresh.train_ids, split.train_ids)
    assert np.array_equal(fresh.train_images, split.train_images)
    assert not np.array_equal(load_split(1).train_ids, split.train_ids)
    assert not split.train_images.flags.writeable


@pytest.mark.parametrize("seed", [0, 7])
def test_mask_is_deterministic_with_exactly_alpha_of_the_examples(seed: int) -> None:
    masks = [mask_for(i, seed=seed) for i in range(20)]
    for i, mask in enumerate(masks):
        assert mask.dtype == np.bool_ and mask.shape == (NUM_TRAIN,)
        assert mask.sum() == 500
        assert np.array_equal(mask, mask_for(i, seed=seed))
    assert len({m.tobytes() for m in masks}) == 20  # different indices differ
    assert not np.array_equal(mask_for(3, seed=seed), mask_for(3, seed=seed + 1))
    assert mask_for(3, seed=seed, alpha=0.3).sum() == 300
    # each example is in about half of the models
    frequency = np.mean([mask_for(i, seed=seed) for i in range(200)], axis=0)
    assert frequency.min() > 0.35 and frequency.max() < 0.65


def test_replicate_groups_share_the_mask_of_their_first_index() -> None:
    kw = {"repeat_start": 10, "repeats": 3}
    assert [mask_index(i, **kw) for i in range(8, 17)] == [8, 9, 10, 10, 10, 13, 13, 13, 16]
    for i in range(10):
        assert np.array_equal(mask_for(i, **kw), mask_for(i))  # before the groups: unchanged
    for first in (10, 13):
        for i in range(first, first + 3):
            assert np.array_equal(mask_for(i, **kw), mask_for(first))
    assert not np.array_equal(mask_for(12, **kw), mask_for(13, **kw))


def test_main_returns_the_spec_row_deterministically() -> None:
    row = main(index=3, logdir="unused")
    schema = Spec.from_dict(spec()).schema
    assert set(row) == set(schema)
    for key, field in schema.items():
        assert row[key].shape == field.shape and row[key].dtype == field.dtype
    assert np.isfinite(row["margins"]).all()
    assert np.array_equal(row["masks"], mask_for(3))
    assert torch.get_num_threads() == 1
    again = main(index=3, logdir="unused")
    assert np.array_equal(again["margins"], row["margins"])
    assert not np.array_equal(main(index=4, logdir="unused")["margins"], row["margins"])


def test_main_reads_the_pass_through_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    config = get_current_config()
    monkeypatch.setattr(config, "content", dict(config.content))  # undone after the test
    assert train_digits.settings_from_config() == DigitsSettings()  # the same defaults
    config.collect({"digits.alpha": "0.2", "digits.steps": "3", "digits.init_seed": "-1"})
    settings = train_digits.settings_from_config()
    assert settings == DigitsSettings(alpha=0.2, steps=3, init_seed=-1)
    assert main(index=0, logdir="unused")["masks"].sum() == 200


def test_margins_are_correct_class_margins() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    expected = [2.0 - np.log(np.exp(0.0) + np.exp(-1.0)), 0.5 - np.log(np.exp(0.5) + np.exp(3.0))]
    np.testing.assert_allclose(correct_class_margins(logits, labels), expected, rtol=1e-6)


def test_margins_are_informative() -> None:
    split = load_split()
    settings = DigitsSettings()
    margins = train_model(0, settings)["margins"]
    assert (margins > 0).mean() > 0.9  # target accuracy; chance is 0.1
    # leaving out every training 3 makes the model fail on the target 3s, and only there
    threes = split.target_labels == 3
    without = mask_for(0) & (split.train_labels != 3)
    left_out = target_margins(train_classifier(without, settings, init_seed=0))
    assert left_out[threes].mean() < 0 < margins[threes].mean()
    assert left_out[threes].mean() < margins[threes].mean() - 5
    assert (left_out[~threes] > 0).mean() > 0.85


def test_replicates_differ_only_where_training_is_random() -> None:
    shared = DigitsSettings(repeat_start=0, repeats=2, steps=20)
    a, b = train_model(0, shared), train_model(1, shared)
    assert np.array_equal(a["masks"], b["masks"])
    assert np.array_equal(a["margins"], b["margins"])  # same mask, same init: the same run
    random_init = replace(shared, model="mlp", init_seed=-1)
    a, b = train_model(0, random_init), train_model(1, random_init)
    assert np.array_equal(a["masks"], b["masks"])
    assert not np.array_equal(a["margins"], b["margins"])
    assert np.corrcoef(a["margins"], b["margins"])[0, 1] > 0.5  # still the same data


def test_settings_report_every_problem() -> None:
    with pytest.raises(ValueError) as info:
        DigitsSettings(alpha=0.0, model="cnn", steps=0, init_seed=-2, repeats=0)
    text = str(info.value)
    for name in ("alpha=0.0", "model='cnn'", "steps=0", "init_seed=-2", "repeats=0"):
        assert name in text


def test_experiment_file_matches_the_script() -> None:
    experiment = load_experiment(EXPERIMENT)
    assert experiment.name == "digits"
    assert experiment.spec == Spec.from_dict(spec())
    assert json.loads(SPEC_FILE.read_text()) == spec()
    assert experiment.trainer.main_import == "dm_assets.examples.digits.train_digits"
    args = dict(a.removeprefix("--digits.").split("=", 1) for a in experiment.trainer.script_args())
    types = {"model": str, "alpha": float, "lr": float, "weight_decay": float}
    settings = DigitsSettings(**{k: types.get(k, int)(v) for k, v in args.items()})
    reg = experiment.regression
    assert reg is not None and (reg.x_name, reg.y_name) == ("masks", "margins")
    first_held_out = reg.data["num_train"] + reg.data["num_val"]
    # replicate groups lie among the held-out models, in whole groups
    assert first_held_out <= settings.repeat_start < experiment.num_models
    assert (experiment.num_models - settings.repeat_start) % settings.repeats == 0
    assert experiment.devices.gpus == "none" and experiment.devices.threads_per_worker == 1
