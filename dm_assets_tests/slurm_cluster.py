"""A real single-node SLURM cluster for the session (``scripts/slurm_cluster.sh``), in its own
folder and on free ports, so that test sessions running at once do not share one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dm_assets_tests.helpers import REPO_ROOT, cli_env

SCRIPT = REPO_ROOT / "scripts" / "slurm_cluster.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo")


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster: ``env`` points SLURM's commands at it (``SLURM_CONF``) and makes
    the test scripts importable in its tasks."""

    folder: Path
    conf: Path
    env: dict[str, str]
    start_seconds: float

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60
        )


def _missing_binaries() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _free_port_pair() -> int:
    """A port ``p`` with ``p`` and ``p + 1`` free on 127.0.0.1 (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Start the cluster once per session and stop it after the last test. Skipped only when
    SLURM or munge is not installed; a cluster that fails to start fails the tests with its
    daemons' logs."""
    missing = _missing_binaries()
    if missing:
        pytest.skip(
            f"SLURM test cluster: {', '.join(missing)} not installed "
            "(apt-get install slurm-wlm munge, or scripts/setup.sh)"
        )
    folder = tmp_path_factory.mktemp("slurm", numbered=True)
    script_env = {
        **os.environ,
        "DM_SLURM_DIR": str(folder),
        "DM_SLURM_PORT": str(_free_port_pair()),
        "PATH": os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]),
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [str(SCRIPT), "start"], env=script_env, capture_output=True, text=True, timeout=180
    )
    seconds = time.perf_counter() - started
    try:
        if proc.returncode != 0:
            pytest.fail(
                f"the SLURM test cluster did not start (exit {proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}",
                pytrace=False,
            )
        env = {
            "SLURM_CONF": str(folder / "slurm.conf"),
            "PYTHONPATH": cli_env()["PYTHONPATH"],
            "PATH": script_env["PATH"],
        }
        yield SlurmCluster(folder, folder / "slurm.conf", env, seconds)
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=script_env, capture_output=True, timeout=60)
