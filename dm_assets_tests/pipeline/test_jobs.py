"""The one table of an experiment's jobs and the Dagster jobs built from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dagster as dg
import pytest

from dm_assets.pipeline.experiment import Experiment, load_experiments
from dm_assets.pipeline.jobs import JobSpec, experiment_jobs, job_specs
from dm_assets_tests.helpers import resources


def shipped(name: str) -> Experiment:
    return next(e for e in load_experiments(extra="") if e.name == name)


def test_the_table_of_an_unsliced_experiment() -> None:
    minimal = shipped("minimal")
    specs = job_specs(minimal)
    assert [s.name for s in specs] == ["minimal_train", "minimal_fit", "minimal_all"]
    train, fit, everything = specs
    models = tuple(minimal.partition_keys())
    assert train.asset_names == ("store", "model_outputs") and train.partition_keys == models
    expected_fit = ("regression_dataset", "datamodels")
    if minimal.evaluation is not None:
        expected_fit += ("datamodel_eval",)
    assert fit.asset_names == expected_fit and fit.partition_keys == ()
    assert everything.group == "minimal" and everything.asset_names == ()
    assert everything.partition_keys == models
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.name = "other"  # type: ignore[misc]


def test_an_experiment_without_regression_only_trains() -> None:
    minimal = shipped("minimal")
    bare = dataclasses.replace(minimal, regression=None, evaluation=None)
    assert [s.name for s in job_specs(bare)] == ["minimal_train", "minimal_all"]


def test_the_dagster_jobs_follow_the_table() -> None:
    minimal = shipped("minimal")
    jobs = experiment_jobs(minimal)
    specs = job_specs(minimal)
    assert [j.name for j in jobs] == [s.name for s in specs]
    for job, spec in zip(jobs, specs, strict=True):
        assert job.description is not None and job.description.startswith(spec.description)
    by_name: dict[str, JobSpec] = {s.name: s for s in specs}
    train = next(j for j in jobs if j.name == "minimal_train")
    assert train.selection == dg.AssetSelection.assets(
        *(dg.AssetKey(["minimal", a]) for a in by_name["minimal_train"].asset_names)
    )


def test_each_description_names_what_the_job_materializes(tmp_path: Path) -> None:
    from dm_assets.pipeline.assets import experiment_assets

    experiments = load_experiments(extra="")
    assert {"minimal", "digits"} <= {e.name for e in experiments}
    for experiment in experiments:
        definitions = dg.Definitions(
            assets=experiment_assets(experiment), resources=resources(tmp_path)
        )
        graph = definitions.resolve_asset_graph()
        for job in experiment_jobs(experiment):
            # the assets the job's selection resolves to, as Dagster resolves it
            selected = {key.path[-1] for key in job.selection.resolve(graph)}
            assert job.description is not None
            named = job.description.split("Materializes: ", 1)[-1].rstrip(".").split(", ")
            assert sorted(named) == sorted(selected), (job.name, job.description)
