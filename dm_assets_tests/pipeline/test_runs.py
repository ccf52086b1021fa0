"""reap_dead_runs: runs whose recorded run worker process is dead are failed (and their pool
slots freed); a run with no recorded process is never failed for its age once it started (a
healthy long run), only a run stuck STARTING past the instance's run-monitoring start timeout,
as Dagster's own run monitoring does."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import EngineEventData

from dm_assets.pipeline import runs
from dm_assets.pipeline.runs import reap_dead_runs

DAY = 86400.0


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as found:
        found.event_log_storage.set_concurrency_slots("gpu", 8)
        yield found


def add_run(
    instance: dg.DagsterInstance, status: dg.DagsterRunStatus, pid: int | None = None
) -> str:
    """A run in ``status`` holding a ``gpu`` slot, its run worker ``pid`` recorded as
    Dagster's launchers record it (an engine event with the pid in its metadata)."""
    run = instance.add_run(dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4()), status=status))
    if pid is not None:
        instance.report_engine_event(
            f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
        )
    instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "fit")
    return run.run_id


def status(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRunStatus:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return run.status


def a_day_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every clock read by the reaper a day ahead: every run is old."""
    now = time.time() + DAY
    monkeypatch.setattr(runs, "_now", lambda: now, raising=False)
    monkeypatch.setattr(runs.time, "time", lambda: now)


def test_healthy_long_run_without_a_recorded_pid_is_left_alone(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = add_run(instance, dg.DagsterRunStatus.STARTED)  # e.g. launched in process
    a_day_later(monkeypatch)
    assert reap_dead_runs(instance) == []
    monkeypatch.undo()
    assert status(instance, started) == dg.DagsterRunStatus.STARTED
    holders = instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
    assert holders == {started}


def test_run_whose_recorded_worker_is_dead_is_failed(instance: dg.DagsterInstance) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass", "dagster"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dagster"])
    try:
        gone = add_run(instance, dg.DagsterRunStatus.STARTED, dead.pid)
        healthy = add_run(instance, dg.DagsterRunStatus.STARTED, alive.pid)
        assert reap_dead_runs(instance) == [gone]
        assert status(instance, gone) == dg.DagsterRunStatus.FAILURE
        assert status(instance, healthy) == dg.DagsterRunStatus.STARTED
        failure = instance.all_logs(gone, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert f"its run worker (pid {dead.pid}) is gone" in (failure[-1].message or "")
        holders = instance.event_log_storage.get_concurrency_info("gpu").active_run_ids
        assert holders == {healthy}
    finally:
        alive.kill()
        alive.wait()


def test_run_stuck_starting_past_the_start_timeout_is_failed(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = add_run(instance, dg.DagsterRunStatus.STARTING)
    assert reap_dead_runs(instance) == []  # within the start timeout
    a_day_later(monkeypatch)
    assert reap_dead_runs(instance) == [fresh]
    monkeypatch.undo()
    assert status(instance, fresh) == dg.DagsterRunStatus.FAILURE
    failure = instance.all_logs(fresh, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert "did not start its run worker within" in (failure[-1].message or "")
