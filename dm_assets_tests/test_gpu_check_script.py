"""benchmarks/gpu_check.sh, the one command a GPU machine runs: its CPU twin at tiny sizes
(the CIFAR-10 timing and the paper-scale regression's parts, checked for correctness, not
speed), and its exit status when a part times out or there is no GPU."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dm_assets_tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"


def run_script(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT)],
        env={**os.environ, "OUT": str(out), "PY": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def statuses(out: Path) -> dict[str, str]:
    summary = json.loads((out / "gpu_check.json").read_text())
    return {part["part"]: part["status"] for part in summary["parts"]}


@pytest.mark.slow  # three Python processes, one of them training a (tiny) network
def test_tiny_run_measures_every_part_correctly(tmp_path: Path) -> None:
    proc = run_script(tmp_path, GPU_CHECK_TINY="1", CIFAR_LOADER="memory")
    assert proc.returncode == 0, proc.stderr
    assert statuses(tmp_path) == {
        "gpu": "passed",
        "python": "passed",
        "cifar10_gpu_resident": "passed",
        "paper_scale": "passed",
    }
    cifar = json.loads((tmp_path / "cifar10_gpu.json").read_text())
    assert cifar["tiny"] and len(cifar["model_seconds"]) == 1 and cifar["problems"] == []
    assert cifar["loader"].startswith("DeviceImages")
    report = json.loads((tmp_path / "paper_scale_tiny.json").read_text())
    assert report["skipped"] == [] and report["shape"]["p"] == 96
    stats = report["stats"]
    assert stats["xtx_equal"] and stats["gram_product_equal"]
    assert stats["xty_max_relative_difference"] == 0.0
    (path,) = report["path"]["attempts"]
    assert path["p"] == 96 and path["targets"] == 8 and path["iterations"] > 0
    assert path["planted_support_recovered"] == 1.0
    assert path["weight_correlation_with_planted"] > 0.95
    projection = report["projection"]
    gemm = report["gemm"]
    factor = gemm["float64_t40"]["seconds"] / gemm["float64_t8"]["seconds"]
    assert abs(projection["path_seconds"] - path["path_seconds"] * factor) < 1e-9
    assert (
        abs(
            projection["total_seconds_int8_stats"]
            - projection["path_seconds"]
            - stats["int8_seconds"] / stats["rows"] * 3_000
        )
        < 1e-9
    )
    assert set(report["machine"]) >= {"platform", "cpus", "torch", "load_before", "load_after"}


def test_a_part_that_times_out_fails_the_check(tmp_path: Path) -> None:
    # a Python that answers the script's probes but hangs on real work
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/bin/sh\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\nexec sleep 60\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    proc = run_script(
        out,
        GPU_CHECK_TINY="1",
        CIFAR_LOADER="memory",
        PY=str(fake),
        CIFAR_SECONDS="1",
        REGRESSION_SECONDS="1",
    )
    assert proc.returncode == 1
    found = statuses(out)
    assert found["cifar10_gpu_resident"] == found["paper_scale"] == "timed_out"
    assert json.loads((out / "gpu_check.json").read_text())["exit_status"] == 1


def test_no_gpu_is_exit_status_2(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ["bash", "dirname", "mktemp", "mkdir", "date", "basename"]:
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    proc = run_script(tmp_path / "out", PATH=str(bin_dir))
    assert proc.returncode == 2
    assert "nvidia-smi found no GPU" in proc.stderr
