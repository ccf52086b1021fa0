"""A training script for the launcher tests (the local and SLURM launchers): it fails, crashes or
sleeps for chosen indices, and records which process and device slot trained each model.

Spec: ``value`` float64 (``index * 1.5``) and ``pid`` int64 (the worker process). Each model's
``logdir`` also gets ``env.json``: the device variables its worker ran with. Arguments:

- ``--case.fail=I,J``: ``main`` raises for these indices, every time.
- ``--case.flaky=I,J``: raises for these on their first attempt only (a marker in the logdir).
- ``--case.crash=I,J``: the worker process SIGKILLs itself at these on their first attempt only.
- ``--case.sleep=S``: sleep ``S`` seconds in every ``main``.
- ``--case.grandchild``: also start a ``sleep`` child process, recording its pid, to check that
  it is ended along with its worker.
- ``--case.pids=DIR``: write ``DIR/<pid>`` for each worker (and grandchild) process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

SPEC = {
    "num_models": 40,
    "schema": {
        "value": {"shape": [], "dtype": "float64"},
        "pid": {"shape": [], "dtype": "int64"},
    },
}
ENV_KEYS = ("DM_DEVICE_SLOT", "DM_DEVICE", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "DM_TEST")


def expected_value(index: int) -> float:
    return index * 1.5


def _indices(text: str | None) -> set[int]:
    return {int(i) for i in text.split(",")} if text else set()


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case.fail", dest="fail", default=None)
    parser.add_argument("--case.flaky", dest="flaky", default=None)
    parser.add_argument("--case.crash", dest="crash", default=None)
    parser.add_argument("--case.sleep", dest="sleep", type=float, default=0.0)
    parser.add_argument("--case.grandchild", dest="grandchild", action="store_true")
    parser.add_argument("--case.pids", dest="pids", default=None)
    return parser.parse_args()


_grandchild: subprocess.Popen[bytes] | None = None


def _first_attempt(logdir: Path, what: str) -> bool:
    marker = logdir / f"{what}-attempted"
    if marker.exists():
        return False
    marker.touch()
    return True


def main(index: int, logdir: str) -> dict[str, object]:
    global _grandchild
    args = _args()
    directory = Path(logdir)
    env = {key: os.environ[key] for key in ENV_KEYS if key in os.environ}
    (directory / "env.json").write_text(json.dumps(env))
    if args.pids:
        Path(args.pids, str(os.getpid())).touch()
    if args.grandchild and _grandchild is None:
        _grandchild = subprocess.Popen(["sleep", "60"])
        if args.pids:
            Path(args.pids, str(_grandchild.pid)).touch()
    if index in _indices(args.crash) and _first_attempt(directory, "crash"):
        os.kill(os.getpid(), signal.SIGKILL)
    if index in _indices(args.flaky) and _first_attempt(directory, "flaky"):
        raise RuntimeError(f"model {index} is flaky: first attempt fails")
    if index in _indices(args.fail):
        raise RuntimeError(f"model {index} always fails")
    if args.sleep:
        time.sleep(args.sleep)
    return {"value": np.float64(expected_value(index)), "pid": np.int64(os.getpid())}
