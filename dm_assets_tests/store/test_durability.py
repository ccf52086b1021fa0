"""Crash safety and concurrency of the write protocol, with real processes.

- SIGKILL at random moments while a worker writes large rows (and overwrites them): afterwards
  every completed row holds exactly the values of one run, never a mix, and the configuration
  id written with it is that run's (each run is its own training configuration, ``--gen=g``):
  an overwrite by another configuration never leaves the old id with the new data or the new
  id with the old data.
- Many workers writing interleaved indices whose rows share disk pages: every row exact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dm_assets.store.spec import Spec
from dm_assets.store.store import Store
from dm_assets_tests.helpers import REPO_ROOT, cli_env, run_module
from dm_assets_tests.scripts import big_rows, outputs

GENERATIONS = 10


def start_worker(store_dir: Path, indices: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dm_assets.worker",
            f"--worker.logdir={store_dir}",
            f"--worker.indices={indices}",
            *args,
        ],
        cwd=REPO_ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def check_consistent(store_dir: Path, generations: set[int]) -> dict[int, int]:
    """Every completed row equals ``big_rows.expected(i, g)`` for its stored generation g, and
    its configuration id names the configuration of generation g (``--gen=g``)."""
    found = {}
    with Store.open(store_dir) as store:
        gen = store.read("generation")
        payload = store.read("payload")
        tail = store.read("tail")
        ids = store.configuration_ids()
        gen_of_config = {cid: int(c.args["gen"]) for cid, c in store.configurations().items()}
        assert len(set(gen_of_config.values())) == len(gen_of_config)  # one id per generation
        for i in store.completed_indices():
            g = int(gen[i])
            assert g in generations, f"index {i}: generation {g} was never run"
            cid = int(ids[i])
            assert cid in gen_of_config, f"index {i}: completed with unregistered id {cid}"
            assert gen_of_config[cid] == g, (
                f"index {i}: data of generation {g} under the id of generation {gen_of_config[cid]}"
            )
            want = big_rows.expected(int(i), g)
            assert np.array_equal(payload[i], want["payload"]), f"index {i}: payload torn"
            assert np.array_equal(tail[i], want["tail"]), f"index {i}: tail torn"
            found[int(i)] = g
    return found


@pytest.mark.parametrize(("seed", "commit_every"), [(0, "0"), (1, "0"), (2, "0.02")])
def test_sigkill_at_random_moments(tmp_path: Path, seed: int, commit_every: str) -> None:
    rng = np.random.default_rng(seed)
    num_models = 24
    store_dir = tmp_path / "store"
    Store.initialize(store_dir, Spec.from_dict(big_rows.spec(num_models))).close()
    script = "--worker.main_import=dm_assets_tests.scripts.big_rows"
    commands = store_dir / "cmds.txt"  # one line per stored index: progress we can watch
    killed = 0
    history: list[dict[int, int]] = []
    for gen in range(GENERATIONS):
        # every generation overwrites completed rows of another configuration, so kills also
        # land inside overwrites: forced (do_if_complete), or as a retrain of the rows of the
        # other configurations
        if gen % 2:
            extra = ["--worker.on_change=retrain"]
        else:
            extra = ["--worker.do_if_complete", "--worker.on_change=mix"]
        stored_before = len(commands.read_text().splitlines()) if commands.exists() else 0
        proc = start_worker(
            store_dir,
            f"0-{num_models - 1}",
            script,
            f"--gen={gen}",
            f"--worker.commit_every={commit_every}",
            *extra,
        )
        # kill once a random number of rows is stored, a random fraction of a row later
        target = stored_before + int(rng.integers(1, num_models - 4))
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if commands.exists() and len(commands.read_text().splitlines()) >= target:
                break
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0, 0.03)))
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        history.append(check_consistent(store_dir, set(range(gen + 1))))
    assert killed == GENERATIONS, "the worker finished before it could be killed"
    # generations mix: the kills interrupted real work
    assert any(len(set(h.values())) > 1 for h in history)
    # the default refuses to train under a new configuration beside the stored ones
    proc = start_worker(store_dir, f"0-{num_models - 1}", script, "--gen=99")
    assert proc.wait(timeout=300) == 2
    check_consistent(store_dir, set(range(GENERATIONS)))
    # retrain replaces every row of the other configurations: one configuration left
    proc = start_worker(
        store_dir, f"0-{num_models - 1}", script, "--gen=99", "--worker.on_change=retrain"
    )
    assert proc.wait(timeout=300) == 0
    final = check_consistent(store_dir, {*range(GENERATIONS), 99})
    assert sorted(final) == list(range(num_models))
    assert set(final.values()) == {99}
    with Store.open(store_dir) as store:
        assert len(set(store.configuration_ids().tolist())) == 1


def test_concurrent_writers_never_clobber(tmp_path: Path) -> None:
    num_models, writers = 400, 8
    store_dir = tmp_path / "store"
    spec = dict(outputs.SPEC, num_models=num_models)  # 16 + 3 bytes a row: many rows per page
    Store.initialize(store_dir, Spec.from_dict(spec)).close()
    procs = [
        start_worker(
            store_dir,
            ",".join(str(i) for i in range(k, num_models, writers)),
            "--worker.main_import=dm_assets_tests.scripts.outputs",
        )
        for k in range(writers)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0] * writers
    with Store.open(store_dir) as store:
        assert store.status().completed == num_models
        values, flags = store.read("values"), store.read("flags")
        for i in range(num_models):
            want = outputs.expected(i)
            assert np.array_equal(values[i], want["values"]), i
            assert np.array_equal(flags[i], want["flags"]), i


def test_concurrent_library_writers_threads_and_processes(tmp_path: Path) -> None:
    """The Python API from many forked processes at once, with one open store each."""
    num_models, writers = 3000, 6
    spec = Spec.from_dict(dict(outputs.SPEC, num_models=num_models))
    Store.initialize(tmp_path, spec).close()
    pids = []
    for k in range(writers):
        pid = os.fork()
        if pid == 0:  # child: write every writers-th row, then leave without cleanup
            code = 0
            try:
                with Store.open(tmp_path) as store:
                    for i in range(k, num_models, writers):
                        store.write_row(i, outputs.expected(i))
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids] == [0] * writers
    with Store.open(tmp_path) as store:
        assert store.status().completed == num_models
        values = np.asarray(store.read("values"))
        want = np.arange(4, dtype=np.float32)[None, :] + np.arange(num_models)[:, None]
        np.testing.assert_array_equal(values, want)


def test_status_command(tmp_path: Path) -> None:
    Store.initialize(tmp_path, Spec.from_dict(outputs.SPEC)).close()
    with Store.open(tmp_path) as store:
        for i in (0, 1, 2, 7):
            store.write_row(i, outputs.expected(i))
    proc = run_module("dm_assets.status", f"--logging.logdir={tmp_path}", check=True)
    assert "4/20 models completed" in proc.stdout and "3-6, 8-19" in proc.stdout
    proc = run_module("dm_assets.status", f"--logging.logdir={tmp_path}", "--json", check=True)
    assert '"missing_ranges": [[3, 6], [8, 19]]' in proc.stdout
    proc = run_module("dm_assets.status", f"--logging.logdir={tmp_path}", "--require_complete")
    assert proc.returncode == 1
