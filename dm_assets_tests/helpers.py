"""Helpers shared by the test modules (no test module imports another):

- the repository root and running the command lines as a user would (in a subprocess);
- datamodels-shaped regression problems with planted sparse weights, and a small real fit;
- process liveness for the tests that kill things;
- resources and result accessors for in-process Dagster materializations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dm_assets.regression.compute_datamodels import compute_datamodels, write_outputs
from dm_assets.regression.config import load_config
from dm_assets.regression.data import ArraySource

if TYPE_CHECKING:  # dagster only where a test materializes: the `cuda` tests run without it
    import dagster as dg

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


def run_probe(code: str, timeout: float = 600) -> tuple[list[str], Any]:
    """Run ``code`` in a fresh interpreter from the repository root (it must succeed and print
    a JSON document on its last line); the lines before, and that document."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    *printed, last = done.stdout.strip().splitlines()
    return printed, json.loads(last)


@dataclass
class Problem:
    """Masks ``x`` bool ``(n, p)``, targets ``y`` float32 ``(n, t)``, planted ``w`` ``(p, t)``."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def planted_problem(
    *,
    n: int = 3000,
    p: int = 150,
    t: int = 4,
    density: float = 0.05,
    noise: float = 0.5,
    seed: int = 0,
    alpha: float = 0.5,
) -> Problem:
    """Masks with inclusion probability ``alpha``; targets from ``density``-sparse weights plus
    Gaussian noise of ``noise`` times the signal's standard deviation. 70/15/15 split."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, p)) < alpha
    w = np.zeros((p, t))
    k = max(1, round(density * p))
    for j in range(t):
        support = rng.choice(p, k, replace=False)
        w[support, j] = rng.normal(size=k) + np.sign(rng.normal(size=k))
    signal = x @ w
    y = (signal + noise * signal.std(0) * rng.normal(size=signal.shape) + 3.0).astype(np.float32)
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    rows = np.arange(n)
    return Problem(
        x, y, w, rows[:n_train], rows[n_train : n_train + n_val], rows[n_train + n_val :]
    )


def standardize(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x_std, mean, std)`` with the column statistics of ``rows`` (constant columns: std 1)."""
    xf = x.astype(np.float64)
    mean = xf[rows].mean(0)
    std = xf[rows].std(0)
    std[std < 1e-12] = 1.0
    return (xf - mean) / std, mean, std


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_small_fit(out_dir: Path, *, n_targets: int = 4, k: int = 8, seed: int = 21) -> Path:
    """A real fit (gram solver on CPU, ~0.1 s) of a planted problem, written by write_outputs."""
    prob = planted_problem(n=900, p=24, t=n_targets, seed=seed)
    config = load_config(
        None,
        {
            "data": {"data_path": "unused", "num_train": 600, "num_val": 150},
            "cfg": {
                "k": k,
                "batch_size": 150,
                "out_dir": str(out_dir),
                "device": "cpu",
                "solver": "gram",
            },
        },
    )
    fit = compute_datamodels(config, source=ArraySource(prob.x, prob.y))
    return write_outputs(fit, out_dir, config)


def resources(home: Path) -> dict[str, dg.ConfigurableResource]:
    from dm_assets.pipeline.definitions import default_resources

    found = default_resources(str(home))
    found["devices"] = found["devices"].model_copy(update={"cpu_slots": 2})
    trainer = found["trainer"]
    found["trainer"] = trainer.model_copy(update={"devices": found["devices"]})
    return found


def metadata(result: dg.ExecuteInProcessResult, name: str, asset: str) -> dict:
    node = f"{name}__{asset}"
    found = result.asset_materializations_for_node(node)
    assert found, f"no materialization of {node}"
    return {k: v.value for k, v in found[-1].metadata.items()}


def checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}


def dead(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not dead(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.02)


def sigint_default() -> None:
    """``preexec_fn`` for a child a test interrupts with SIGINT: the signal's default
    disposition back, so Python installs its KeyboardInterrupt handler in the child even when
    the tests run with SIGINT ignored (started as a background job: ``cmd &`` in a
    non-interactive shell ignores SIGINT, and the children inherit it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
