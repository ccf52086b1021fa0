"""``<name>/regression_dataset``'s blocking check ``rows_match_store`` under concurrent
training: a model completing while the dataset is written is no mismatch (the dataset is a
snapshot); a row completed before the write and absent from the dataset, or a row in the
dataset that is not completed, still fails it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pytest

from dm_assets.pipeline.assets import experiment_assets
from dm_assets.pipeline.experiment import SHIPPED_DIR, Experiment, load_experiment
from dm_assets.regression import beton_writer
from dm_assets.store.store import Store
from dm_assets_tests.helpers import checks, metadata, resources

FIRST = 40  # models completed before the dataset is written


@pytest.fixture
def minimal(tmp_path: Path) -> tuple[Experiment, Path]:
    """The shipped ``minimal`` experiment with models 0-39 completed in its store."""
    experiment = load_experiment(SHIPPED_DIR / "minimal.yaml")
    home = tmp_path / "home"
    with Store.initialize(experiment.paths(home).store, experiment.spec) as store:
        for i in range(FIRST):
            store.write_row(i, row(i))
    return experiment, home


def row(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    return {
        "masks": rng.random(60) < 0.5,
        "margins": rng.standard_normal(4).astype(np.float16),
    }


def materialize_dataset(
    experiment: Experiment,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    before: Callable[[Store], None] = lambda store: None,
    after: Callable[[Store], None] = lambda store: None,
) -> dg.ExecuteInProcessResult:
    """Materialize ``regression_dataset``, running ``before`` / ``after`` on the store around
    ``write_beton`` (as a worker writing the same store at that moment would)."""
    real = beton_writer.write_beton

    def write_beton(store_dir: Any, out_path: Any, **kwargs: Any) -> Any:
        with Store.open(store_dir) as store:
            before(store)
        summary = real(store_dir, out_path, **kwargs)
        with Store.open(store_dir) as store:
            after(store)
        return summary

    monkeypatch.setattr(beton_writer, "write_beton", write_beton)
    assets = [a for a in experiment_assets(experiment) if isinstance(a, dg.AssetsDefinition)]
    return dg.materialize(
        assets,
        selection=[dg.AssetKey([experiment.name, "regression_dataset"])],
        resources=resources(home),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_model_completing_during_the_write_passes_the_check(
    minimal: tuple[Experiment, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment, home = minimal
    result = materialize_dataset(
        experiment,
        home,
        monkeypatch,
        before=lambda store: store.write_row(FIRST, row(FIRST)),  # read by the writer
        after=lambda store: store.write_row(FIRST + 1, row(FIRST + 1)),  # too late for it
    )
    assert result.success
    check = checks(result)["rows_match_store"]
    assert check.passed, check.metadata
    found = {k: v.value for k, v in check.metadata.items()}
    assert found["dataset_rows"] == FIRST + 1
    assert found["completed_not_in_dataset"] == 0 and found["in_dataset_not_completed"] == 0
    assert found["completed_during_write"] == 1  # model 40: completed after the check's read
    assert found["completed_after_write"] == 1  # model 41: for the next materialization
    assert metadata(result, experiment.name, "regression_dataset")["rows"] == FIRST + 1


def test_row_missing_from_the_dataset_fails_the_check(
    minimal: tuple[Experiment, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 3 was completed before the write but the dataset lacks it (simulated: its flag
    cleared for the writer, set again after)."""
    experiment, home = minimal
    result = materialize_dataset(
        experiment,
        home,
        monkeypatch,
        before=lambda store: store._set_completed([3], False),
        after=lambda store: store._set_completed([3], True),
    )
    check = checks(result)["rows_match_store"]
    assert not check.passed
    assert check.metadata["completed_not_in_dataset"].value == 1


def test_row_in_the_dataset_not_completed_fails_the_check(
    minimal: tuple[Experiment, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment, home = minimal
    result = materialize_dataset(
        experiment, home, monkeypatch, after=lambda store: store._set_completed([5], False)
    )
    check = checks(result)["rows_match_store"]
    assert not check.passed
    assert check.metadata["in_dataset_not_completed"].value == 1
