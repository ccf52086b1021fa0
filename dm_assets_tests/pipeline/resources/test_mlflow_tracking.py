"""MlflowTracking: a real fit logged to a fresh SQLite store in tmp_path, read back with MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dm_assets.pipeline.resources.mlflow_tracking import FIT_DIR_TAG, WEIGHTS_TAG, MlflowTracking
from dm_assets.regression.path_metrics import STEP_METRIC_COLUMNS, step_metrics
from dm_assets_tests.helpers import PNG_SIGNATURE, REPO_ROOT, cli_env, write_small_fit

# what a run holds by default: the fit's small files and the plot, not its weights
ARTIFACTS = [
    "config.yaml",
    "regularization_path.csv",
    "regularization_path.png",
    "summary.json",
]


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in an empty directory with no DM_HOME or MLflow settings from the environment."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name in ("DM_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    return cwd


def test_log_a_real_fit(tmp_path: Path, in_tmp_cwd: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    global_uri = mlflow.get_tracking_uri()
    fit_dir = write_small_fit(tmp_path / "fits" / "fit-0", n_targets=5, k=10)
    home = tmp_path / "home"
    tracking = MlflowTracking(home=str(home))
    assert tracking.resolved_tracking_uri() == f"sqlite:///{home / 'mlflow.db'}"
    assert tracking.ui_command() == (
        f"mlflow ui --backend-store-uri sqlite:///{home / 'mlflow.db'} "
        f"--artifacts-destination {(home / 'mlflow-artifacts').as_uri()} "
        "--host 127.0.0.1 --port 5000"
    )
    default = tracking.client().get_experiment("0")
    assert default.name == "Default"
    assert default.artifact_location == (home / "mlflow-artifacts" / "0").as_uri()
    tags = {"dagster/run_id": "abc123", "dagster/asset_key": "datamodels", "partition": "0"}

    run_id = tracking.log_regression(
        experiment="synthetic",
        fit_dir=fit_dir,
        run_name="synthetic-0",
        tags=tags,
        # cfg.k agrees with the config: allowed; a long value is cut to MLflow's 6000 characters
        params={"dm.partition": "0", "cfg.k": 10, "dm.note": "x" * 7000},
    )
    assert isinstance(run_id, str)
    # a second run in the same experiment reuses it (no new experiment, no error)
    second = tracking.log_regression(
        experiment="synthetic", fit_dir=fit_dir, run_name="synthetic-0-again", tags={}
    )
    assert second is not None and second != run_id

    client = MlflowClient(tracking_uri=tracking.resolved_tracking_uri())
    experiment = client.get_experiment_by_name("synthetic")
    assert experiment is not None
    assert experiment.artifact_location == (home / "mlflow-artifacts" / "synthetic").as_uri()
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "FINISHED" and run.info.run_name == "synthetic-0"
    assert run.info.artifact_uri.startswith((home / "mlflow-artifacts" / "synthetic").as_uri())
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([run_id, second])

    # params: the config flattened as section.key, the summary's text values, the caller's
    config = yaml.safe_load((fit_dir / "config.yaml").read_text())
    summary = json.loads((fit_dir / "summary.json").read_text())
    params = run.data.params
    for section, values in config.items():
        for key, value in values.items():
            assert params[f"{section}.{key}"] == str(value), (section, key)
    assert params["cfg.solver"] == "gram" and params["summary.solver"] == "gram"
    assert params["dm.partition"] == "0"
    assert params["dm.note"] == "x" * 5997 + "..."

    # one metric point per lambda step for each step_metrics column
    table = pd.read_csv(fit_dir / "regularization_path.csv")
    expected = step_metrics(table, summary["n_targets"])
    for column in STEP_METRIC_COLUMNS[1:]:
        history = sorted(client.get_metric_history(run_id, f"path/{column}"), key=lambda m: m.step)
        assert [m.step for m in history] == expected["step"].tolist(), column
        np.testing.assert_allclose(
            [m.value for m in history], expected[column], rtol=1e-12, err_msg=column
        )

    # final metrics: the numbers of summary.json
    numbers = {
        k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    assert {"mean_val_r2", "mean_nonzeros", "seconds", "mean_lambda_over_max"} <= set(numbers)
    for key, value in numbers.items():
        assert run.data.metrics[f"final/{key}"] == pytest.approx(value, rel=1e-12), key
    assert "final/solver" not in run.data.metrics

    # artifacts: the fit's small files unchanged, and the plot; the weights stay in the fit
    # folder, referenced by a tag and a param (copied only with log_weights=True)
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ARTIFACTS
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "download")))
    for name in ("config.yaml", "regularization_path.csv", "summary.json"):
        assert (local / name).read_bytes() == (fit_dir / name).read_bytes(), name
    assert (local / "regularization_path.png").read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in fit_dir.iterdir()) == sorted(
        {"config.yaml", "datamodels.pt", "regularization_path.csv", "summary.json"}
    )
    assert not (local / "datamodels.pt").exists()

    # tags: the caller's, the fit directory and its weights; the fit directory as a param too
    for key, value in tags.items():
        assert run.data.tags[key] == value
    assert run.data.tags[FIT_DIR_TAG] == str(fit_dir.resolve())
    assert run.data.tags[WEIGHTS_TAG] == str(fit_dir.resolve() / "datamodels.pt")
    assert params[FIT_DIR_TAG] == str(fit_dir.resolve())

    # nothing in the working directory, global MLflow state untouched
    assert list(in_tmp_cwd.iterdir()) == []
    assert not Path("mlruns").exists() and not Path("mlflow.db").exists()
    assert mlflow.get_tracking_uri() == global_uri
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_log_weights_copies_the_weights(tmp_path: Path, in_tmp_cwd: Path) -> None:
    from mlflow import MlflowClient

    fit_dir = write_small_fit(tmp_path / "fit", n_targets=2, k=5)
    tracking = MlflowTracking(home=str(tmp_path / "home"), log_weights=True)
    run_id = tracking.log_regression(experiment="e", fit_dir=fit_dir, run_name="r", tags={})
    assert run_id is not None
    client = MlflowClient(tracking_uri=tracking.resolved_tracking_uri())
    assert sorted(a.path for a in client.list_artifacts(run_id)) == sorted(
        [*ARTIFACTS, "datamodels.pt"]
    )
    local = Path(client.download_artifacts(run_id, "datamodels.pt", str(tmp_path / "dl")))
    assert local.read_bytes() == (fit_dir / "datamodels.pt").read_bytes()
    assert client.get_run(run_id).data.tags[WEIGHTS_TAG] == str(fit_dir.resolve() / "datamodels.pt")


def test_disabled_logs_nothing(tmp_path: Path, in_tmp_cwd: Path) -> None:
    tracking = MlflowTracking(home=str(tmp_path / "home"), enabled=False)
    run_id = tracking.log_regression(
        experiment="synthetic", fit_dir=tmp_path / "absent", run_name="r", tags={}
    )
    assert run_id is None
    assert not (tmp_path / "home").exists() and list(in_tmp_cwd.iterdir()) == []


def test_incomplete_fit_dir_and_bad_arguments(tmp_path: Path, in_tmp_cwd: Path) -> None:
    fit_dir = write_small_fit(tmp_path / "fit", n_targets=2, k=5)
    tracking = MlflowTracking(home=str(tmp_path / "home"))
    (fit_dir / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['summary.json'\].*write_outputs"):
        tracking.log_regression(experiment="e", fit_dir=fit_dir, run_name="r", tags={})
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        tracking.log_regression(experiment="e", fit_dir=tmp_path / "no", run_name="r", tags={})
    fit_dir = write_small_fit(tmp_path / "fit2", n_targets=2, k=5)
    with pytest.raises(ValueError, match=r"experiment='a/b' cannot name"):
        tracking.log_regression(experiment="a/b", fit_dir=fit_dir, run_name="r", tags={})
    with pytest.raises(ValueError, match=r"params\['cfg.k'\]=99 contradicts the fit's cfg.k=5"):
        tracking.log_regression(
            experiment="e", fit_dir=fit_dir, run_name="r", tags={}, params={"cfg.k": 99}
        )
    # every check runs before the store is opened: no empty runs, no database
    assert not (tmp_path / "home").exists() and list(in_tmp_cwd.iterdir()) == []


def test_failure_midway_marks_the_run_failed(
    tmp_path: Path, in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    import dm_assets.evaluation.figures as figures

    def broken_plot(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("no display")

    monkeypatch.setattr(figures, "plot_path", broken_plot)
    fit_dir = write_small_fit(tmp_path / "fit", n_targets=2, k=5)
    tracking = MlflowTracking(home=str(tmp_path / "home"))
    with pytest.raises(RuntimeError, match="no display"):
        tracking.log_regression(experiment="e", fit_dir=fit_dir, run_name="r", tags={})
    client = MlflowClient(tracking_uri=tracking.resolved_tracking_uri())
    experiment = client.get_experiment_by_name("e")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "path/mean_val_mse" in run.data.metrics  # what was logged before the failure stays


def test_importing_the_resource_does_not_import_mlflow() -> None:
    code = (
        "import sys, dm_assets.pipeline.resources.mlflow_tracking; "
        "assert 'mlflow' not in sys.modules, 'mlflow imported'; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


CONCURRENT_LOGGER = """
import sys
from pathlib import Path
from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking
tracking = MlflowTracking(home=sys.argv[1])
print(tracking.log_regression(
    experiment="shared", fit_dir=Path(sys.argv[2]), run_name=sys.argv[3], tags={}
))
"""


@pytest.mark.slow
def test_processes_share_a_fresh_store(tmp_path: Path, in_tmp_cwd: Path) -> None:
    """Without the lock around opening the store, MLflow's migrations of a new SQLite file race
    and processes fail (one or both of two, in each of three tries on a 2-core machine)."""
    from mlflow import MlflowClient

    fit_dir = write_small_fit(tmp_path / "fit", n_targets=2, k=5)
    home = tmp_path / "home"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_LOGGER, str(home), str(fit_dir), f"p{i}"],
            cwd=in_tmp_cwd,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    run_ids = {out.strip().splitlines()[-1] for out, _ in outputs}
    client = MlflowClient(tracking_uri=MlflowTracking(home=str(home)).resolved_tracking_uri())
    experiment = client.get_experiment_by_name("shared")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in runs} == run_ids and len(run_ids) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    assert list(in_tmp_cwd.iterdir()) == []


def test_a_fit_with_a_manifest_logs_its_lineage(tmp_path: Path, in_tmp_cwd: Path) -> None:
    from mlflow import MlflowClient

    from dm_assets.regression.fit import MANIFEST_FILE, FitFolder
    from dm_assets.regression.manifest import FitManifest, configuration_summary

    fit_dir = write_small_fit(tmp_path / "fit", n_targets=2, k=5)
    manifest = FitManifest(
        train_indices=np.arange(600),
        val_indices=np.arange(600, 750),
        dataset={"path": "/d.beton", "bytes": 1, "rows": 900, "digest": "sha256:dataset"},
        rows={"digest": "sha256:rows", "source": "store", "count": 750},
        regression={},
        targets=(0, 2),
        configurations={
            0: {"fingerprint": "f" * 64, "configuration": {}},
            1: {"fingerprint": "e" * 64, "configuration": {}},
        },
        configuration_ids=configuration_summary(np.r_[np.zeros(700), np.ones(50)]),
        code={"dm_assets": "0.1.0", "git_commit": "abc"},
    )
    (fit_dir / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict()))
    tracking = MlflowTracking(home=str(tmp_path / "home"))
    run_id = tracking.log_regression(
        experiment="traced", fit_dir=fit_dir, run_name="traced-0", tags={}
    )
    assert run_id is not None
    run = MlflowClient(tracking_uri=tracking.resolved_tracking_uri()).get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert params["manifest.train_models"] == "600" and params["manifest.val_models"] == "150"
    assert params["manifest.dataset_digest"] == "sha256:dataset"
    assert params["manifest.configuration_ids"] == "0,1" and params["manifest.mixed"] == "true"
    assert params["manifest.configuration_fingerprints"] == f"0:{'f' * 64},1:{'e' * 64}"
    assert tags["dm_assets.dataset_digest"] == "sha256:dataset"
    assert tags["dm_assets.rows_digest"] == "sha256:rows"
    assert tags["dm_assets.configuration_ids"] == "0,1"
    # the run's id is recorded in the fit's manifest, and the logged copy has it too
    assert FitFolder.open(fit_dir).manifest().mlflow_run_id == run_id
    logged = Path(run.info.artifact_uri.removeprefix("file://")) / MANIFEST_FILE
    assert json.loads(logged.read_text())["mlflow_run_id"] == run_id


def test_the_run_spans_the_fit_and_describes_it(tmp_path: Path, in_tmp_cwd: Path) -> None:
    import time

    from mlflow import MlflowClient

    fit_dir = write_small_fit(tmp_path / "fit", n_targets=3, k=5)
    tracking = MlflowTracking(home=str(tmp_path / "home"))
    client = MlflowClient(tracking_uri=tracking.resolved_tracking_uri())

    # the caller says when the fit started: the run starts then, 19 s before it was logged
    started = time.time() - 19.0
    run_id = tracking.log_regression(
        experiment="described",
        fit_dir=fit_dir,
        run_name="described-0",
        tags={"dagster.run_id": "abc", "dagster.partition": ""},
        started_at=started,
    )
    assert run_id is not None
    run = client.get_run(run_id)
    assert run.info.start_time == int(started * 1000)
    assert run.info.end_time is not None and run.info.end_time - run.info.start_time >= 19_000
    # no empty tag for a fit without a partition
    assert run.data.tags["dagster.run_id"] == "abc"
    assert "dagster.partition" not in run.data.tags
    # the description: experiment, models, targets, fit folder
    note = run.data.tags["mlflow.note.content"]
    assert "described" in note and str(fit_dir.resolve()) in note
    assert "600 training models" in note and "150 validation models" in note
    assert "3 targets" in note

    # without started_at the run starts when the fit folder says the fit started: the
    # summary's mtime (written as the fit ends) less the fit's seconds
    summary = json.loads((fit_dir / "summary.json").read_text())
    ended = time.time() - 100.0
    os.utime(fit_dir / "summary.json", (ended, ended))
    again = tracking.log_regression(
        experiment="described", fit_dir=fit_dir, run_name="described-1", tags={}
    )
    assert again is not None
    start = client.get_run(again).info.start_time
    assert abs(start - (ended - summary["seconds"]) * 1000) <= 1


def test_run_links_open_the_run_in_the_mlflow_ui(tmp_path: Path, in_tmp_cwd: Path) -> None:
    import dagster as dg
    from mlflow import MlflowClient

    from dm_assets.ui import MLFLOW_UI_URL, command

    # the URL is the one `python -m dm_assets.ui mlflow` serves
    served = command("mlflow", 5000)
    host, port = served[served.index("--host") + 1], served[served.index("--port") + 1]
    assert f"http://{host}:{port}" == MLFLOW_UI_URL

    fit_dir = write_small_fit(tmp_path / "fit", n_targets=2, k=5)
    tracking = MlflowTracking(home=str(tmp_path / "home"))
    run_id = tracking.log_regression(
        experiment="linked", fit_dir=fit_dir, run_name="linked-0", tags={}
    )
    assert run_id is not None
    experiment_id = (
        MlflowClient(tracking_uri=tracking.resolved_tracking_uri())
        .get_run(run_id)
        .info.experiment_id
    )
    links = tracking.run_links(run_id)
    assert links["mlflow_run_id"] == dg.MetadataValue.text(run_id)
    assert links["mlflow_run"] == dg.MetadataValue.url(
        f"{MLFLOW_UI_URL}/#/experiments/{experiment_id}/runs/{run_id}"
    )
    assert links["mlflow_ui"] == dg.MetadataValue.url(
        f"{MLFLOW_UI_URL}/#/experiments/{experiment_id}"
    )
    assert MlflowTracking(enabled=False).run_links(run_id) == {}

    # an MLflow UI on another port: `python -m dm_assets.ui dagster --mlflow-port N` sets this
    # for the runs the Dagster UI starts
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DM_MLFLOW_UI_URL", "http://127.0.0.1:5123/")
        assert tracking.run_links(run_id)["mlflow_run"] == dg.MetadataValue.url(
            f"http://127.0.0.1:5123/#/experiments/{experiment_id}/runs/{run_id}"
        )


def test_a_new_store_is_a_copy_of_a_migrated_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow migrates a new SQLite file through its whole schema history (seconds): a new
    store is a copy of one migrated empty database per MLflow version, its Default experiment
    pointed at the store's artifact root; with no usable cache MLflow migrates the file
    itself, with the same result."""
    import mlflow

    cache = tmp_path / "cache"
    monkeypatch.setenv("DM_CACHE", str(cache))
    for name in ("a", "b"):
        home = tmp_path / name
        client = MlflowTracking(home=str(home)).client()
        assert client.get_experiment("0").artifact_location == (
            (home / "mlflow-artifacts" / "0").as_uri()
        )
        run = client.create_run(MlflowTracking(home=str(home)).experiment_id(client, "e"))
        client.log_metric(run.info.run_id, "m", 1.0)
        assert client.get_metric_history(run.info.run_id, "m")[0].value == 1.0
    assert (cache / f"mlflow-{mlflow.__version__}-empty.db").is_file()

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("DM_CACHE", str(blocked))
    home = tmp_path / "c"
    client = MlflowTracking(home=str(home)).client()
    assert client.get_experiment("0").artifact_location == (
        (home / "mlflow-artifacts" / "0").as_uri()
    )
    assert not list(home.glob(".mlflow.db.*"))
