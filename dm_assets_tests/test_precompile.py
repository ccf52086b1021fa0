"""``python -m dm_assets.precompile``, which set-up runs so that the first fit of a fresh
checkout does not compile the numba kernels inside its stages: in a fresh interpreter it
compiles (or loads from the cache) every kernel the stages call from Python, and set-up
runs it."""

from __future__ import annotations

import pytest

from dm_assets.precompile import compile_kernels
from dm_assets_tests.helpers import REPO_ROOT, run_probe

# The kernels the stages call from Python (the others are compiled into their callers, or are
# the tests' reference solver): the statistics' packing, 0/1 check, taking back a batch that
# is not 0/1, and popcounts, the path, the fixed-lambda solves of the refit and of
# cross-validation with their validation scores, the bootstrap's resampled scores.
CALLED_FROM_PYTHON = {
    "dm_assets.regression.bit_stats.pack_rows",
    "dm_assets.regression.bit_stats._all_binary",
    "dm_assets.regression.bit_stats._clear_rows",
    "dm_assets.regression.bit_stats.popcount_gram",
    "dm_assets.regression.cd_kernel.solve_paths",
    "dm_assets.regression.cd_kernel.solve_columns_screened",
    "dm_assets.regression.cd_kernel.sparse_quadratic_forms",
    "dm_assets.evaluation.uncertainty._resample_scores",
}

PROBE = """
import importlib, json
from numba.core.registry import CPUDispatcher
from dm_assets.precompile import KERNEL_MODULES, main

def compiled():
    out = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if isinstance(obj, CPUDispatcher) and obj.__module__ == name:
                out[f"{name}.{attr}"] = len(obj.signatures)
    return out

before = compiled()
code = main([])
print(json.dumps({"before": before, "after": compiled(), "code": code}))
"""


def test_precompile_compiles_every_kernel_the_stages_call() -> None:
    printed, result = run_probe(PROBE)
    assert result["code"] == 0
    assert any(line.startswith("precompile: numba kernels ready in") for line in printed)
    # a fresh interpreter: nothing compiled before, every kernel the stages call after
    assert set(result["before"]) >= CALLED_FROM_PYTHON
    assert all(count == 0 for count in result["before"].values())
    missing = {name for name in CALLED_FROM_PYTHON if result["after"][name] == 0}
    assert not missing, f"precompile left these kernels to the first fit: {sorted(missing)}"


def test_setup_runs_it() -> None:
    setup = (REPO_ROOT / "scripts" / "setup.sh").read_text()
    assert '"$VENV/bin/python" -m dm_assets.precompile' in setup
    for kernel in CALLED_FROM_PYTHON:
        module = kernel.rsplit(".", 1)[0].replace(".", "/") + ".py"
        assert module in setup, f"setup does not recompile when {module} changes"


def test_an_unknown_step_is_refused_before_anything_runs() -> None:
    with pytest.raises(ValueError, match=r"unknown precompile steps \['fit'\]"):
        compile_kernels(only=["fit"])


def test_a_failed_helper_is_reported_and_this_process_compiles_everything() -> None:
    # the helper cannot start its interpreter (exit 1): the command still succeeds, having run
    # every step itself, and says what failed
    probe = """
import contextlib, io, json, sys
sys.executable = "/bin/false"
from dm_assets.precompile import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main([])
print(json.dumps({"code": code, "stderr": err.getvalue()}))
"""
    printed, result = run_probe(probe)
    assert result["code"] == 0
    assert "the helper process failed (exit 1)" in result["stderr"]
    assert any("(one process; this one's steps: fit_gram" in line for line in printed)
