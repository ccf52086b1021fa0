"""train_models: worker processes per leased device, skipping, retries, crashes, progress, and
nothing left running after an interruption. Real processes throughout (the script is tiny).
The launcher core's pure parts are tested in test_launcher.py; how fast an interrupted call
stops is measured in benchmarks/fanout_bench.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dm_assets.store.spec import Spec
from dm_assets.store.store import Store, StoreError
from dm_assets.training.devices import DeviceLease, DeviceSlots, detect_devices
from dm_assets.training.local import split_contiguous, train_models
from dm_assets_tests.helpers import dead, wait_dead
from dm_assets_tests.scripts import launcher_cases

SCRIPT = "dm_assets_tests.scripts.launcher_cases"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    Store.initialize(path, Spec.from_dict(launcher_cases.SPEC)).close()
    return path


@pytest.fixture
def lease(tmp_path: Path):
    """Two CPU slots."""
    with DeviceSlots(tmp_path / "locks", detect_devices(0, cpu_slots=2)).acquire(2) as held:
        yield held


def train(store_dir: Path, indices, lease: DeviceLease, *script_args: str, **kwargs):
    kwargs.setdefault("commit_every", 0.0)
    return train_models(
        store_dir, list(indices), main_import=SCRIPT, script_args=script_args, lease=lease, **kwargs
    )


def stored(store_dir: Path) -> tuple[list[int], np.ndarray]:
    with Store.open(store_dir) as store:
        done = store.completed_indices().tolist()
        return done, np.array(store.read("pid"))


def assert_values(store_dir: Path, indices) -> None:
    with Store.open(store_dir) as store:
        values = store.read("value")
        for i in indices:
            assert store.is_completed(i)
            assert values[i] == launcher_cases.expected_value(i)


def test_split_contiguous() -> None:
    assert split_contiguous(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_contiguous([4], 3) == [[4]]
    assert split_contiguous([], 3) == []


def test_trains_every_index_one_process_per_device(store_dir: Path, lease, tmp_path) -> None:
    with Store.open(store_dir) as store:  # 0-2 done before: skipped, no process for them
        store.write_rows([(i, {"value": -1.0, "pid": 0}) for i in range(3)])
    calls: list[tuple[int, int]] = []
    report = train(
        store_dir,
        range(10),
        lease,
        threads_per_worker=1,
        env={"DM_TEST": "passed"},
        on_progress=lambda done, total: calls.append((done, total)),
    )
    assert report.ok and report.failed == {}
    assert report.trained == list(range(3, 10)) and report.skipped == [0, 1, 2]
    assert (report.rounds, report.processes) == (1, 2)
    assert sorted(report.seconds_per_model) == report.trained
    assert all(0 <= s < report.wall_seconds for s in report.seconds_per_model.values())
    assert calls[0] == (3, 10) and calls[-1] == (10, 10)
    assert_values(store_dir, range(3, 10))
    done, pids = stored(store_dir)
    assert done == list(range(10))
    assert len(set(pids[3:10].tolist())) == 2  # two worker processes, a chunk each
    assert pids[3] == pids[4] == pids[5] == pids[6] and pids[7] == pids[8] == pids[9]
    slots = set()
    for i in range(3, 10):
        env = json.loads((store_dir / "workers" / str(i) / "env.json").read_text())
        assert env["DM_DEVICE"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["OMP_NUM_THREADS"] == "1" and env["DM_TEST"] == "passed"
        slots.add(env["DM_DEVICE_SLOT"])
    assert slots == {d.name for d in lease.devices} == {"cpu:0", "cpu:1"}
    logs = sorted(p.name for p in (store_dir / "launcher_logs").iterdir())
    assert logs == ["3-6.round1.cpu0.log", "7-9.round1.cpu1.log"]
    assert "stored index(es)" in (store_dir / "launcher_logs" / logs[0]).read_text()
    assert "7 trained, 3 skipped" in report.summary()
    # all completed: nothing to start
    again = train(store_dir, range(10), lease)
    assert (again.skipped, again.trained, again.processes, again.rounds) == (
        list(range(10)),
        [],
        0,
        0,
    )


def test_retries_a_flaky_index_and_names_a_failing_one(store_dir: Path, lease) -> None:
    report = train(store_dir, range(8), lease, "--case.flaky=2", "--case.fail=5", retries=1)
    assert not report.ok
    assert list(report.failed) == [5] and "model 5 always fails" in report.failed[5]
    assert report.trained == [0, 1, 2, 3, 4, 6, 7]
    assert (report.rounds, report.processes) == (2, 4)  # round 2: one process each for 2 and 5
    assert_values(store_dir, report.trained)
    assert (store_dir / "launcher_logs" / "2-2.round2.cpu0.log").exists()
    assert "index 5: main() raised RuntimeError: model 5 always fails" in report.summary()


def test_crashed_worker_indices_are_retried(store_dir: Path, tmp_path: Path) -> None:
    # one device; the worker SIGKILLs itself at index 2 (first attempt): 0-1 stored, 2-5 lost
    with DeviceSlots(tmp_path / "locks", detect_devices(0)).acquire(1) as one:
        report = train(store_dir, range(6), one, "--case.crash=2", retries=0)
        assert report.trained == [0, 1] and sorted(report.failed) == [2, 3, 4, 5]
        reason = report.failed[3]
        assert reason.startswith("worker process exited with code -9 (killed by SIGKILL)")
        assert "last lines of" in reason and "stored index(es) 1" in reason
        assert sorted(report.seconds_per_model) == []  # that worker left no report
        # the same again with a retry: skipped 0-1, 2-5 trained in round 1 now (the same
        # arguments: another would be another training configuration, refused by the workers;
        # the crash happens on a first attempt only)
        report = train(store_dir, range(6), one, "--case.crash=2", retries=1)
        assert report.ok and report.skipped == [0, 1] and report.trained == [2, 3, 4, 5]
    assert_values(store_dir, range(6))


def test_crash_then_retry_in_one_call(store_dir: Path, lease) -> None:
    report = train(store_dir, range(8), lease, "--case.crash=1,6", retries=1)
    assert report.ok, report.summary()
    assert report.trained == list(range(8)) and (report.rounds, report.processes) == (2, 4)
    assert set(report.seconds_per_model) == {1, 2, 3, 6, 7}  # from round 2's reports
    assert_values(store_dir, range(8))


def test_worker_that_cannot_start_is_reported(store_dir: Path, lease) -> None:
    report = train_models(
        store_dir, [0, 1], main_import="no_such_module_xyz", lease=lease, retries=1
    )
    assert sorted(report.failed) == [0, 1] and report.rounds == 2
    assert "worker process exited with code 1: ModuleNotFoundError" in report.failed[0]


def test_interrupted_leaves_no_process_running(store_dir: Path, lease, tmp_path) -> None:
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()

    class StopError(Exception):
        pass

    def on_progress(done: int, total: int) -> None:
        if len(list(pids_dir.iterdir())) >= 4:  # two workers and their grandchildren started
            raise StopError

    with pytest.raises(StopError):
        train(
            store_dir,
            range(4),
            lease,
            "--case.sleep=30",
            "--case.grandchild",
            f"--case.pids={pids_dir}",
            on_progress=on_progress,
            progress_every=0.05,
        )
    pids = [int(p.name) for p in pids_dir.iterdir()]
    assert len(pids) == 4
    for pid in pids:
        wait_dead(pid, timeout=2)
    assert all(dead(pid) for pid in pids)
    assert stored(store_dir)[0] == []  # ended, not waited for: each model sleeps 30 s
    # and the slots are free again
    lease.release()
    lease.slots.acquire(2, min_count=2, timeout=2).release()


def test_bad_arguments(store_dir: Path, lease) -> None:
    with pytest.raises(ValueError) as info:
        train_models(
            store_dir,
            [0, -1],
            main_import="",
            lease=lease,
            retries=-1,
            progress_every=0,
            job_timeout=0,
        )
    for needle in ["indices", "main_import", "retries", "progress_every", "job_timeout"]:
        assert f"{needle}:" in str(info.value)
    with pytest.raises(StoreError, match=r"indices \[40\] are outside the store's range"):
        train_models(store_dir, [39, 40], main_import=SCRIPT, lease=lease)
    lease.release()
    with pytest.raises(ValueError, match="already released"):
        train_models(store_dir, [0], main_import=SCRIPT, lease=lease)
