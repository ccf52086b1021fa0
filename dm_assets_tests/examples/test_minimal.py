"""The seed's minimal example through the seed's command lines, checked as the seed checks it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dm_assets.store.store import Store
from dm_assets_tests.helpers import REPO_ROOT, cli_env, run_module

SPEC = REPO_ROOT / "dm_assets" / "examples" / "minimal" / "spec.json"
SCRIPT = "dm_assets.examples.minimal.train_minimal"


@pytest.mark.parametrize(
    "init_module", ["dm_assets.initialize_store", "dm_assets.initialize_logdir"]
)
def test_minimal_example_end_to_end(tmp_path: Path, init_module: str) -> None:
    logdir = tmp_path / "store"
    run_module(init_module, f"--logging.logdir={logdir}", f"--logging.spec={SPEC}", check=True)
    # the seed runs one worker process per index, two at a time (GNU parallel -j2)
    for first in range(0, 10, 2):
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dm_assets.worker",
                    f"--worker.index={i}",
                    f"--worker.main_import={SCRIPT}",
                    f"--worker.logdir={logdir}",
                    "--trainer.multiple=2",
                ],
                cwd=REPO_ROOT,
                env=cli_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for i in (first, first + 1)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
    proc = run_module(
        "dm_assets.examples.minimal.check",
        f"--checking.logdir={logdir}",
        "--trainer.multiple=2",
        check=True,
    )
    assert "checks all passed!" in proc.stdout
    rows = np.load(logdir / "random_numbers.npy", mmap_mode="r")
    assert rows.dtype == np.uint8 and rows.shape == (10, 256) and (rows == 2).all()
    assert np.load(logdir / "_completed.npy").all()
    # reinitializing keeps every row
    run_module(init_module, f"--logging.logdir={logdir}", f"--logging.spec={SPEC}", check=True)
    with Store.open(logdir) as store:
        assert store.status().completed == 10


def test_check_catches_wrong_rows(tmp_path: Path) -> None:
    logdir = tmp_path / "store"
    run_module(
        "dm_assets.initialize_store",
        f"--logging.logdir={logdir}",
        f"--logging.spec={SPEC}",
        check=True,
    )
    run_module(
        "dm_assets.worker",
        "--worker.indices=0-9",
        f"--worker.main_import={SCRIPT}",
        f"--worker.logdir={logdir}",
        "--trainer.multiple=3",
        check=True,
    )
    proc = run_module(
        "dm_assets.examples.minimal.check", f"--checking.logdir={logdir}", "--trainer.multiple=2"
    )
    assert proc.returncode == 1
    assert "rows [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] are not 256 copies of 2" in proc.stderr


def test_minimal_script_without_its_argument_fails_loudly(tmp_path: Path) -> None:
    """The seed's script validates fastargs with sys.exit() (exit 0); the worker must not."""
    logdir = tmp_path / "store"
    run_module(
        "dm_assets.initialize_store",
        f"--logging.logdir={logdir}",
        f"--logging.spec={SPEC}",
        check=True,
    )
    proc = run_module(
        "dm_assets.worker",
        "--worker.index=0",
        f"--worker.main_import={SCRIPT}",
        f"--worker.logdir={logdir}",
    )
    assert proc.returncode != 0
    assert "trainer.multiple" in proc.stdout + proc.stderr


def test_initialize_errors(tmp_path: Path, write_spec: Callable[[dict], Path]) -> None:
    bad = write_spec({"num_models": 0, "schema": {"../x": {"shape": [1], "dtype": "objectx"}}})
    proc = run_module(
        "dm_assets.initialize_store", f"--logging.logdir={tmp_path / 's'}", f"--logging.spec={bad}"
    )
    assert proc.returncode == 1
    assert "3 problem(s)" in proc.stderr and "'num_models'" in proc.stderr
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    good = write_spec({"num_models": 4, "schema": {"m": {"shape": [2], "dtype": "bool_"}}})
    other = write_spec({"num_models": 5, "schema": {"m": {"shape": [2], "dtype": "bool_"}}})
    run_module(
        "dm_assets.initialize_store",
        f"--logging.logdir={tmp_path / 's'}",
        f"--logging.spec={good}",
        check=True,
    )
    proc = run_module(
        "dm_assets.initialize_store",
        f"--logging.logdir={tmp_path / 's'}",
        f"--logging.spec={other}",
    )
    assert proc.returncode == 1
    assert "num_models: store has 4, new spec has 5" in proc.stderr
    proc = run_module("dm_assets.initialize_store", f"--logging.logdir={tmp_path / 's'}")
    assert proc.returncode == 2 and "--logging.spec" in proc.stderr
