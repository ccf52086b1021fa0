"""Shared fixtures: running the command lines as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_module(
    module: str, *args: str, timeout: float = 120, cwd: Path | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """``python -m module args...`` from the repository root, output captured."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or REPO_ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {args} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[dict], Path]:
    """Write a spec dict to a JSON file in tmp_path and return its path."""
    counter = iter(range(1_000_000))

    def write(spec: dict) -> Path:
        path = tmp_path / f"spec{next(counter)}.json"
        path.write_text(json.dumps(spec))
        return path

    return write
