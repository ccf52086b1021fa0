"""The LDS curve against a direct fit, its options and its input checks."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from dm_assets.evaluation.ceiling import group_identical_masks
from dm_assets.evaluation.curve import lds_curve
from dm_assets.evaluation.metrics import evaluate, predict
from dm_assets.regression.compute_datamodels import compute_datamodels
from dm_assets.regression.config import RegressionConfig, load_config
from dm_assets.regression.data import ArraySource
from dm_assets_tests.helpers import planted_problem


def curve_config(
    tmp_path: Path, num_train: int = 2100, num_val: int = 450, **cfg: object
) -> RegressionConfig:
    return load_config(
        None,
        {
            "data": {"data_path": "unused", "num_train": num_train, "num_val": num_val},
            "cfg": {
                "k": 12,
                "batch_size": 500,
                "out_dir": str(tmp_path / "out"),
                "device": "cpu",
                "solver": "gram",
                **cfg,
            },
        },
    )


def test_lds_curve_grows_and_ends_at_the_direct_fit(tmp_path: Path) -> None:
    # 45 of 150 examples matter: a few hundred models are needed; rows 2100 / 450 / 450
    prob = planted_problem(n=3000, p=150, t=4, density=0.3, seed=3)
    config = curve_config(tmp_path)
    points = lds_curve(prob.x, prob.y, config=config, sizes=[60, 250, 800, 2100])
    assert [p.n_train for p in points] == [60, 250, 800, 2100]
    lds = [p.lds for p in points]
    # noise 0.5 of the signal's sd: the ceiling is 6/pi asin(sqrt(0.8)/2) = 0.885
    assert 0.85 < lds[-1] < 0.9 and lds[-1] > lds[0] + 0.05
    assert all(b > a - 0.01 for a, b in itertools.pairwise(lds))
    assert all(p.seconds > 0 and p.evaluation.n_models == 450 for p in points)
    assert [p.n_models_used for p in points] == [510, 700, 1250, 2550]  # refit on + 450
    direct = compute_datamodels(config, source=ArraySource(prob.x, prob.y))
    held = prob.test
    expected = evaluate(predict(direct.result.seed_dict(), prob.x[held]), prob.y[held])
    # same rows, same batches, same solver: the same numbers
    np.testing.assert_allclose(points[-1].evaluation.lds_per_target, expected.lds_per_target)
    assert points[-1].lds == pytest.approx(expected.lds, abs=1e-12)
    assert points[-1].r2 == pytest.approx(expected.r2, abs=1e-9)


def test_lds_curve_options(tmp_path: Path) -> None:
    prob = planted_problem(n=700, p=40, t=2, seed=4)
    x = np.concatenate([prob.x, prob.x[-50:]])  # 50 held-out masks trained twice
    y = np.concatenate([prob.y, prob.y[-50:] + 0.1 * prob.y.std(0)])
    held = np.arange(600, 750)
    config = curve_config(tmp_path, batch_size=300)
    points = lds_curve(
        x,
        y,
        config=config,
        sizes=[30, 400],
        num_train=400,
        num_val=200,
        held_out=held,
        groups=group_identical_masks(x[held]),
        config_overrides={"cfg": {"k": 6}},
    )
    assert [p.n_train for p in points] == [30, 400]
    assert [p.n_models_used for p in points] == [230, 600]
    no_refit = lds_curve(
        x,
        y,
        config=config,
        sizes=[30],
        num_train=400,
        num_val=200,
        config_overrides={"cfg": {"refit": False}},
    )
    assert no_refit[0].n_models_used == 30
    ceiling = points[0].evaluation.ceiling
    assert ceiling is not None and ceiling.n_replicated_groups == 50
    single = lds_curve(x, y[:, 0], config=config, sizes=[400], num_train=400, num_val=200)
    assert single[0].evaluation.n_targets == 1 and single[0].evaluation.n_models == 150


def test_lds_curve_rejects_bad_inputs_naming_them(tmp_path: Path) -> None:
    prob = planted_problem(n=400, p=20, t=2, seed=5)
    config = curve_config(tmp_path, num_train=250, num_val=50, batch_size=100)
    with pytest.raises(ValueError) as info:
        lds_curve(prob.x, prob.y, config=config, sizes=[300, 1, 1])
    text = str(info.value)
    assert "must be increasing" in text and "at least 2" in text
    assert "at most num_train=250" in text
    with pytest.raises(ValueError, match="sizes is empty"):
        lds_curve(prob.x, prob.y, config=config, sizes=[])
    with pytest.raises(ValueError, match="held_out includes rows below num_train"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=slice(200, 400))
    with pytest.raises(ValueError, match=r"held_out has rows outside \[0, 400\)"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=[350, 400, 401])
    with pytest.raises(ValueError, match="held_out selects 2 model"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], held_out=slice(300, 302))
    with pytest.raises(ValueError, match=r"y must be \(n_models, t\)"):
        lds_curve(prob.x, prob.y[:-1], config=config, sizes=[50])
    with pytest.raises(ValueError, match="no model is left to hold out"):
        lds_curve(prob.x[:300], prob.y[:300], config=config, sizes=[50])
    with pytest.raises(ValueError, match="groups must give one id per held-out row"):
        lds_curve(prob.x, prob.y, config=config, sizes=[50], groups=np.zeros(3))
    with pytest.raises(ValueError, match=r"cfg\.solver='magic'"):
        lds_curve(
            prob.x,
            prob.y,
            config=config,
            sizes=[50],
            config_overrides={"cfg": {"solver": "magic"}},
        )
