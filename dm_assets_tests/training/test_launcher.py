"""The launcher core without starting a process: the report, the worker's command line, the
argument checks, log tails, reading worker reports into outcomes, and the retry rounds driven by
a fake transport that writes rows and reports the way workers do."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import numpy as np
import pytest

from dm_assets.cli import EXIT_FAILED, EXIT_USAGE
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store, StoreError
from dm_assets.training.configuration import TrainingConfiguration
from dm_assets.training.launcher import (
    Finished,
    Progress,
    TrainingReport,
    WorkerCommand,
    check_arguments,
    collect_round,
    compact_ranges,
    completed_blocks,
    done_mask,
    exit_code_words,
    is_positive_int,
    launcher_logs,
    log_tail,
    plan_text,
    progress_lines,
    read_outcomes,
    run_rounds,
    skip_completed,
)
from dm_assets.training.runner import IndexOutcome, WorkerReport, parse_indices, write_report
from dm_assets_tests.scripts import launcher_cases


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    Store.initialize(path, Spec.from_dict(launcher_cases.SPEC)).close()
    return path


def write_rows(store_dir: Path, indices) -> None:
    with Store.open(store_dir) as store:
        store.write_rows(
            [(i, {"value": launcher_cases.expected_value(i), "pid": 1}) for i in indices]
        )


def mask(n: int, done) -> np.ndarray:
    flags = np.zeros(n, dtype=bool)
    flags[list(done)] = True
    return flags


# ---------------------------------------------------------------------------------------------
# the report


def test_compact_ranges_round_trip() -> None:
    assert compact_ranges([0, 1, 2, 3, 4, 7, 9, 10]) == "0-4,7,9-10"
    assert compact_ranges([]) == ""
    assert compact_ranges([5, 3, 4, 4, 6]) == "5,3-4,6"
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.choice(60, size=rng.integers(1, 40), replace=False).tolist()
        assert parse_indices(compact_ranges(x)) == x
        assert parse_indices(compact_ranges(sorted(x))) == sorted(x)
    with pytest.raises(ValueError, match="indices must be >= 0; got -1"):
        compact_ranges([0, -1])


def test_report_summary() -> None:
    report = TrainingReport(
        trained=[1], failed={2: "boom\nmore"}, seconds_per_model={1: 0.5}, rounds=2
    )
    text = report.summary()
    assert text.splitlines()[1] == "  index 2: boom"
    assert "0.50 s per model" in text and not report.ok
    assert os.linesep == "\n"
    many = TrainingReport(failed={i: f"why {i}" for i in range(12)})
    lines = many.summary(max_failures=3).splitlines()
    assert lines[1:] == [
        "  index 0: why 0",
        "  index 1: why 1",
        "  index 2: why 2",
        "  ... and 9 more failed",
    ]
    assert TrainingReport(failed={4: "  "}).summary().endswith("index 4: unknown")


def test_report_means_failures_and_finish(caplog: pytest.LogCaptureFixture) -> None:
    assert TrainingReport().mean_seconds_per_model == 0.0
    report = TrainingReport(
        trained=[3, 1], skipped=[9, 0], failed={7: "b\nline 2", 5: "a"}, rounds=1
    )
    report.seconds_per_model = {1: 1.0, 3: 2.0}
    assert report.mean_seconds_per_model == 1.5
    assert report.failure_text(retries=2) == (
        "2 model(s) still failing after 2 retry round(s): [5, 7]; every other model of this "
        "run is stored.\n  model 5: a\n  model 7: b\nline 2"
    )
    with caplog.at_level(logging.INFO, logger="dm_assets.training.launcher"):
        assert report.finish(started=0.0, what="done") is report
    assert report.trained == [1, 3] and report.skipped == [0, 9] and list(report.failed) == [5, 7]
    assert report.wall_seconds > 0
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.getMessage().startswith("done: 6 model(s)")


def test_completed_blocks() -> None:
    report = TrainingReport(trained=[0, 1, 2, 4, 5], failed={3: "x", 9: "y"})
    blocks = {
        "0000-0001": range(0, 2),
        "0002-0003": range(2, 4),
        "0004-0005": range(4, 6),
        "0008-0009": range(8, 10),
    }
    assert completed_blocks(report, blocks) == ["0000-0001", "0004-0005"]
    assert completed_blocks(TrainingReport(), blocks) == list(blocks)


# ---------------------------------------------------------------------------------------------
# arguments and the command line


def test_check_arguments_lists_every_problem() -> None:
    bad_command = WorkerCommand("py", Path("/s"), "", job_timeout=0, commit_every=-1.0)
    with pytest.raises(ValueError) as info:
        check_arguments("train_x", [0, -1], bad_command, retries=-1, problems=["poll: mine"])
    text = str(info.value)
    assert text.startswith("train_x: indices: every index must be an integer >= 0; got -1; ")
    names = ["indices:", "main_import:", "job_timeout:", "retries:", "commit_every:", "poll:"]
    positions = [text.index(name) for name in names]
    assert positions == sorted(positions)  # the shared problems first, the launcher's after
    command = WorkerCommand("py", Path("/s"), "m", commit_every=0.0)
    for bad in ([True], [1.0], ["3"]):
        with pytest.raises(ValueError, match="indices: every index"):
            check_arguments("f", bad, command, retries=0)
    with pytest.raises(ValueError, match="retries: must be an integer >= 0"):
        check_arguments("f", [0], command, retries=True)
    block = check_arguments("f", [3, np.int64(1), 3, 2], command, retries=0)
    assert block == [3, 1, 2] and all(type(i) is int for i in block)


def test_is_positive_int() -> None:
    assert is_positive_int(1) and is_positive_int(64)
    assert not any(is_positive_int(v) for v in (0, -3, True, 1.0, "2", None))


def test_worker_command_line() -> None:
    command = WorkerCommand(
        python="/venv/bin/python",
        store_dir=Path("/data/store"),
        main_import="train_script",
        script_args=("--lr=0.1", "--note=two words"),
        commit_every=2,
    )
    assert command.argv("0-4,7", "/tmp/r.json") == [
        "/venv/bin/python",
        "-m",
        "dm_assets.worker",
        "--worker.indices=0-4,7",
        "--worker.logdir=/data/store",
        "--worker.main_import=train_script",
        "--worker.report=/tmp/r.json",
        "--worker.commit_every=2.0",
        "--lr=0.1",
        "--note=two words",
    ]
    timed = WorkerCommand("py", Path("/s"), "m", job_timeout=30, commit_every=0.5)
    assert timed.argv("1", "r")[-2:] == ["--worker.commit_every=0.5", "--worker.job_timeout=30.0"]
    # in a shell script: every word quoted but the two the script computes
    words = command.argv('"$indices"', '/r/task_"$task".json', quote=shlex.quote)
    assert words[3] == '--worker.indices="$indices"'
    assert words[6] == '--worker.report=/r/task_"$task".json'
    assert words[-1] == "'--note=two words'"
    assert shlex.split(" ".join(words[7:])) == [
        "--worker.commit_every=2.0",
        "--lr=0.1",
        "--note=two words",
    ]


def test_worker_command_line_passes_version_and_on_change() -> None:
    command = WorkerCommand("py", Path("/s"), "m", ("--a=1",), version="v2", on_change="retrain")
    assert command.argv("0", "r")[-3:] == [
        "--worker.version=v2",
        "--worker.on_change=retrain",
        "--a=1",
    ]
    assert not any(
        "version" in w or "on_change" in w
        for w in WorkerCommand("py", Path("/s"), "m").argv("0", "r")
    )
    with pytest.raises(ValueError, match="on_change: must be one of refuse, retrain, mix"):
        check_arguments("f", [0], WorkerCommand("py", Path("/s"), "m", on_change="keep"), retries=0)


def configuration(scale: str) -> TrainingConfiguration:
    return TrainingConfiguration(
        schema=launcher_cases.SPEC["schema"],
        main_import="m",
        args={"case.scale": scale},
        code="version:1",
        versions={},
    )


def test_rows_of_replaced_configurations_are_trained_again(store_dir: Path, tmp_path: Path) -> None:
    def rows(indices) -> list:
        return [(i, {"value": launcher_cases.expected_value(i), "pid": 2}) for i in indices]

    with Store.open(store_dir) as store:
        old = store.register_configuration(configuration("1"))
        new = store.register_configuration(configuration("2"))
        store.write_rows(rows(range(4)), configuration_id=old)
        store.write_rows(rows([4, 5]), configuration_id=new)
        assert done_mask(store)[:7].tolist() == [True] * 6 + [False]
        assert done_mask(store, {old})[:7].tolist() == [False] * 4 + [True, True, False]
        report = TrainingReport()
        assert skip_completed(store, range(7), report, {old}) == [0, 1, 2, 3, 6]
        assert report.skipped == [4, 5]

    class Replacing:
        """Writes every row it is given under the new configuration, as a retraining worker."""

        doing, what = "running", "done"

        def __init__(self) -> None:
            self.rounds: list[list[int]] = []

        def run_round(self, todo: list[int], round_number: int, progress: Progress):
            self.rounds.append(list(todo))
            path, log = tmp_path / f"r{round_number}.json", tmp_path / f"r{round_number}.log"
            log.write_text("replacing\n")
            with Store.open(store_dir) as store:
                store.write_rows(rows(todo), overwrite=True, configuration_id=new)
            write_report(path, WorkerReport([IndexOutcome(i, "trained", 0.1) for i in todo]), 0)
            return [Finished(todo, path, log, "worker process exited with code 0")]

        def stop(self) -> None:
            pass

    transport = Replacing()
    report = run_rounds(store_dir, list(range(7)), transport, 1, None, 1.0, replace={old})
    assert transport.rounds == [[0, 1, 2, 3, 6]]
    assert report.trained == [0, 1, 2, 3, 6] and report.skipped == [4, 5] and report.ok
    with Store.open(store_dir) as store:
        assert (store.configuration_ids(range(7)) == new).all()


# ---------------------------------------------------------------------------------------------
# logs and worker reports


def test_launcher_logs_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert launcher_logs(tmp_path / "store", None) == tmp_path / "store" / "launcher_logs"
    monkeypatch.chdir(tmp_path)
    assert launcher_logs(tmp_path / "store", "logs") == tmp_path / "logs"


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_bytes(b"header\n" + b"".join(f"line {k}\n".encode() for k in range(30)))
    text = log_tail(log)
    assert text.splitlines()[0] == f"last lines of {log}:"
    assert text.splitlines()[1:] == [f"  | line {k}" for k in range(10, 30)]
    assert log_tail(log, lines=2).splitlines()[1:] == ["  | line 28", "  | line 29"]
    assert log_tail(log, offset=len(b"header\nline 0\n"), lines=100).splitlines()[1] == "  | line 1"
    assert log_tail(log, offset=log.stat().st_size) == f"(nothing in its log {log})"
    missing = tmp_path / "none.log"
    assert log_tail(missing).startswith(f"(its log {missing} is unreadable: ")
    assert log_tail(missing, missing="(never started)") == "(never started)"


def test_read_outcomes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert read_outcomes(tmp_path / "absent.json") == ({}, None, None)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert read_outcomes(bad) == ({}, None, None)
    assert "is not a worker report" in caplog.text
    good = tmp_path / "good.json"
    write_report(good, WorkerReport([IndexOutcome(4, "trained", 0.25)]), 0)
    assert read_outcomes(good) == ({4: IndexOutcome(4, "trained", 0.25)}, 0, None)


def test_collect_round_outcomes_and_what_runs_again(tmp_path: Path) -> None:
    log = tmp_path / "w.log"
    log.write_text("=== header\nold output\nTraceback: boom\n")
    # worker A reported: 0 trained, 1 found done by someone else, 2 failed, 3 timed out
    a = tmp_path / "a.json"
    outcomes = [
        IndexOutcome(0, "trained", 1.5),
        IndexOutcome(1, "skipped", 0.0),
        IndexOutcome(2, "failed", 0.1, "main() raised RuntimeError: boom"),
        IndexOutcome(3, "timeout", 9.0, ""),
    ]
    write_report(a, WorkerReport(outcomes), EXIT_FAILED)
    # worker B died without a report after storing 4; 5 and 6 are lost
    dead = Finished(
        [4, 5, 6],
        tmp_path / "b.json",
        log,
        "worker process exited with code -9",
        log_offset=len("=== header\n"),
    )
    report = TrainingReport(failed={2: "round 1 said this", 5: "and this"})
    again = collect_round(
        mask(10, [0, 1, 4]),
        [Finished([0, 1, 2, 3], a, log, "worker process exited with code 1"), dead],
        report,
    )
    assert again == [2, 3, 5, 6]
    assert report.trained == [0, 4] and report.skipped == [1]
    assert report.seconds_per_model == {0: 1.5}  # 4's worker left no report
    assert report.failed[2] == "main() raised RuntimeError: boom"  # replaces round 1's word
    assert report.failed[3] == "timeout"
    assert report.failed[5] == (
        f"worker process exited with code -9\nlast lines of {log}:\n"
        "  | old output\n  | Traceback: boom"
    )
    assert report.failed[6] == report.failed[5]


def test_collect_round_notes_errors_and_final_failures(tmp_path: Path) -> None:
    log = tmp_path / "none.log"
    usage = tmp_path / "usage.json"
    write_report(usage, WorkerReport(), EXIT_USAGE, error="usage error; see the worker's log")
    failed = tmp_path / "failed.json"
    write_report(failed, WorkerReport([IndexOutcome(2, "failed", 0.0, "bad")]), EXIT_FAILED)
    report = TrainingReport()
    again = collect_round(
        mask(6, []),
        [
            # a report with a usage error's exit code: not retried, its error quoted
            Finished([0], usage, log, "task ended FAILED", missing_log="(no log)"),
            # the transport says it would fail again (a task SLURM never starts)
            Finished([1], tmp_path / "x.json", log, "never started", final=True),
            # the transport's note goes with the worker's own message
            Finished([2], failed, log, "task 7_2 ended FAILED", note="task 7_2 ended FAILED"),
            Finished([3], tmp_path / "y.json", log, "exited 2", final=False),
        ],
        report,
    )
    assert again == [2, 3]
    assert report.failed[0] == "task ended FAILED: usage error; see the worker's log\n(no log)"
    assert report.failed[1].startswith(f"never started\n(its log {log} is unreadable")
    assert report.failed[2] == "bad [task 7_2 ended FAILED]"


# ---------------------------------------------------------------------------------------------
# the store, progress and the rounds


def test_skip_completed(store_dir: Path) -> None:
    write_rows(store_dir, [1, 3])
    report = TrainingReport()
    with Store.open(store_dir) as store:
        assert skip_completed(store, [5, 3, 0, 1], report) == [0, 5]
        assert report.skipped == [3, 1]
        with pytest.raises(StoreError, match=r"indices \[40, 41\] are outside the store's range"):
            skip_completed(store, [39, 40, 41], TrainingReport())


def test_plan_says_up_front_what_is_trained_and_skipped(store_dir: Path) -> None:
    write_rows(store_dir, [1, 3])
    with Store.open(store_dir) as store:
        assert plan_text(store, [0, 1, 2, 3]) == (
            "4 model(s) selected: 2 to train, 2 skipped (already completed: 1,3)"
        )
        assert plan_text(store, [1, 3]) == (
            "2 model(s) selected: 0 to train, 2 skipped (already completed: 1,3)"
        )
        assert plan_text(store, [5, 6]) == "2 model(s) selected: 2 to train, 0 skipped"
        # rows of a configuration being replaced are trained again, not skipped
        replaced = int(store.configuration_ids()[1])
        assert plan_text(store, [0, 1, 2, 3], replace=[replaced]) == (
            "4 model(s) selected: 4 to train (2 of them again, to replace their configuration), "
            "0 skipped"
        )


def test_progress_counts_the_block_and_waits_between_calls(store_dir: Path) -> None:
    write_rows(store_dir, [1, 2, 30])
    calls: list[tuple[int, int]] = []
    with Store.open(store_dir) as store:
        progress = Progress(lambda d, t: calls.append((d, t)), 3600.0, store, [0, 1, 2, 3])
        progress.report(force=False)
        progress.report(force=False)  # not due for an hour
        progress.report()
        Progress(None, 0.0, store, [0]).report()  # no callback: nothing to do
    assert calls == [(2, 4), (2, 4)]


def test_progress_lines() -> None:
    said: list[tuple] = []
    progress = progress_lines(lambda *args: said.append(args), "exp", every=3600.0)
    progress(0, 4)
    progress(2, 4)  # within the hour: not said
    progress(4, 4)  # all done: always said
    assert [args[:4] for args in said] == [
        ("%s: %d / %d models done (%.0f s)", "exp", 0, 4),
        ("%s: %d / %d models done (%.0f s)", "exp", 4, 4),
    ]


class FakeTransport:
    """Trains like a worker would: stores each index's row and writes a report, except for
    indices that fail on their first ``fail_rounds[i]`` rounds (reported) or whose worker
    "dies" in round 1 (no report, no row). Records what each round was given."""

    def __init__(self, store_dir: Path, tmp: Path, fail_rounds=None, dies=(), raise_in=None):
        self.store_dir, self.tmp = store_dir, tmp
        self.fail_rounds = dict(fail_rounds or {})
        self.dies, self.raise_in = set(dies), raise_in
        self.rounds: list[list[int]] = []
        self.stopped = 0
        self.doing, self.what = "running", "done"

    def run_round(self, todo: list[int], round_number: int, progress: Progress) -> list[Finished]:
        self.rounds.append(list(todo))
        if round_number == self.raise_in:
            raise KeyboardInterrupt
        finished = []
        for half in (todo[: len(todo) // 2 + 1], todo[len(todo) // 2 + 1 :]):
            if not half:
                continue
            path = self.tmp / f"r{round_number}-{half[0]}.json"
            log = self.tmp / f"r{round_number}-{half[0]}.log"
            log.write_text(f"worker for {half}\n")
            if round_number == 1 and self.dies.intersection(half):
                finished.append(Finished(half, path, log, "worker process exited with code -9"))
                continue
            outcomes = []
            for i in half:
                if self.fail_rounds.get(i, 0) >= round_number:
                    outcomes.append(IndexOutcome(i, "failed", 0.0, f"model {i} failed"))
                else:
                    write_rows(self.store_dir, [i])
                    outcomes.append(IndexOutcome(i, "trained", 0.5))
            write_report(path, WorkerReport(outcomes), 0)
            finished.append(Finished(half, path, log, "worker process exited with code 0"))
            progress.report(force=False)
        return finished

    def stop(self) -> None:
        self.stopped += 1


def test_run_rounds_retries_what_failed(store_dir: Path, tmp_path: Path) -> None:
    write_rows(store_dir, [0])
    transport = FakeTransport(store_dir, tmp_path, fail_rounds={2: 1, 5: 9}, dies=[7])
    calls: list[tuple[int, int]] = []
    report = run_rounds(
        store_dir,
        list(range(8)),
        transport,
        retries=2,
        on_progress=lambda d, t: calls.append((d, t)),
        progress_every=0.0,
    )
    # round 1: 2 and 5 fail, 5-7 die with their worker (no report); 5 fails every time
    assert transport.rounds == [[1, 2, 3, 4, 5, 6, 7], [2, 5, 6, 7], [5]]
    assert (report.rounds, report.processes) == (3, 5)
    assert report.skipped == [0] and report.trained == [1, 2, 3, 4, 6, 7]
    assert list(report.failed) == [5] and report.failed[5] == "model 5 failed"
    assert sorted(report.seconds_per_model) == report.trained
    assert calls[0] == (1, 8) and calls[-1] == (7, 8) and transport.stopped == 0
    # every index completed: no round at all
    again = run_rounds(store_dir, [0, 1], transport, retries=1, on_progress=None, progress_every=0)
    assert (again.rounds, again.processes, again.skipped) == (0, 0, [0, 1])


def test_run_rounds_stops_the_workers_on_an_exception(store_dir: Path, tmp_path: Path) -> None:
    transport = FakeTransport(store_dir, tmp_path, fail_rounds={3: 1}, raise_in=2)
    with pytest.raises(KeyboardInterrupt):
        run_rounds(store_dir, range(5), transport, retries=1, on_progress=None, progress_every=0)
    assert transport.stopped == 1 and transport.rounds == [[0, 1, 2, 3, 4], [3]]


def test_exit_code_words_name_the_signal() -> None:
    assert exit_code_words(0) == "0"
    assert exit_code_words(1) == "1"
    assert exit_code_words(-9) == "-9 (killed by SIGKILL)"
    # the worker's own exit after it stopped on SIGTERM (the launcher's stop, scancel) or SIGINT
    assert exit_code_words(143) == "143 (stopped by SIGTERM)"
    assert exit_code_words(130) == "130 (stopped by SIGINT)"
    assert exit_code_words(128 + 200) == "328"  # no such signal: the code alone
