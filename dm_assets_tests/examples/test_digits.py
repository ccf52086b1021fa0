"""The digits example: a fixed split, reproducible masks and replicates, full-batch and minibatch
training, informative margins, and the shipped experiment files (digits, digits_mlp)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastargs import get_current_config

from dm_assets.examples.digits import train_digits
from dm_assets.examples.digits.data import (
    NUM_CLASSES,
    NUM_IMAGES,
    NUM_PIXELS,
    NUM_TARGETS,
    NUM_TRAIN,
    load_split,
)
from dm_assets.examples.digits.train_digits import (
    Classifier,
    DigitsSettings,
    correct_class_margins,
    init_seed_for,
    main,
    mask_for,
    mask_index,
    order_seed_for,
    spec,
    target_margins,
    train_classifier,
    train_model,
)
from dm_assets.pipeline.experiment import load_experiment
from dm_assets.store.spec import Spec
from dm_assets_tests.helpers import REPO_ROOT

EXPERIMENTS = REPO_ROOT / "dm_assets" / "experiments"
EXPERIMENT = EXPERIMENTS / "digits.yaml"
SPEC_FILE = REPO_ROOT / "dm_assets" / "examples" / "digits" / "spec.json"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # one thread, as main() sets for the worker process it runs in (tiny models: on a shared
    # two-core machine two threads only wait on each other); the test process's own afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
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
    torch.set_num_threads(2)  # main() sets one for its worker process
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
    config.collect({"digits.batch_size": "40", "digits.epochs": "2"})
    assert train_digits.settings_from_config() == replace(settings, batch_size=40, epochs=2)


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


def _original_full_batch_margins(index: int, settings: DigitsSettings) -> np.ndarray:
    # the trainer before minibatches existed, verbatim in substance: the linear model, Adam on
    # the whole mask for `steps` steps from the shared initialization
    split = load_split()
    mask = mask_for(index, seed=settings.seed, alpha=settings.alpha)
    x, y = torch.from_numpy(split.train_images[mask]), torch.from_numpy(split.train_labels[mask])
    generator = torch.Generator().manual_seed(settings.init_seed)
    bound = NUM_PIXELS**-0.5
    w = torch.empty(NUM_PIXELS, NUM_CLASSES).uniform_(-bound, bound, generator=generator)
    b = torch.empty(NUM_CLASSES).uniform_(-bound, bound, generator=generator)
    w.requires_grad_()
    b.requires_grad_()
    optimizer = torch.optim.Adam([w, b], lr=settings.lr)
    for _ in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(x @ w + b, y)
        loss = loss + 0.5 * settings.weight_decay * (w * w).sum()
        loss.backward()
        optimizer.step()
    return target_margins(Classifier([(w.detach(), b.detach())]))


def test_full_batch_training_is_unchanged_by_the_minibatch_option() -> None:
    settings = DigitsSettings()  # digits.yaml's model settings: batch_size 0
    assert settings.batch_size == 0
    margins = train_model(0, settings)["margins"]
    assert np.array_equal(margins, _original_full_batch_margins(0, settings))
    # the first margins of model 0 as the trainer computed them before `batch_size` existed
    # (this machine, torch 2.13, one thread); the tolerance allows other CPUs' float rounding
    np.testing.assert_allclose(
        margins[:4],
        [4.55916690826416, 4.347887992858887, 2.972874164581299, 2.7380590438842773],
        rtol=1e-5,
    )
    # epochs and the order seed play no part in full-batch training
    mask = mask_for(0)
    other = replace(settings, epochs=3)
    for order_seed in (1, 2):
        again = target_margins(train_classifier(mask, other, init_seed=0, order_seed=order_seed))
        assert np.array_equal(again, margins)


def test_minibatches_cover_the_mask_once_per_epoch_in_a_new_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches: list[torch.Tensor] = []
    original = Classifier.logits

    def recording(self: Classifier, images: torch.Tensor) -> torch.Tensor:
        batches.append(images.detach().clone())
        return original(self, images)

    monkeypatch.setattr(Classifier, "logits", recording)
    settings = DigitsSettings(model="mlp", hidden=8, batch_size=32, epochs=3, alpha=0.1)
    mask = mask_for(0, alpha=0.1)  # 100 images: batches of 32, 32, 32 and 4 per epoch
    train_classifier(mask, settings, init_seed=0, order_seed=5)
    assert [len(b) for b in batches] == [32, 32, 32, 4] * 3
    images = load_split().train_images[mask]
    epochs = [torch.cat(batches[4 * e : 4 * e + 4]).numpy() for e in range(3)]
    for seen in epochs:  # every image once per epoch (rows sorted to compare as sets)
        assert np.array_equal(np.unique(seen, axis=0), np.unique(images, axis=0))
        assert len(seen) == len(images)
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch its own order


MINIBATCH = DigitsSettings(
    model="mlp", hidden=16, batch_size=50, epochs=3, lr=0.05, init_seed=-1, repeat_start=0
)


def test_minibatch_replicates_differ_in_initialization_and_order() -> None:
    a, b = train_model(0, MINIBATCH), train_model(1, MINIBATCH)
    assert np.array_equal(a["masks"], b["masks"])  # one replicate group
    assert not np.array_equal(a["margins"], b["margins"])
    assert np.corrcoef(a["margins"], b["margins"])[0, 1] > 0.5  # still the same data
    assert init_seed_for(0, MINIBATCH) != init_seed_for(1, MINIBATCH)
    assert order_seed_for(0, MINIBATCH) != order_seed_for(1, MINIBATCH)
    assert order_seed_for(0, MINIBATCH) != init_seed_for(0, MINIBATCH)  # streams kept apart
    # the same index reproduces bit for bit; a new experiment seed gives new seeds
    assert np.array_equal(train_model(0, MINIBATCH)["margins"], a["margins"])
    assert order_seed_for(0, replace(MINIBATCH, seed=1)) != order_seed_for(0, MINIBATCH)
    # each source of randomness alone changes the model: the order with the init fixed, the
    # init with the order fixed (and a fixed init_seed still leaves replicates their orders)
    mask = a["masks"]

    def margins(init_seed: int, order_seed: int) -> np.ndarray:
        model = train_classifier(mask, MINIBATCH, init_seed=init_seed, order_seed=order_seed)
        return target_margins(model)

    base = margins(3, 4)
    assert np.array_equal(base, margins(3, 4))
    assert not np.array_equal(base, margins(3, 5))
    assert not np.array_equal(base, margins(6, 4))
    shared_init = replace(MINIBATCH, init_seed=0)
    assert not np.array_equal(
        train_model(0, shared_init)["margins"], train_model(1, shared_init)["margins"]
    )


def test_any_subset_trains_for_attribution_baselines() -> None:
    settings = replace(MINIBATCH, repeat_start=-1)
    everything = np.ones(NUM_TRAIN, dtype=bool)
    full = train_classifier(
        everything, settings, init_seed=init_seed_for(0, settings), order_seed=9
    )
    assert [tuple(w.shape) for w, _ in full.layers] == [(NUM_PIXELS, 16), (16, NUM_CLASSES)]
    assert not any(w.requires_grad for w, _ in full.layers)
    assert (target_margins(full) > 0).mean() > 0.8
    with pytest.raises(ValueError, match="at least one true entry"):
        train_classifier(np.zeros(NUM_TRAIN, dtype=bool), settings, init_seed=0)


def test_settings_report_every_problem() -> None:
    with pytest.raises(ValueError) as info:
        DigitsSettings(
            alpha=0.0, model="cnn", steps=0, init_seed=-2, repeats=0, batch_size=-1, epochs=0
        )
    text = str(info.value)
    for name in (
        "alpha=0.0",
        "model='cnn'",
        "steps=0",
        "init_seed=-2",
        "repeats=0",
        "batch_size=-1",
        "epochs=0",
    ):
        assert name in text


def _shipped_settings(path: Path, monkeypatch: pytest.MonkeyPatch) -> DigitsSettings:
    # the trainer's arguments as the worker passes them, parsed by the script's own fastargs
    # section (so a misspelt or mistyped argument fails here)
    experiment = load_experiment(path)
    config = get_current_config()
    monkeypatch.setattr(config, "content", dict(config.content))  # undone after the test
    args = dict(a.removeprefix("--").split("=", 1) for a in experiment.trainer.script_args())
    assert all(name.startswith("digits.") for name in args)
    config.collect(args)
    return train_digits.settings_from_config()


@pytest.mark.parametrize("name", ["digits", "digits_mlp"])
def test_experiment_file_matches_the_script(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    experiment = load_experiment(EXPERIMENTS / f"{name}.yaml")
    assert experiment.name == name
    assert experiment.spec == Spec.from_dict(spec(experiment.num_models))
    assert experiment.trainer.main_import == "dm_assets.examples.digits.train_digits"
    settings = _shipped_settings(EXPERIMENTS / f"{name}.yaml", monkeypatch)
    reg = experiment.regression
    assert reg is not None and (reg.x_name, reg.y_name) == ("masks", "margins")
    fitted = reg.data["num_train"] + reg.data["num_val"]
    # replicate groups lie among the held-out models, whole, of evaluation.replicates models
    assert fitted <= settings.repeat_start < experiment.num_models
    assert (experiment.num_models - fitted) % settings.repeats == 0
    evaluation = experiment.evaluation
    assert evaluation is not None
    assert evaluation.replicates == settings.repeats
    assert evaluation.curve_sizes and evaluation.curve_sizes[-1] <= fitted
    assert evaluation.folds >= 2 and evaluation.bootstrap >= 1000
    assert experiment.devices.gpus == "none" and experiment.devices.threads_per_worker == 1
    partitions = len(experiment.partition_keys())
    assert 10 <= partitions <= 20, partitions


def test_digits_experiment_is_full_batch_with_a_shared_initialization(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _shipped_settings(EXPERIMENT, monkeypatch)
    assert json.loads(SPEC_FILE.read_text()) == spec()
    assert load_experiment(EXPERIMENT).num_models == train_digits.NUM_MODELS
    # deterministic training: the model settings are the defaults, replicates identical runs
    assert replace(settings, repeat_start=-1, repeats=2) == DigitsSettings()


def test_digits_mlp_experiment_trains_noisy_models(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _shipped_settings(EXPERIMENTS / "digits_mlp.yaml", monkeypatch)
    assert settings.model == "mlp" and settings.batch_size > 0 and settings.init_seed == -1
    experiment = load_experiment(EXPERIMENTS / "digits_mlp.yaml")
    assert experiment.attributions is not None
    reg = experiment.regression
    assert reg is not None  # every held-out model is a replicate
    assert settings.repeat_start == reg.data["num_train"] + reg.data["num_val"]
    # two replicates of the first held-out mask: same mask, different margins
    first = settings.repeat_start
    a, b = train_model(first, settings), train_model(first + 1, settings)
    assert np.array_equal(a["masks"], b["masks"])
    assert not np.array_equal(a["margins"], b["margins"])
    assert (a["margins"] > 0).mean() > 0.9  # target accuracy; chance is 0.1
