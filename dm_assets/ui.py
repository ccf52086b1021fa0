"""Open the Dagster or MLflow UI on this project's data (``$DM_HOME``), on 127.0.0.1.

    python -m dm_assets.ui dagster [--port 3000] [--mlflow-port 5000]  # dagster dev
    python -m dm_assets.ui mlflow  [--port 5000]   # mlflow ui on $DM_HOME/mlflow.db

The Dagster metadata links into the MLflow UI (``mlflow_run``, ``mlflow_ui``) at
``$DM_MLFLOW_UI_URL``, default http://127.0.0.1:5000; ``--mlflow-port`` sets it for the runs the
Dagster UI starts (serve MLflow on another port with ``mlflow --port N`` and Dagster with
``--mlflow-port N``).

The Dagster UI serves the storage of the instance ``python -m dm_assets.launch`` and
``dagster job launch`` use (``$DAGSTER_HOME``, default ``$DM_HOME/dagster``, prepared with the
shipped ``dm_assets/dagster.yaml``), so it shows the runs launched from the command line,
through an instance of its own, ``$DAGSTER_HOME/ui``
(:func:`dm_assets.pipeline.runs.prepare_ui_dagster_home`): its runs and backfills are queued,
and the daemon that ``dagster dev`` starts beside the webserver starts them (the queue within a
second; a backfill's next stage at the backfill daemon's next tick, every 30 s).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dm_assets.home import dm_home, mlflow_artifact_root, mlflow_tracking_uri
from dm_assets.pipeline.runs import REPO_ROOT, prepare_ui_dagster_home

HOST = "127.0.0.1"
DAGSTER_PORT = 3000
MLFLOW_PORT = 5000
# where `python -m dm_assets.ui mlflow` serves the MLflow UI by default: the links in the
# Dagster metadata (dm_assets.pipeline.resources.mlflow_tracking) point here unless
# MLFLOW_UI_URL_ENV names another address
MLFLOW_UI_URL = f"http://{HOST}:{MLFLOW_PORT}"
MLFLOW_UI_URL_ENV = "DM_MLFLOW_UI_URL"


def mlflow_ui_url() -> str:
    """Where the Dagster metadata's links open the MLflow UI: ``$DM_MLFLOW_UI_URL``, else
    :data:`MLFLOW_UI_URL`."""
    return (os.environ.get(MLFLOW_UI_URL_ENV) or MLFLOW_UI_URL).rstrip("/")


def command(which: str, port: int, host: str = HOST) -> list[str]:
    """The command line that serves ``which`` (``dagster`` or ``mlflow``)."""
    bindir = Path(sys.executable).parent
    if which == "dagster":
        return [
            str(bindir / "dagster"),
            "dev",
            "-w",
            str(REPO_ROOT / "workspace.yaml"),
            "-h",
            host,
            "-p",
            str(port),
        ]
    return [
        str(bindir / "mlflow"),
        "ui",
        "--backend-store-uri",
        mlflow_tracking_uri(),
        "--artifacts-destination",
        mlflow_artifact_root().as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        # one user's local UI: MLflow's default of 4 workers takes minutes to start on 2 busy
        # cores, its supervisor restarting them
        "--workers",
        "1",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dm_assets.ui", description=__doc__)
    parser.add_argument("which", choices=["dagster", "mlflow"])
    parser.add_argument("--port", type=int, default=None, help="default 3000 / 5000")
    parser.add_argument(
        "--mlflow-port",
        type=int,
        default=None,
        help=f"dagster only: the port of the MLflow UI the metadata links open (default: "
        f"${MLFLOW_UI_URL_ENV}, else {MLFLOW_PORT})",
    )
    args = parser.parse_args(argv)
    if args.mlflow_port is not None:
        if args.which != "dagster":
            parser.error("--mlflow-port goes with `dagster`; serve MLflow with `mlflow --port N`")
        os.environ[MLFLOW_UI_URL_ENV] = f"http://{HOST}:{args.mlflow_port}"
    port = args.port or (DAGSTER_PORT if args.which == "dagster" else MLFLOW_PORT)
    if args.which == "dagster":
        prepare_ui_dagster_home()
    dm_home().mkdir(parents=True, exist_ok=True)
    argv_ = command(args.which, port)
    print(f"serving {args.which} on http://{HOST}:{port} (data: {dm_home()})", flush=True)
    os.chdir(REPO_ROOT)
    os.execv(argv_[0], argv_)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
