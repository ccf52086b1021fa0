"""Open the Dagster or MLflow UI on this project's data (``$DM_HOME``), on 127.0.0.1.

    python -m dm_assets.ui dagster [--port 3000]   # dagster dev -w workspace.yaml
    python -m dm_assets.ui mlflow  [--port 5000]   # mlflow ui on $DM_HOME/mlflow.db

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
# Dagster metadata (dm_assets.pipeline.resources.mlflow_tracking) point here
MLFLOW_UI_URL = f"http://{HOST}:{MLFLOW_PORT}"


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
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dm_assets.ui", description=__doc__)
    parser.add_argument("which", choices=["dagster", "mlflow"])
    parser.add_argument("--port", type=int, default=None, help="default 3000 / 5000")
    args = parser.parse_args(argv)
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
