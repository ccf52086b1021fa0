"""Experiments with ``launcher: {kind: slurm}`` through the asset graph: training partitions run
as SLURM job arrays, and a terminated Dagster run leaves no job in the queue; and the
SlurmTrainer resource on its own in a Dagster run."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from dm_assets.pipeline.assets import experiment_assets
from dm_assets.pipeline.experiment import ExperimentPaths, load_experiment
from dm_assets.pipeline.resources.trainers import SlurmTrainer, Trainer
from dm_assets.store.store import Store
from dm_assets_tests.helpers import REPO_ROOT, cli_env, metadata, resources, sigint_default
from dm_assets_tests.scripts import launcher_cases
from dm_assets_tests.slurm_cluster import SlurmCluster

SCRIPT = "dm_assets_tests.scripts.launcher_cases"


def write_experiment(folder: Path, name: str, args: list[str], num_models: int = 12) -> Path:
    path = folder / f"{name}.yaml"
    spec = {**launcher_cases.SPEC, "num_models": num_models}
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "spec": spec,
                "trainer": {"main_import": SCRIPT, "args": args, "retries": 1},
                "models_per_partition": 6,
                "launcher": {"kind": "slurm", "indices_per_task": 3, "poll_seconds": 0.3},
            }
        )
    )
    return path


@pytest.mark.slurm
def test_slurm_experiment_trains_its_partitions_as_job_arrays(
    tmp_path: Path, slurm_cluster: SlurmCluster
) -> None:
    experiment = load_experiment(write_experiment(tmp_path, "on_slurm", ["--case.flaky=4"]))
    assert experiment.launcher.kind == "slurm"
    home = tmp_path / "home"
    found = resources(home)
    found["slurm_trainer"] = SlurmTrainer(env=slurm_cluster.env)  # experiment overrides the rest
    assets = experiment_assets(experiment)
    keys = experiment.partition_keys()
    result = dg.materialize(
        assets,
        resources=found,
        instance=dg.DagsterInstance.ephemeral(),
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )
    assert result.success
    training = metadata(result, "on_slurm", "model_outputs")
    assert training["run_trained"] == 12 and training["run_failed"] == 0
    with Store.open(home / "on_slurm" / "store") as store:
        assert store.completed_indices().tolist() == list(range(12))
        values = store.read("value")
        assert [values[i] for i in range(12)] == [
            launcher_cases.expected_value(i) for i in range(12)
        ]
    # 12 models, 3 per task: 4 array tasks, then model 4 (flaky) again in a second array
    arrays = sorted((home / "on_slurm" / "launcher_logs" / "slurm").iterdir())
    assert len(arrays) == 2
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""


@pytest.mark.slurm
@pytest.mark.slow
def test_terminated_run_cancels_its_slurm_jobs(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    write_experiment(experiments, "sleepy_slurm", ["--case.sleep=3"], num_models=24)
    env = {
        **cli_env(),
        **slurm_cluster.env,
        "DM_HOME": str(tmp_path / "home"),
        "DM_EXPERIMENTS": str(experiments),
        "DAGSTER_HOME": str(tmp_path / "home" / "dagster"),
    }
    launch = subprocess.Popen(
        [sys.executable, "-m", "dm_assets.launch", "sleepy_slurm_train"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_default,
    )
    deadline = time.monotonic() + 120
    while not slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip():
        assert launch.poll() is None, launch.communicate()[0]
        assert time.monotonic() < deadline, "no SLURM job was submitted"
        time.sleep(0.3)
    launch.send_signal(signal.SIGINT)
    output, _ = launch.communicate(timeout=120)
    assert launch.returncode != 0, output
    assert re.search(r"terminating run", output), output
    deadline = time.monotonic() + 60
    while slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip():
        assert time.monotonic() < deadline, slurm_cluster.run("squeue").stdout
        time.sleep(0.5)


@pytest.mark.slurm
def test_slurm_trainer_resource(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    source = tmp_path / "slurm_case.yaml"
    source.write_text(
        yaml.safe_dump(
            {
                "name": "slurm_case",
                "spec": launcher_cases.SPEC,
                "trainer": {
                    "main_import": SCRIPT,
                    "args": ["--case.flaky=2"],
                    "retries": 1,
                    "commit_every": 0,
                },
                "models_per_partition": 5,
            }
        )
    )
    experiment = load_experiment(source)
    paths = ExperimentPaths(tmp_path / "home" / "slurm_case")
    Store.initialize(paths.store, experiment.spec).close()
    trainer = SlurmTrainer(indices_per_task=3, poll_seconds=0.3, env=slurm_cluster.env)
    assert isinstance(trainer, Trainer)
    progress: list[tuple[int, int]] = []

    @dg.asset
    def trained(context, trainer: SlurmTrainer) -> dg.MaterializeResult:
        report = trainer.train(
            experiment,
            paths,
            range(5, 10),
            log=context.log,
            on_progress=lambda done, total: progress.append((done, total)),
        )
        return dg.MaterializeResult(
            metadata={"trained": report.trained, "failed": len(report.failed)}
        )

    result = dg.materialize([trained], resources={"trainer": trainer})
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["trained"].value == [5, 6, 7, 8, 9] and metadata["failed"].value == 0
    assert progress[0] == (0, 5) and progress[-1] == (5, 5)
    report = trainer.train(experiment, paths, range(0, 5), log=logging.getLogger("test"))
    assert report.ok and report.rounds == 2  # 2 is flaky: fails once, then trained
    with Store.open(paths.store) as store:
        values = store.read("value")
        for i in range(10):
            assert store.is_completed(i), i
            assert values[i] == launcher_cases.expected_value(i)
    assert (paths.launcher_logs / "slurm").is_dir()
