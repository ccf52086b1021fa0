"""The worker command line: pass-through arguments, validation, skipping, timeouts, many indices."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets.training.runner import parse_indices
from dm_assets_tests.helpers import REPO_ROOT, cli_env, run_module
from dm_assets_tests.scripts import outputs

SCRIPT = "dm_assets_tests.scripts.outputs"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    Store.initialize(path, Spec.from_dict(outputs.SPEC)).close()
    return path


def worker(store_dir: Path, *args: str, timeout: float = 120):
    return run_module("dm_assets.worker", f"--worker.logdir={store_dir}", *args, timeout=timeout)


def data_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.npy"))}


def assert_row(store_dir: Path, index: int, scale: float = 1.0) -> None:
    with Store.open(store_dir) as store:
        assert store.is_completed(index)
        for key, value in outputs.expected(index, scale).items():
            np.testing.assert_array_equal(store.read(key)[index], value)


def test_single_index(store_dir: Path) -> None:
    proc = worker(store_dir, "--worker.index=4", f"--worker.main_import={SCRIPT}")
    assert proc.returncode == 0, proc.stderr
    assert_row(store_dir, 4)
    with Store.open(store_dir) as store:
        assert store.completed_indices().tolist() == [4]
    assert (store_dir / "workers" / "4" / "done.txt").read_text() == "ok"
    assert "--worker.index=4" in (store_dir / "cmds.txt").read_text()


def test_arguments_reach_the_script_untouched(store_dir: Path, tmp_path: Path) -> None:
    argv_out = tmp_path / "argv.txt"
    script_args = ["--script.scale", "2.5", f"--script.argv_out={argv_out}"]
    proc = worker(
        store_dir,
        "--worker.index",
        "3",
        *script_args[:2],
        f"--worker.main_import={SCRIPT}",
        script_args[2],
        "--worker.job_timeout=60",
    )
    assert proc.returncode == 0, proc.stderr
    assert argv_out.read_text().split() == script_args
    assert_row(store_dir, 3, scale=2.5)


def test_seed_fastargs_script_gets_its_sections(tmp_path: Path) -> None:
    store_dir = tmp_path / "seed"
    Store.initialize(
        store_dir,
        Spec.from_dict(
            {"num_models": 4, "schema": {"random_numbers": {"shape": [256], "dtype": "uint8"}}}
        ),
    ).close()
    proc = worker(
        store_dir,
        "--worker.indices=0-3",
        "--worker.main_import=dm_assets_tests.scripts.seed_style",
        "--trainer.multiple=3",
        "--trainer.offset",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    rows = np.load(store_dir / "random_numbers.npy")
    assert (rows == 5).all()


def test_seed_script_missing_required_section_argument_fails(tmp_path: Path) -> None:
    store_dir = tmp_path / "seed"
    Store.initialize(
        store_dir,
        Spec.from_dict(
            {"num_models": 2, "schema": {"random_numbers": {"shape": [256], "dtype": "uint8"}}}
        ),
    ).close()
    proc = worker(
        store_dir, "--worker.index=0", "--worker.main_import=dm_assets_tests.scripts.seed_style"
    )
    assert proc.returncode != 0
    assert "trainer.multiple" in proc.stdout + proc.stderr
    assert not Store.open(store_dir).is_completed(0)


@pytest.mark.parametrize(
    ("mode", "needles"),
    [
        ("missing_key", ["missing key(s) ['flags']"]),
        ("extra_key", ["unexpected key(s) ['surprise']"]),
        ("completed_key", ["'_completed' is reserved"]),
        (
            "bad_shape",
            [
                "key 'values'",
                "expected shape [4] dtype float32",
                "received shape [1, 4] dtype float32",
            ],
        ),
        ("float_into_bool", ["key 'flags'", "floats do not go into a bool array"]),
        ("nan", ["key 'values'", "non-finite"]),
        ("not_a_dict", ["must return a dict"]),
        ("raise", ["RuntimeError", "training of model 6 blew up"]),
    ],
)
def test_bad_outputs_write_nothing(store_dir: Path, mode: str, needles: list[str]) -> None:
    before = data_bytes(store_dir)
    proc = worker(
        store_dir, "--worker.index=6", f"--worker.main_import={SCRIPT}", f"--script.mode={mode}"
    )
    assert proc.returncode == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert data_bytes(store_dir) == before
    assert not (store_dir / "cmds.txt").exists()


def test_completed_index_skipped_unless_asked(store_dir: Path) -> None:
    assert worker(store_dir, "--worker.index=2", f"--worker.main_import={SCRIPT}").returncode == 0
    # another --script.scale is another training configuration: allowed here with mix (the
    # default, refuse, is tested in test_changed_configuration_refused_by_default)
    proc = worker(
        store_dir,
        "--worker.index=2",
        f"--worker.main_import={SCRIPT}",
        "--script.scale=3",
        "--worker.on_change=mix",
    )
    assert proc.returncode == 0
    assert "already completed" in proc.stderr
    assert_row(store_dir, 2, scale=1.0)
    proc = worker(
        store_dir,
        "--worker.index=2",
        f"--worker.main_import={SCRIPT}",
        "--script.scale=3",
        "--worker.do_if_complete",
        "--worker.on_change=mix",
    )
    assert proc.returncode == 0, proc.stderr
    assert_row(store_dir, 2, scale=3.0)
    proc = worker(
        store_dir,
        "--worker.index=2",
        f"--worker.main_import={SCRIPT}",
        "--script.scale=4",
        "--worker.do_if_complete=false",
        "--worker.on_change=mix",
    )
    assert proc.returncode == 0 and "already completed" in proc.stderr
    assert_row(store_dir, 2, scale=3.0)


@pytest.mark.parametrize("mode", ["sleep", "swallow", "ignore_timeout"])
def test_timeout_fails_and_leaves_index_incomplete(store_dir: Path, mode: str) -> None:
    proc = worker(
        store_dir,
        "--worker.index=1",
        f"--worker.main_import={SCRIPT}",
        f"--script.mode={mode}",
        "--worker.job_timeout=1",
        "--worker.kill_grace=2",
        timeout=60,
    )
    assert proc.returncode == 124, proc.stderr
    assert "timeout" in proc.stderr
    with Store.open(store_dir) as store:
        assert not store.is_completed(1)
        assert not store.read("values")[1].any()


def test_many_indices_in_one_process(store_dir: Path, tmp_path: Path) -> None:
    argv_out = tmp_path / "argv.txt"
    proc = worker(
        store_dir,
        "--worker.indices=0-5,9,3",
        f"--worker.main_import={SCRIPT}",
        "--script.mode=raise",
        "--script.bad=2,4",
        f"--script.argv_out={argv_out}",
    )
    assert proc.returncode == 1
    assert "5 trained, 0 skipped (completed), 2 failed: indices [2, 4]" in proc.stderr
    with Store.open(store_dir) as store:
        assert store.completed_indices().tolist() == [0, 1, 3, 5, 9]
    for i in (0, 1, 3, 5, 9):
        assert_row(store_dir, i)
    assert len(argv_out.read_text().splitlines()) == 7  # 3 was listed twice, trained once
    # a rerun trains only what is missing (without the failure-injecting arguments: another
    # training configuration, so mix)
    proc = worker(
        store_dir,
        "--worker.indices=0-5,9",
        f"--worker.main_import={SCRIPT}",
        "--worker.on_change=mix",
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 trained, 5 skipped" in proc.stderr
    assert len((store_dir / "cmds.txt").read_text().splitlines()) == 7


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--worker.index=1"], "--worker.main_import"),
        ([f"--worker.main_import={SCRIPT}"], "one of the arguments --worker.index"),
        (
            ["--worker.index=1", "--worker.indices=2", f"--worker.main_import={SCRIPT}"],
            "not allowed with",
        ),
        (["--worker.indices=3-1", f"--worker.main_import={SCRIPT}"], "bad index list part"),
        (["--worker.index=20", f"--worker.main_import={SCRIPT}"], "outside the store's range"),
        (
            ["--worker.index=1", f"--worker.main_import={SCRIPT}", "--worker.idx=3"],
            "unknown worker option",
        ),
        (
            ["--worker.index=1", f"--worker.main_import={SCRIPT}", "--worker.job_timeout=0"],
            "job_timeout",
        ),
    ],
)
def test_usage_errors(store_dir: Path, args: list[str], needle: str) -> None:
    proc = worker(store_dir, *args)
    assert proc.returncode == 2
    assert needle in proc.stderr, proc.stderr


def test_missing_store_and_module(tmp_path: Path, store_dir: Path) -> None:
    proc = worker(tmp_path / "nowhere", "--worker.index=0", f"--worker.main_import={SCRIPT}")
    assert proc.returncode == 1 and "no store at" in proc.stderr
    proc = worker(store_dir, "--worker.index=0", "--worker.main_import=no_such_module_xyz")
    assert proc.returncode != 0 and "no_such_module_xyz" in proc.stderr
    proc = worker(store_dir, "--worker.index=0", "--worker.main_import=json")
    assert proc.returncode == 1 and "has no callable main" in proc.stderr
    # json imports fine and has no main: the worker found the module and refused it for
    # lacking main, rather than failing to import it
    assert not callable(getattr(json, "main", None))
    assert "module 'json' has no callable main(index, logdir)" in proc.stderr


def test_parse_indices() -> None:
    assert parse_indices("0-3,7,5-6,2") == [0, 1, 2, 3, 7, 5, 6]
    assert parse_indices("12") == [12]
    for bad in ["", "a", "3-", "5-2", "1,,2", "-1"]:
        with pytest.raises(ValueError, match="bad index list part"):
            parse_indices(bad)


def test_group_commit_stores_everything(store_dir: Path) -> None:
    proc = worker(
        store_dir,
        "--worker.indices=0-9",
        f"--worker.main_import={SCRIPT}",
        "--worker.commit_every=60",
        "--script.mode=raise",
        "--script.bad=9",
    )
    assert proc.returncode == 1
    assert "stored index(es) 0,1,2,3,4,5,6,7,8" in proc.stderr  # one group, after the failure
    with Store.open(store_dir) as store:
        assert store.completed_indices().tolist() == list(range(9))
    assert len((store_dir / "cmds.txt").read_text().splitlines()) == 9


def test_report_file(store_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text("stale")  # replaced whole
    proc = worker(
        store_dir,
        "--worker.indices=0-3",
        f"--worker.main_import={SCRIPT}",
        f"--worker.report={report}",
        "--script.mode=raise",
        "--script.bad=2",
    )
    assert proc.returncode == 1
    data = json.loads(report.read_text())
    assert data["exit_code"] == 1 and "error" not in data
    assert [(o["index"], o["status"]) for o in data["outcomes"]] == [
        (0, "trained"),
        (1, "trained"),
        (2, "failed"),
        (3, "trained"),
    ]
    assert "training of model 2 blew up" in data["outcomes"][2]["message"]
    assert all(o["seconds"] >= 0 for o in data["outcomes"])
    assert data["outcomes"][0]["message"] == ""
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file
    # a rerun (another configuration: no failure-injecting arguments): 0, 1, 3 skipped, 2
    # trained, exit 0
    proc = worker(
        store_dir,
        "--worker.indices=0-3",
        f"--worker.main_import={SCRIPT}",
        f"--worker.report={report}",
        "--worker.on_change=mix",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["exit_code"] == 0
    assert [o["status"] for o in data["outcomes"]] == ["skipped", "skipped", "trained", "skipped"]


def test_report_written_when_the_worker_itself_fails(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = worker(
        tmp_path / "nowhere",
        "--worker.indices=0-3",
        f"--worker.main_import={SCRIPT}",
        f"--worker.report={report}",
    )
    assert proc.returncode == 1
    data = json.loads(report.read_text())
    assert data["exit_code"] == 1 and data["outcomes"] == []
    assert data["error"].startswith("StoreError: no store at")


# ---------------------------------------------------------------- training configurations
def ids_and_args(store_dir: Path) -> tuple[list[int], dict[int, dict[str, str]]]:
    with Store.open(store_dir) as store:
        return store.configuration_ids().tolist(), {
            cid: c.args for cid, c in store.configurations().items()
        }


def test_rows_record_the_worker_configuration(store_dir: Path) -> None:
    proc = worker(
        store_dir, "--worker.indices=0-2", f"--worker.main_import={SCRIPT}", "--script.scale", "2"
    )
    assert proc.returncode == 0, proc.stderr
    ids, args = ids_and_args(store_dir)
    assert ids[:3] == [0, 0, 0] and set(ids[3:]) == {-1}
    assert args == {0: {"script.scale": "2"}}
    # the same configuration, spelled differently: the same id, no refusal
    proc = worker(
        store_dir, "--worker.indices=3", f"--worker.main_import={SCRIPT}", "--script.scale=2"
    )
    assert proc.returncode == 0, proc.stderr
    assert ids_and_args(store_dir)[0][:4] == [0, 0, 0, 0]
    # a declared version replaces the source hash: another configuration
    proc = worker(
        store_dir,
        "--worker.indices=4",
        f"--worker.main_import={SCRIPT}",
        "--script.scale=2",
        "--worker.version=v2",
        "--worker.on_change=mix",
    )
    assert proc.returncode == 0, proc.stderr
    with Store.open(store_dir) as store:
        assert store.configuration_ids([4]).tolist() == [1]
        assert store.configurations()[1].code == "version:v2"
        assert store.configurations()[0].code.startswith("sha256:")


def test_changed_configuration_refused_by_default(store_dir: Path, tmp_path: Path) -> None:
    assert (
        worker(store_dir, "--worker.indices=0-4", f"--worker.main_import={SCRIPT}").returncode == 0
    )
    before = data_bytes(store_dir)
    report = tmp_path / "report.json"
    argv_out = tmp_path / "argv.txt"
    proc = worker(
        store_dir,
        "--worker.indices=5-9",
        f"--worker.main_import={SCRIPT}",
        "--script.scale=3",
        f"--script.argv_out={argv_out}",
        f"--worker.report={report}",
    )
    assert proc.returncode == 2, proc.stderr
    assert "the training configuration changed" in proc.stderr
    assert "5 completed row(s) (0-4) were trained under configuration 0" in proc.stderr
    assert "script.scale: (absent) -> 3" in proc.stderr
    assert "--worker.on_change=retrain" in proc.stderr and "--worker.on_change=mix" in proc.stderr
    assert not argv_out.exists()  # nothing trained
    assert data_bytes(store_dir) == before
    data = json.loads(report.read_text())
    assert data["exit_code"] == 2 and "script.scale: (absent) -> 3" in data["error"]


def test_retrain_replaces_rows_of_other_configurations(store_dir: Path) -> None:
    assert (
        worker(store_dir, "--worker.indices=0-5", f"--worker.main_import={SCRIPT}").returncode == 0
    )
    proc = worker(
        store_dir,
        "--worker.indices=2-7",
        f"--worker.main_import={SCRIPT}",
        "--script.scale=3",
        "--worker.on_change=retrain",
    )
    assert proc.returncode == 0, proc.stderr
    assert "6 trained, 0 skipped" in proc.stderr
    for i in (0, 1):
        assert_row(store_dir, i, scale=1.0)
    for i in range(2, 8):
        assert_row(store_dir, i, scale=3.0)
    ids, args = ids_and_args(store_dir)
    assert ids[:8] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert args[1] == {"script.scale": "3"}
    # again: its own rows are skipped, rows 0-1 (another configuration) are retrained
    proc = worker(
        store_dir,
        "--worker.indices=0-7",
        f"--worker.main_import={SCRIPT}",
        "--script.scale=3",
        "--worker.on_change=retrain",
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 trained, 6 skipped" in proc.stderr
    assert ids_and_args(store_dir)[0][:8] == [1] * 8


def test_mix_trains_only_what_is_missing(store_dir: Path) -> None:
    assert (
        worker(store_dir, "--worker.indices=0-3", f"--worker.main_import={SCRIPT}").returncode == 0
    )
    proc = worker(
        store_dir,
        "--worker.indices=0-7",
        f"--worker.main_import={SCRIPT}",
        "--script.scale=3",
        "--worker.on_change=mix",
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 trained, 4 skipped" in proc.stderr and "mixing configurations" in proc.stderr
    assert ids_and_args(store_dir)[0][:8] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert_row(store_dir, 0, scale=1.0)
    assert_row(store_dir, 7, scale=3.0)


def test_store_without_configurations_is_used_as_before(store_dir: Path) -> None:
    """Rows written without a configuration (the seed's worker, the Python API): no check."""
    with Store.open(store_dir) as store:
        for i in (0, 1):
            store.write_row(i, outputs.expected(i, 5.0))
    proc = worker(store_dir, "--worker.indices=0-3", f"--worker.main_import={SCRIPT}")
    assert proc.returncode == 0, proc.stderr
    assert "2 trained, 2 skipped" in proc.stderr
    assert_row(store_dir, 0, scale=5.0)
    assert ids_and_args(store_dir)[0][:4] == [-1, -1, 0, 0]
    # unknown rows are no conflict for refuse; retrain replaces them
    proc = worker(
        store_dir,
        "--worker.indices=0-3",
        f"--worker.main_import={SCRIPT}",
        "--worker.on_change=retrain",
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 trained, 2 skipped" in proc.stderr
    assert ids_and_args(store_dir)[0][:4] == [0, 0, 0, 0]
    assert_row(store_dir, 0, scale=1.0)


def test_bad_on_change_is_a_usage_error(store_dir: Path) -> None:
    proc = worker(
        store_dir, "--worker.index=1", f"--worker.main_import={SCRIPT}", "--worker.on_change=x"
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# ---------------------------------------------------------------- group commit and signals
def start_worker(store_dir: Path, *args: str) -> subprocess.Popen[str]:
    """The worker as a background process (output to pipes, read once it has ended)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dm_assets.worker", f"--worker.logdir={store_dir}", *args],
        cwd=REPO_ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def completed(store_dir: Path, index: int) -> bool:
    with Store.open(store_dir) as store:
        return store.is_completed(index)


def sleeping_second_model(store_dir: Path, commit_every: str, *extra: str) -> subprocess.Popen[str]:
    """A worker on indices 0-1 whose model 0 trains at once and model 1 sleeps a minute;
    returned once model 1 has started (its worker folder exists and model 0 returned)."""
    proc = start_worker(
        store_dir,
        "--worker.indices=0-1",
        f"--worker.main_import={SCRIPT}",
        f"--worker.commit_every={commit_every}",
        "--script.mode=sleep",
        "--script.bad=1",
        *extra,
    )
    started = wait_for(lambda: (store_dir / "workers" / "1").is_dir(), 60)
    if not started:
        proc.kill()
        raise AssertionError(f"model 1 never started: {proc.communicate()[1]}")
    time.sleep(0.3)  # inside model 1's sleep
    return proc


def test_finished_row_committed_within_commit_every(store_dir: Path) -> None:
    """A finished row waits at most commit_every seconds, not for the next model."""
    proc = sleeping_second_model(store_dir, "0.5")
    try:
        assert proc.poll() is None  # model 1 is still training
        assert wait_for(lambda: completed(store_dir, 0), 10), "row 0 not committed on time"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()
    assert not completed(store_dir, 1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_commits_finished_rows_then_exits_non_zero(
    store_dir: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """scancel, a SLURM time limit, the local launcher's stop or Ctrl-C while a model trains:
    the rows already finished are stored (here a group that would wait ten minutes), the
    interrupted model stays incomplete, the exit status is 128 + the signal's number."""
    report = tmp_path / "report.json"
    proc = sleeping_second_model(store_dir, "600", f"--worker.report={report}")
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert_row(store_dir, 0)
    assert not completed(store_dir, 1)
    assert f"interrupted by {signum.name}" in stderr
    data = json.loads(report.read_text())
    assert data["exit_code"] == 128 + signum
    assert [(o["index"], o["status"]) for o in data["outcomes"]] == [(0, "trained"), (1, "failed")]
    assert signum.name in data["outcomes"][1]["message"]
