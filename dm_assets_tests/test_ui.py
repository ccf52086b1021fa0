"""The MLflow UI command serves this project's runs: per-lambda metrics and the artifacts,
read back through the server's REST API on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dm_assets.pipeline.resources.mlflow_tracking import MlflowTracking
from dm_assets.regression.path_metrics import step_metrics
from dm_assets_tests.helpers import REPO_ROOT, cli_env, write_small_fit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_ui_serves_the_regularization_path(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fit_dir = write_small_fit(tmp_path / "fit", k=8)
    run_id = MlflowTracking(home=str(home)).log_regression(
        experiment="small", fit_dir=fit_dir, run_name="small fit", tags={"dagster.run_id": "r1"}
    )
    port = free_port()
    env = {**cli_env(), "DM_HOME": str(home)}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "dm_assets.ui", "mlflow", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow ui did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        found = get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=small")
        experiment_id = found["experiment"]["experiment_id"]
        runs = get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
        assert [r["info"]["run_id"] for r in runs["runs"]] == [run_id]
        history = get(
            f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}"
            "&metric_key=path/mean_val_mse"
        )["metrics"]
        import pandas as pd

        expected = step_metrics(pd.read_csv(fit_dir / "regularization_path.csv"), 4)
        assert [m["step"] for m in sorted(history, key=lambda m: m["step"])] == list(
            expected["step"]
        )
        listed = get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}")
        names = {f["path"] for f in listed["files"]}
        assert {"regularization_path.png", "regularization_path.csv"} <= names
        assert "datamodels.pt" not in names  # the weights stay in the fit folder
        with urllib.request.urlopen(
            f"{base}/get-artifact?path=regularization_path.png&run_uuid={run_id}", timeout=10
        ) as response:
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
