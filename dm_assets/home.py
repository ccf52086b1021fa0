"""Where dm_assets keeps its data: ``DM_HOME`` (default ``.dm/`` in the working directory).

Layout::

    $DM_HOME/
      <experiment>/            one folder per experiment (store/, data.beton, fits/, datamodels)
      mlflow.db                MLflow's tracking database (SQLite)
      mlflow-artifacts/        MLflow's artifacts, one folder per MLflow experiment
      locks/                   device-slot lock files shared by concurrent runs on this machine
      dagster/                 the Dagster instance (DAGSTER_HOME) the launch command uses
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = ".dm"


def dm_home(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else ``$DM_HOME``, else ``.dm`` in the working directory; always absolute."""
    chosen = path if path not in (None, "") else os.environ.get("DM_HOME") or DEFAULT_HOME
    return Path(chosen).expanduser().resolve()


def mlflow_tracking_uri(home: str | os.PathLike[str] | None = None) -> str:
    """The default MLflow tracking URI: a SQLite database in ``DM_HOME``."""
    return f"sqlite:///{dm_home(home) / 'mlflow.db'}"


def mlflow_artifact_root(home: str | os.PathLike[str] | None = None) -> Path:
    return dm_home(home) / "mlflow-artifacts"


def lock_dir(home: str | os.PathLike[str] | None = None) -> Path:
    return dm_home(home) / "locks"
