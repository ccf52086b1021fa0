"""The warm-up of a run's fitting steps while its training step waits on its workers
(:mod:`dm_assets.pipeline.warmup`): which runs start it and when, what it loads, that its
failures stay quiet. That the steps start and wait for it is checked by the whole-graph run
(``test_graph.test_minimal_experiment_whole_graph``)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest

from dm_assets.pipeline import warmup
from dm_assets.pipeline.definitions import build_definitions
from dm_assets.pipeline.experiment import Experiment, load_experiments
from dm_assets_tests.helpers import resources, run_probe


def shipped(name: str) -> Experiment:
    return next(e for e in load_experiments(extra="") if e.name == name)


def test_only_runs_that_fit_or_evaluate_warm_up(tmp_path: Path) -> None:
    defs = build_definitions([shipped("minimal"), shipped("digits_mlp")], resources(tmp_path))

    def warmed(job: dg.JobDefinition, experiment: str = "minimal") -> frozenset[str]:
        context: Any = SimpleNamespace(job_def=job)
        return warmup.run_warmed_assets(context, experiment)

    assert warmed(defs.resolve_job_def("minimal_train")) == frozenset()
    assert warmed(defs.resolve_job_def("minimal_all")) == {"datamodels", "datamodel_eval"}
    assert warmed(defs.resolve_job_def("minimal_fit")) == {"datamodels", "datamodel_eval"}
    # another experiment's fit in the same run is not this training step's to warm up
    assert warmed(defs.resolve_job_def("minimal_all"), "digits_mlp") == frozenset()
    assert warmed(defs.resolve_job_def("digits_mlp_all"), "digits_mlp") == {
        "datamodels",
        "datamodel_eval",
        "attributions",
    }
    # a run of the job subset to its training partitions (the UI's "materialize selected")
    training_only = defs.resolve_job_def("minimal_all").get_subset(
        asset_selection={
            dg.AssetKey(["minimal", "store"]),
            dg.AssetKey(["minimal", "model_outputs"]),
        }
    )
    assert warmed(training_only) == frozenset()
    no_job: Any = SimpleNamespace()
    assert warmup.run_warmed_assets(no_job, "minimal") == frozenset()


PROBE = """
import json, sys
from dm_assets.pipeline import warmup
from dm_assets.regression.cd_kernel import solve_paths
loaded_before = len(solve_paths.signatures)
first = warmup.start(frozenset({"datamodels"}))
second = warmup.start()
warmup.wait()
print(json.dumps({
    "first": first, "second": second, "seconds": warmup.warmed_seconds(),
    "after_wait": warmup.wait(),
    "loaded_before": loaded_before, "loaded_after": len(solve_paths.signatures),
    "modules": {m: m in sys.modules for m in (
        "mlflow", "mlflow.store.tracking.sqlalchemy_store", "dm_assets.evaluation.figures",
        "dm_assets.regression.compute_datamodels", "dm_assets.attribution.report")},
}))
"""


def test_a_warm_up_loads_the_fit_once_per_process() -> None:
    _, result = run_probe(PROBE)
    assert result["first"] is True and result["second"] is False
    assert result["seconds"] > 0 and result["after_wait"] == 0.0
    # the solver's kernel is loaded (from numba's cache, or compiled) before any fit asks
    assert result["loaded_before"] == 0 and result["loaded_after"] >= 1
    modules = result["modules"]
    assert modules.pop("dm_assets.attribution.report") is False  # no attributions in this run
    assert all(modules.values()), modules


def test_a_failed_warm_up_is_quiet_and_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup, "_thread", None)
    monkeypatch.setattr(warmup, "_seconds", None)

    def broken(assets: frozenset[str]) -> float:
        raise ImportError("no module named mlflow")

    monkeypatch.setattr(warmup, "warm", broken)
    assert warmup.start() is True
    warmup.wait()
    assert warmup.warmed_seconds() is None  # the step that imports it meets the error itself
    assert warmup.wait() == 0.0


def test_a_warm_up_starts_only_when_training_outlasts_the_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defs = build_definitions([shipped("minimal")], resources(tmp_path))
    everything: Any = SimpleNamespace(job_def=defs.resolve_job_def("minimal_all"))
    training: Any = SimpleNamespace(job_def=defs.resolve_job_def("minimal_train"))
    started: list[frozenset[str]] = []
    monkeypatch.setattr(warmup, "start", lambda assets: started.append(assets) or True)

    monkeypatch.setattr(warmup, "DELAY_SECONDS", 0.05)
    with warmup.while_training(everything, "minimal") as warmed:
        time.sleep(0.5)  # a training longer than the delay
    assert warmed() is True and started == [{"datamodels", "datamodel_eval"}]

    started.clear()
    monkeypatch.setattr(warmup, "DELAY_SECONDS", 0.5)
    with warmup.while_training(everything, "minimal") as warmed:
        pass  # shorter: the timer is cancelled
    time.sleep(0.7)
    assert warmed() is False and started == []

    monkeypatch.setattr(warmup, "DELAY_SECONDS", 0.0)
    with warmup.while_training(training, "minimal") as warmed:  # nothing to warm up
        time.sleep(0.2)
    monkeypatch.setenv("DM_WARMUP", "0")
    with warmup.while_training(everything, "minimal") as warmed_off:  # turned off
        time.sleep(0.2)
    assert warmed() is False and warmed_off() is False and started == []
