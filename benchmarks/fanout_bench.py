"""Benchmark: fan-out throughput (models per hour), side by side in one run, 2 at a time.

Run from the repository root, with the single-node SLURM cluster up::

    DM_SLURM_DIR=/tmp/dm_slurm_fanout DM_SLURM_PORT=16927 scripts/slurm_cluster.sh start
    SLURM_CONF=/tmp/dm_slurm_fanout/slurm.conf .venv/bin/python benchmarks/fanout_bench.py \
        [--models 60] [--sleeps 1,0] [--out benchmarks/results/fanout.json]

The training script is this module's :func:`main` (imported by the workers as ``fanout_bench``
with ``benchmarks/`` on ``PYTHONPATH``, cwd the repository root): it sleeps
``DM_BENCH_SLEEP`` seconds and returns a tiny row (``masks`` bool [16], ``margins`` float16
[2]). For each sleep (1 s: "1-second models"; 0: no-op models, where start-up dominates) the
same ``--models`` models are trained into fresh stores three ways, each 2 at a time:

1. ``seed``: the seed's way, one ``python -m dm_assets.worker --worker.index=I`` process per
   model, two running at once (as ``parallel -j2`` does);
2. ``local``: :func:`dm_assets.training.local.train_models` with 2 CPU device slots (2 worker
   processes, each importing the script once for its whole chunk);
3. ``slurm``: :func:`dm_assets.training.slurm.train_models_slurm` on the real single-node cluster
   (2 CPUs, so 2 tasks at once), ``indices_per_task=10``, ``poll=0.5``.

Each way runs ``--repeats`` times, interleaved; the median is reported: seconds, models per
hour and the ratio to ``seed`` (models per hour over the seed's), with the load average. And
what bounds that ratio: with 2 at a time the seed's way spends (sleep + its per-process
start-up, measured by the no-op run) per model and no launcher can beat sleep alone, so for
1-second models local / seed is at most (1 + start-up) / 1.

Last, how fast an interrupted launcher stops (``interrupt`` in the results; once an assert in
the tests, which keep only the behaviour: nothing left running, nothing stored): ``local``
trains 4 models of 30 s each on 2 slots and its ``on_progress`` raises once both workers run;
the seconds from that raise until the exception leaves :func:`train_models` (every process group
sent SIGTERM, SIGKILL after ``KILL_GRACE_SECONDS``), each run's, against a bound of 15 s.
"""

from __future__ import annotations

import os
import time

P, T = 16, 2


def main(index: int, logdir: str) -> dict[str, object]:
    """The benchmark's training script: sleep ``DM_BENCH_SLEEP`` seconds, return a tiny row."""
    import numpy as np

    seconds = float(os.environ.get("DM_BENCH_SLEEP", "0"))
    if seconds > 0:
        time.sleep(seconds)
    bits = np.unpackbits(np.array([index & 0xFF, (index >> 8) & 0xFF], dtype=np.uint8))
    return {"masks": bits.astype(bool)[:P], "margins": np.full(T, index % 7, dtype=np.float16)}


def _bench() -> int:
    import argparse
    import json
    import shutil
    import statistics
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))

    from dm_assets.store.spec import Spec
    from dm_assets.store.store import Store
    from dm_assets.training.devices import DeviceSlots, detect_devices
    from dm_assets.training.local import KILL_GRACE_SECONDS, train_models
    from dm_assets.training.slurm import train_models_slurm

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=60)
    parser.add_argument("--sleeps", default="1,0", help="seconds per model, comma separated")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--indices-per-task", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way; median kept")
    parser.add_argument("--out", default=str(repo / "benchmarks/results/fanout.json"))
    args = parser.parse_args()
    if not os.environ.get("SLURM_CONF"):
        parser.error("set SLURM_CONF (scripts/slurm_cluster.sh env) to the running cluster's")
    n, jobs = args.models, args.parallel
    work = Path(tempfile.mkdtemp(prefix="fanout_bench_"))
    module = Path(__file__).stem
    pythonpath = os.pathsep.join(
        p for p in (str(repo / "benchmarks"), str(repo), os.environ.get("PYTHONPATH")) if p
    )
    spec = Spec.from_dict(
        {
            "num_models": n,
            "schema": {
                "masks": {"shape": [P], "dtype": "bool_"},
                "margins": {"shape": [T], "dtype": "float16"},
            },
        }
    )

    def fresh_store(name: str) -> Path:
        path = work / name
        Store.initialize(path, spec).close()
        return path

    def check(path: Path) -> None:
        with Store.open(path) as store:
            done = int(store.completed_mask().sum())
        assert done == n, f"{path}: {done} of {n} models completed"

    def seed_way(env: dict[str, str], r: int) -> float:
        store = fresh_store(f"seed_{env['DM_BENCH_SLEEP']}_{r}")
        base = [sys.executable, "-m", "dm_assets.worker", f"--worker.logdir={store}"]
        todo, running = list(range(n)), []
        t = time.perf_counter()
        while todo or running:
            while todo and len(running) < jobs:
                i = todo.pop(0)
                command = [*base, f"--worker.index={i}", f"--worker.main_import={module}"]
                running.append(
                    subprocess.Popen(
                        command,
                        cwd=repo,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(0.005)
            for proc in [p for p in running if p.poll() is not None]:
                assert proc.returncode == 0, f"seed worker exited {proc.returncode}"
                running.remove(proc)
        seconds = time.perf_counter() - t
        check(store)
        return seconds

    def local_way(env: dict[str, str], r: int) -> float:
        store = fresh_store(f"local_{env['DM_BENCH_SLEEP']}_{r}")
        slots = DeviceSlots(work / "locks", detect_devices("none", cpu_slots=jobs))
        with slots.acquire(jobs) as lease:
            t = time.perf_counter()
            report = train_models(
                store, list(range(n)), main_import=module, lease=lease, env=env, retries=0
            )
            seconds = time.perf_counter() - t
        assert report.ok and len(report.trained) == n, report.summary()
        check(store)
        return seconds

    def slurm_way(env: dict[str, str], r: int) -> float:
        store = fresh_store(f"slurm_{env['DM_BENCH_SLEEP']}_{r}")
        t = time.perf_counter()
        report = train_models_slurm(
            store,
            list(range(n)),
            main_import=module,
            indices_per_task=args.indices_per_task,
            poll=0.5,
            retries=0,
            env={k: env[k] for k in ("DM_BENCH_SLEEP", "PYTHONPATH", "SLURM_CONF")},
            workdir=repo,
        )
        seconds = time.perf_counter() - t
        assert report.ok and len(report.trained) == n, report.summary()
        check(store)
        return seconds

    class StopTrainingError(Exception):
        pass

    def local_stop_seconds(env: dict[str, str], r: int) -> float:
        """Seconds from an exception in on_progress, with 2 workers training 30 s models,
        until it leaves train_models."""
        store = fresh_store(f"stop_{r}")
        logs = work / f"stop_{r}_logs"
        raised: list[float] = []

        def on_progress(done: int, total: int) -> None:
            # both workers started: each has written its log's header and started python
            if len(list(logs.glob("*.log"))) >= 2 and time.monotonic() > started + 1.0:
                raised.append(time.monotonic())
                raise StopTrainingError

        slots = DeviceSlots(work / "locks", detect_devices("none", cpu_slots=2))
        with slots.acquire(2) as lease:
            started = time.monotonic()
            try:
                report = train_models(
                    store,
                    list(range(4)),
                    main_import=module,
                    lease=lease,
                    env={**env, "DM_BENCH_SLEEP": "30"},
                    log_dir=logs,
                    on_progress=on_progress,
                    progress_every=0.05,
                )
            except StopTrainingError:
                seconds = time.monotonic() - raised[0]
            else:
                raise AssertionError(f"train_models was not interrupted: {report.summary()}")
        with Store.open(store) as opened:
            assert not opened.completed_mask().any(), "an interrupted model was stored"
        return seconds

    ways = {"seed": seed_way, "local": local_way, "slurm": slurm_way}
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict[str, object]]] = {}
    for sleep in [float(s) for s in args.sleeps.split(",")]:
        env = {**os.environ, "DM_BENCH_SLEEP": repr(sleep), "PYTHONPATH": pythonpath}
        runs: dict[str, list[float]] = {name: [] for name in ways}
        loads: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(args.repeats):  # interleaved, so drifting load hits every way alike
            for name, way in ways.items():
                loads[name].append(os.getloadavg()[0])
                runs[name].append(way(env, r))
                print(
                    f"  sleep {sleep:g} s, {name}, run {r + 1}: {runs[name][-1]:.2f} s", flush=True
                )
        row: dict[str, dict[str, object]] = {}
        for name in ways:
            seconds = statistics.median(runs[name])
            row[name] = {
                "seconds": seconds,
                "models_per_hour": 3600 * n / seconds,
                "seconds_per_model": seconds / n,
                "all_seconds": runs[name],
                "load_1min_before": loads[name],
            }
        for way in row.values():
            way["ratio_to_seed"] = way["models_per_hour"] / row["seed"]["models_per_hour"]
        results[f"sleep_{sleep:g}s"] = row
    # What bounds the ratio: with `jobs` at once, the seed's way spends (sleep + start-up) per
    # model and the best launcher sleep alone, so local / seed <= (sleep + start-up) / sleep.
    if "sleep_0s" in results:
        startup = results["sleep_0s"]["seed"]["seconds"] * jobs / n
        for label, row in results.items():
            sleep = float(label[len("sleep_") : -1])
            row["bound"] = {
                "seed_startup_seconds_per_model": startup,
                "best_models_per_hour": (3600 * jobs / sleep) if sleep > 0 else None,
                "max_ratio_to_seed": ((sleep + startup) / sleep) if sleep > 0 else None,
            }
    stop_env = {**os.environ, "PYTHONPATH": pythonpath}
    stops = [local_stop_seconds(stop_env, r) for r in range(args.repeats)]
    interrupt = {
        "local_seconds_to_stop": stops,
        "median_seconds": statistics.median(stops),
        "kill_grace_seconds": KILL_GRACE_SECONDS,
        "bound_seconds": 15.0,
        "within_bound": max(stops) < 15.0,
    }
    load_after = os.getloadavg()
    out = {
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
        "models": n,
        "at_once": jobs,
        "indices_per_task": args.indices_per_task,
        "slurm_poll_seconds": 0.5,
        "repeats": args.repeats,
        "load_before": load_before,
        "load_after": load_after,
        "results": results,
        "interrupt": interrupt,
    }
    text = json.dumps(out, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(
        f"{n} models, {jobs} at a time; load before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} (1 min)"
    )
    print(f"median of {args.repeats} run(s) each, interleaved")
    print(f"{'models':14s} {'way':8s} {'seconds':>8s} {'models/h':>10s} {'x seed':>7s}")
    for label, row in results.items():
        for name in ways:
            way = row[name]
            print(
                f"{label:14s} {name:8s} {way['seconds']:8.2f} {way['models_per_hour']:10.0f} "
                f"{way['ratio_to_seed']:7.2f}"
            )
        bound = row.get("bound", {})
        if bound.get("max_ratio_to_seed"):
            print(
                f"{label:14s} ceiling: {bound['best_models_per_hour']:.0f} models/h "
                f"({jobs} x sleep alone), at most {bound['max_ratio_to_seed']:.2f} x seed "
                f"(seed start-up {bound['seed_startup_seconds_per_model']:.2f} s per model)"
            )
    print(
        f"interrupted local launcher stopped in {interrupt['median_seconds']:.2f} s (median; "
        f"runs {', '.join(f'{x:.2f}' for x in stops)}; bound 15 s, SIGKILL after "
        f"{KILL_GRACE_SECONDS:g} s)"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0 if interrupt["within_bound"] else 1


if __name__ == "__main__":
    raise SystemExit(_bench())
