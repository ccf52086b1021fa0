"""train_models_slurm against a real single-node SLURM cluster (see conftest.py): job arrays of
groups of indices, a killed task retried, a failing index named with SLURM's word on it, and
every job cancelled when the launcher is interrupted. What SLURM's commands print is parsed in
test_slurm_parsing.py on recorded text; the SlurmTrainer resource is tested with the asset graph
(pipeline/assets/test_slurm_graph.py)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets.training.slurm import (
    SbatchOptions,
    SlurmCancelledError,
    SlurmError,
    train_models_slurm,
)
from dm_assets_tests.helpers import dead, wait_dead
from dm_assets_tests.scripts import launcher_cases
from dm_assets_tests.slurm_cluster import SlurmCluster

SCRIPT = "dm_assets_tests.scripts.launcher_cases"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    Store.initialize(path, Spec.from_dict(launcher_cases.SPEC)).close()
    return path


@pytest.fixture
def job_name(request: pytest.FixtureRequest) -> str:
    """A job name of this test's own, to find its jobs in the queue."""
    return "dmtest_" + re.sub(r"[^\w]+", "_", request.node.name)[:40]


def train(store_dir: Path, cluster: SlurmCluster, indices, *script_args: str, **kwargs):
    kwargs.setdefault("commit_every", 0.0)
    kwargs.setdefault("poll", 0.3)
    kwargs.setdefault("indices_per_task", 4)
    return train_models_slurm(
        store_dir,
        list(indices),
        main_import=SCRIPT,
        script_args=script_args,
        env=cluster.env,
        **kwargs,
    )


def arrays(store_dir: Path) -> list[Path]:
    """The submitted arrays' folders, in submission order."""
    return sorted((store_dir / "launcher_logs" / "slurm").iterdir())


def queued(cluster: SlurmCluster, name: str) -> list[str]:
    """squeue's lines (default states: pending, running, completing, ...) for jobs named
    ``name``."""
    proc = cluster.run("squeue", "--noheader", f"--name={name}", "--format=%i %T")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n") if proc.stdout.strip() else []


def assert_values(store_dir: Path, indices) -> None:
    with Store.open(store_dir) as store:
        values = store.read("value")
        for i in indices:
            assert store.is_completed(i), i
            assert values[i] == launcher_cases.expected_value(i)


def test_arguments_checked_at_once(store_dir: Path) -> None:
    with pytest.raises(ValueError) as info:
        train_models_slurm(
            store_dir,
            [0, -1],
            main_import="",
            retries=-1,
            indices_per_task=0,
            poll=0,
            sbatch=SbatchOptions(time_limit="soon", cpus_per_task=0, mem="lots"),
        )
    text = str(info.value)
    for name in ("indices", "main_import", "retries", "indices_per_task", "poll"):
        assert f"{name}:" in text
    for name in ("time_limit", "cpus_per_task", "mem"):
        assert f"sbatch.{name}:" in text
    args = SbatchOptions(partition="gpu", gpus_per_task=1, mem="8G", extra=("--qos=low",)).args()
    assert args == [
        "--job-name=dm_assets",
        "--partition=gpu",
        "--gpus-per-task=1",
        "--mem=8G",
        "--qos=low",
    ]


@pytest.mark.slurm
def test_trains_every_index_in_groups_of_an_array(
    store_dir: Path, slurm_cluster: SlurmCluster, job_name: str
) -> None:
    with Store.open(store_dir) as store:  # done before: skipped, in no task
        store.write_rows([(i, {"value": -1.0, "pid": 0}) for i in (0, 1)])
    calls: list[tuple[int, int]] = []
    report = train(
        store_dir,
        slurm_cluster,
        range(14),
        sbatch=SbatchOptions(job_name=job_name),
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert report.ok, report.summary()
    assert report.trained == list(range(2, 14))
    assert report.skipped == [0, 1]
    assert (report.rounds, report.processes) == (1, 3)
    assert sorted(report.seconds_per_model) == report.trained
    assert_values(store_dir, range(2, 14))
    (folder,) = arrays(store_dir)
    assert (folder / "groups.txt").read_text() == "2-5\n6-9\n10-13\n"
    assert (folder / "job_id").read_text().strip().isdigit()
    assert sorted(p.name for p in folder.glob("task_*.json")) == [
        f"task_{k}.json" for k in range(3)
    ]
    with Store.open(store_dir) as store:
        pids = np.array(store.read("pid"))
    for group in ([2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]):  # one worker process per group
        assert len(set(pids[group].tolist())) == 1
    assert len(set(pids[2:14].tolist())) == 3
    assert calls[0] == (2, 14) and calls[-1] == (14, 14)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert queued(slurm_cluster, job_name) == []


@pytest.mark.slurm
def test_killed_task_is_retried(store_dir: Path, slurm_cluster: SlurmCluster) -> None:
    # the worker training index 6 SIGKILLs itself on the first attempt: 4-5 are stored, 6-7 not
    report = train(store_dir, slurm_cluster, range(12), "--case.crash=6", retries=1)
    assert report.ok, report.summary()
    assert report.trained == list(range(12))
    assert (report.rounds, report.processes) == (2, 4)
    assert_values(store_dir, range(12))
    first, second = arrays(store_dir)
    assert (second / "groups.txt").read_text() == "6-7\n"
    assert not (first / "task_1.json").exists()  # killed: no report
    assert "crash-attempted" in {p.name for p in (store_dir / "workers" / "6").iterdir()}


@pytest.mark.slurm
def test_failing_indices_named_with_slurm_reason(
    store_dir: Path, slurm_cluster: SlurmCluster
) -> None:
    # 3 raises every time; the task of 8-11 is killed at 9, and with no retry 9-11 stay undone
    report = train(
        store_dir, slurm_cluster, range(12), "--case.fail=3", "--case.crash=9", retries=0
    )
    assert sorted(report.failed) == [3, 9, 10, 11]
    assert report.trained == [0, 1, 2, 4, 5, 6, 7, 8]
    assert_values(store_dir, report.trained)
    assert "model 3 always fails" in report.failed[3]
    assert re.search(r"SLURM task \d+_0 ended FAILED", report.failed[3])
    for i in (9, 10, 11):
        reason = report.failed[i]
        assert re.search(
            r"SLURM task \d+_2 ended FAILED \(.*killed by signal 9 \(SIGKILL\)\)", reason
        )
        assert "last lines of" in reason and "task_2.log" in reason
        assert "indices 8-11" in reason  # the task's header line, from its log
    assert "index 3: main() raised RuntimeError" in report.summary()


@pytest.mark.slurm
def test_sbatch_refusal_is_an_error(store_dir: Path, slurm_cluster: SlurmCluster) -> None:
    with pytest.raises(SlurmError, match=r"sbatch .* exited 1: .*[Pp]artition"):
        train(store_dir, slurm_cluster, range(4), sbatch=SbatchOptions(partition="nope"))


@pytest.mark.slurm
def test_task_that_never_starts_fails_with_its_reason(
    store_dir: Path, slurm_cluster: SlurmCluster, job_name: str
) -> None:
    # the test cluster's partition "short" allows 1 minute: a task asking for 5 pends forever
    options = SbatchOptions(partition="short", time_limit="5", job_name=job_name)
    report = train(store_dir, slurm_cluster, range(6), sbatch=options, retries=2)
    assert sorted(report.failed) == list(range(6))
    assert report.rounds == 1  # not retried: it would pend again
    for reason in report.failed.values():
        assert re.search(r"SLURM task \d+_[01] never started: .* reason PartitionTimeLimit", reason)
    assert queued(slurm_cluster, job_name) == []
    with Store.open(store_dir) as store:
        assert store.status().completed == 0


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["exception", "cancel_event"])
def test_interrupted_cancels_every_job(
    store_dir: Path, slurm_cluster: SlurmCluster, job_name: str, tmp_path: Path, how: str
) -> None:
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    cancel = threading.Event()

    def on_progress(done: int, total: int) -> None:
        if any(pids_dir.iterdir()):  # a task is training; the others run or wait in the queue
            if how == "exception":
                raise KeyboardInterrupt
            cancel.set()

    expected = KeyboardInterrupt if how == "exception" else SlurmCancelledError
    started = time.monotonic()
    with pytest.raises(expected):
        train(
            store_dir,
            slurm_cluster,
            range(6),
            "--case.sleep=60",
            f"--case.pids={pids_dir}",
            indices_per_task=1,
            sbatch=SbatchOptions(job_name=job_name),
            on_progress=on_progress,
            cancel_event=cancel,
        )
    assert time.monotonic() - started < 30
    assert queued(slurm_cluster, job_name) == []
    pids = [int(p.name) for p in pids_dir.iterdir()]
    assert pids
    for pid in pids:
        wait_dead(pid, timeout=10)
    assert all(dead(pid) for pid in pids)
    with Store.open(store_dir) as store:
        assert store.status().completed == 0
