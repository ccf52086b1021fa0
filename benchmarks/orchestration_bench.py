"""Benchmark: what orchestration costs, per run and per model, side by side in one run.

Run from the repository root::

    .venv/bin/python benchmarks/orchestration_bench.py [--models 2000] [--block 100]
        [--out benchmarks/results/orchestration.json]

The trainer does no work (``dm_assets/examples/noop``), so every second measured is overhead.
Four ways train the same ``--models`` models into fresh stores (2 CPU device slots):

1. ``in_process``: :func:`dm_assets.training.runner.run_indices` in this process, one commit
   per second (the floor: the store's own cost per model);
2. ``train_models``: :func:`dm_assets.training.local.train_models`, 2 worker processes (what a
   Dagster partition run does inside its step);
3. ``dagster_materialize``: ``dg.materialize`` of the store and every training partition
   (blocks of ``--block``) in this process, one run;
4. ``dagster_launch``: ``python -m dm_assets.launch <name>_train`` (``dagster job launch``
   through a code server, a run worker process, followed to the end), one run.

And per run: ``python -m dm_assets.launch`` of one partition holding one model, against the
seed's way of running one model (one ``python -m dm_assets.worker --worker.index=I`` process),
3 times each. Reported: seconds, seconds per model, and ratios to ``in_process`` (per model)
and to the seed's one-model process (per run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EXPERIMENT = """
name: {name}
spec:
  num_models: {models}
  schema:
    masks: {{shape: [16], dtype: bool_}}
    margins: {{shape: [2], dtype: float16}}
trainer:
  main_import: dm_assets.examples.noop.train_noop
models_per_partition: {block}
max_partitions_per_run: {partitions}
devices: {{gpus: none, cpu_workers: 2}}
"""


def write_experiment(
    folder: Path, name: str, models: int, block: int, per_run: int | None = None
) -> Path:
    """A no-op experiment of ``models`` in blocks of ``block``, ``per_run`` partitions per
    backfill run (default: all of them)."""
    path = folder / f"{name}.yaml"
    partitions = per_run or -(-models // block)
    path.write_text(EXPERIMENT.format(name=name, models=models, block=block, partitions=partitions))
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/orchestration.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="orch_bench_"))
    exp_dir = work / "experiments"
    exp_dir.mkdir()
    home = work / "home"
    os.environ.update(
        DM_HOME=str(home), DM_EXPERIMENTS=str(exp_dir), DAGSTER_HOME=str(home / "dagster")
    )
    n, block = args.models, args.block
    for name, models, size in [
        ("bench_mat", n, block),
        ("bench_launch", n, block),
        ("bench_one", 10, 1),
    ]:
        write_experiment(exp_dir, name, models, size)

    import dagster as dg

    from dm_assets.pipeline.definitions import build_definitions, default_resources
    from dm_assets.pipeline.experiment import load_experiment
    from dm_assets.pipeline.runs import prepare_dagster_home
    from dm_assets.store.spec import Spec
    from dm_assets.store.store import Store
    from dm_assets.training.devices import DeviceSlots, detect_devices
    from dm_assets.training.local import train_models
    from dm_assets.training.runner import load_routine, run_indices

    prepare_dagster_home()
    spec = Spec.from_dict(
        {
            "num_models": n,
            "schema": {
                "masks": {"shape": [16], "dtype": "bool_"},
                "margins": {"shape": [2], "dtype": "float16"},
            },
        }
    )
    results: dict[str, dict[str, float]] = {}
    load = os.getloadavg()

    # 1. in process
    routine = load_routine("dm_assets.examples.noop.train_noop")
    with Store.initialize(work / "s1", spec) as store:
        t = time.perf_counter()
        report = run_indices(store, routine, range(n), commit_every=1.0)
        results["in_process"] = {"seconds": time.perf_counter() - t}
    assert len(report.trained) == n

    # 2. train_models, 2 worker processes
    Store.initialize(work / "s2", spec).close()
    slots = DeviceSlots(work / "locks", detect_devices("none", cpu_slots=2))
    with slots.acquire(2) as lease:
        t = time.perf_counter()
        trained = train_models(
            work / "s2",
            list(range(n)),
            main_import=routine.__module__,
            lease=lease,
            progress_every=60,
        )
        results["train_models"] = {"seconds": time.perf_counter() - t}
    assert len(trained.trained) == n, trained.summary()

    # 3. dagster materialize in process, every partition in one run
    experiment = load_experiment(exp_dir / "bench_mat.yaml")
    defs = build_definitions([experiment], default_resources(str(home)))
    job = defs.resolve_job_def("bench_mat_train")
    keys = experiment.partition_keys()
    t = time.perf_counter()
    result = job.execute_in_process(
        instance=dg.DagsterInstance.get(),
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )
    results["dagster_materialize"] = {"seconds": time.perf_counter() - t}
    assert result.success

    # 4. dagster job launch, followed
    def launch(job_name: str, *extra: str) -> float:
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "dm_assets.launch", job_name, "--quiet", *extra],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - t

    results["dagster_launch"] = {"seconds": launch("bench_launch_train")}
    for way in results.values():
        way["seconds_per_model"] = way["seconds"] / n
        way["ratio_per_model_to_in_process"] = way["seconds"] / results["in_process"]["seconds"]

    # per run: one model through a whole launch, against one seed worker process
    Store.initialize(work / "s3", Spec.from_dict({**spec.to_dict(), "num_models": 10})).close()
    one_run, one_seed = [], []
    for i in range(3):
        one_run.append(launch("bench_one_train", "--partitions", str(i)))
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dm_assets.worker",
                f"--worker.index={i}",
                f"--worker.logdir={work / 's3'}",
                f"--worker.main_import={routine.__module__}",
            ],
            cwd=REPO,
            check=True,
            stderr=subprocess.DEVNULL,
        )
        one_seed.append(time.perf_counter() - t)
    per_run = {
        "launch_one_model_seconds": statistics.median(one_run),
        "seed_worker_one_model_seconds": statistics.median(one_seed),
        "all_launch_seconds": one_run,
        "all_seed_seconds": one_seed,
    }
    per_run["ratio"] = (
        per_run["launch_one_model_seconds"] / per_run["seed_worker_one_model_seconds"]
    )
    db = home / "dagster" / "history" / "runs.db"
    out = {
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
        "models": n,
        "block": block,
        "load_before": load,
        "load_after": os.getloadavg(),
        "per_model": results,
        "per_run": per_run,
        "instance_bytes": sum(f.stat().st_size for f in (home / "dagster").rglob("*.db")),
        "runs_db": str(db),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{n} no-op models, blocks of {block}, 2 CPU slots; load {load[0]:.1f}")
    print(f"{'way':22s} {'seconds':>9s} {'ms/model':>9s} {'x in_process':>12s}")
    for name, way in results.items():
        print(
            f"{name:22s} {way['seconds']:9.2f} {1000 * way['seconds_per_model']:9.3f} "
            f"{way['ratio_per_model_to_in_process']:12.2f}"
        )
    print(
        f"one model per run: launch {per_run['launch_one_model_seconds']:.2f} s, seed worker "
        f"process {per_run['seed_worker_one_model_seconds']:.2f} s (ratio {per_run['ratio']:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
