"""Benchmark: what orchestration costs, per run and per model, side by side in one run.

Run from the repository root::

    .venv/bin/python benchmarks/orchestration_bench.py [--models 2000] [--block 100]
        [--sections per_model,per_run,minimal_all,ui] [--label after]
        [--out benchmarks/results/orchestration.json]

The trainer does no work (``dm_assets/examples/noop``), so every second measured is overhead.
Four ways train the same ``--models`` models into fresh stores (2 CPU device slots):

1. ``in_process``: :func:`dm_assets.training.runner.run_indices` in this process, one commit
   per second (the floor: the store's own cost per model);
2. ``train_models``: :func:`dm_assets.training.local.train_models`, 2 worker processes (what a
   Dagster partition run does inside its step);
3. ``dagster_materialize``: ``dg.materialize`` of the store and every training partition
   (blocks of ``--block``) in this process, one run;
4. ``dagster_launch``: ``python -m dm_assets.launch <name>_train`` (a run worker process,
   followed to the end), one run.

And per run: ``python -m dm_assets.launch`` of one partition holding one model, against the
seed's way of running one model (one ``python -m dm_assets.worker --worker.index=I`` process),
3 times each. Reported: seconds, seconds per model, and ratios to ``in_process`` (per model)
and to the seed's one-model process (per run).

Two whole-graph measurements, each into a fresh ``DM_HOME`` with the shipped experiments (what a
user does first), split into where the time goes (run creation, run worker start-up, each step,
the gaps between steps, the end) from the instance's own run and step records:

- ``minimal_all``: ``python -m dm_assets.launch minimal_all`` (no daemon), its wall time against
  the sum of its steps' own times; also the time to import the definitions
  (``python -c "import dm_assets.pipeline.definitions"``, what every code server and run worker
  pays) beside ``import dagster`` alone;
- ``ui``: ``python -m dm_assets.ui dagster`` (``dagster dev``: webserver and daemon) and, once
  its backfill daemon is healthy, the two ways its dialog materializes every asset of
  ``minimal`` over its 6 partitions (:func:`section_ui`): the asset backfill ("Materialize
  all" in the asset graph; GraphQL ``launchPartitionBackfill``) and then the job
  ``minimal_all`` launched as a single run (GraphQL ``launchRun``), each from submission to
  its end, per run: waiting for a daemon tick, queued, run worker start-up, steps.

``--sections`` picks some (default all; ``minimal_all,ui`` takes about a minute and a half on a
quiet 2-core machine once ``regression_dataset`` takes seconds); ``--label`` names the results
in the JSON (``before`` / ``after`` a change), keeping the other labels' results in the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

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


def section_per_model(args: argparse.Namespace, work: Path, sections: list[str]) -> dict[str, Any]:
    """The per-model ways (1-4 above) and the per-run comparison, in their own DM_HOME."""
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
    out: dict[str, Any] = {"models": n, "block": block}
    routine = load_routine("dm_assets.examples.noop.train_noop")

    def launch(job_name: str, *extra: str) -> float:
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "dm_assets.launch", job_name, "--quiet", *extra],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - t

    if "per_model" in sections:
        results: dict[str, dict[str, float]] = {}
        # 1. in process
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

        # 4. python -m dm_assets.launch, followed to the end
        results["dagster_launch"] = {"seconds": launch("bench_launch_train")}
        for way in results.values():
            way["seconds_per_model"] = way["seconds"] / n
            way["ratio_per_model_to_in_process"] = way["seconds"] / results["in_process"]["seconds"]
        out["per_model"] = results
        print(f"{n} no-op models, blocks of {block}, 2 CPU slots")
        print(f"{'way':22s} {'seconds':>9s} {'ms/model':>9s} {'x in_process':>12s}")
        for name, way in results.items():
            print(
                f"{name:22s} {way['seconds']:9.2f} {1000 * way['seconds_per_model']:9.3f} "
                f"{way['ratio_per_model_to_in_process']:12.2f}"
            )

    if "per_run" in sections:
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
        per_run: dict[str, Any] = {
            "launch_one_model_seconds": statistics.median(one_run),
            "seed_worker_one_model_seconds": statistics.median(one_seed),
            "all_launch_seconds": one_run,
            "all_seed_seconds": one_seed,
        }
        per_run["ratio"] = (
            per_run["launch_one_model_seconds"] / per_run["seed_worker_one_model_seconds"]
        )
        out["per_run"] = per_run
        print(
            f"one model per run: launch {per_run['launch_one_model_seconds']:.2f} s, seed worker "
            f"process {per_run['seed_worker_one_model_seconds']:.2f} s "
            f"(ratio {per_run['ratio']:.1f})"
        )
    return out


SECTIONS = ("per_model", "per_run", "minimal_all", "ui")


def fresh_env(home: Path) -> dict[str, str]:
    """The environment of a first use: ``DM_HOME=home``, the shipped experiments only, the
    Dagster instance in ``$DM_HOME/dagster`` (prepared by the commands themselves)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "DM_EXPERIMENTS")}
    env["DM_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def median_wall(command: list[str], times: int = 3) -> float:
    walls = []
    for _ in range(times):
        t = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
    return statistics.median(walls)


def run_breakdown(instance: Any, run_id: str) -> dict[str, Any]:
    """Where one run's time went, from the instance's records (epoch seconds): ``created``,
    ``enqueued``/``launched`` (None when not queued), ``started`` (RUN_START), ``ended``, and
    each step's own seconds."""
    import dagster as dg

    record = instance.get_run_records(filters=dg.RunsFilter(run_ids=[run_id]))[0]
    stats = instance.get_run_stats(run_id)
    steps = {
        s.step_key: s.end_time - s.start_time
        for s in instance.get_run_step_stats(run_id)
        if s.start_time is not None and s.end_time is not None
    }
    return {
        "run_id": run_id,
        "status": record.dagster_run.status.value,
        "created": record.create_timestamp.timestamp(),
        "enqueued": stats.enqueued_time,
        "launched": stats.launch_time,
        "started": stats.start_time,
        "ended": stats.end_time,
        "steps": steps,
    }


def section_minimal_all(work: Path) -> dict[str, Any]:
    """``python -m dm_assets.launch minimal_all`` into a fresh DM_HOME; its phases."""
    import dagster as dg

    home = work / "minimal_all_home"
    env = fresh_env(home)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "dm_assets.launch", "minimal_all", "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    t1 = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"launch minimal_all failed:\n{proc.stdout}\n{proc.stderr}")
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    (run,) = instance.get_runs()
    b = run_breakdown(instance, run.run_id)
    work_s = sum(b["steps"].values())
    dataset = sum(v for k, v in b["steps"].items() if k.endswith("regression_dataset"))
    out = {
        "seconds": t1 - t0,
        "steps_seconds": work_s,
        "overhead_seconds": t1 - t0 - work_s,
        "seconds_without_regression_dataset": t1 - t0 - dataset,
        "phases": {
            "command_start_to_run_created": b["created"] - t0,
            "run_created_to_run_start": b["started"] - b["created"],
            "steps": b["steps"],
            "between_steps": (b["ended"] - b["started"]) - work_s,
            "run_end_to_command_exit": t1 - b["ended"],
        },
        "import_definitions_seconds": median_wall(
            [sys.executable, "-c", "import dm_assets.pipeline.definitions"]
        ),
        "import_dagster_seconds": median_wall([sys.executable, "-c", "import dagster"]),
    }
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def graphql(base: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{base}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    if answer.get("errors"):
        raise RuntimeError(f"GraphQL errors: {answer['errors']}")
    return answer["data"]


LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
  }
}"""
DAEMON_HEALTH = """{ instance { daemonHealth {
  daemonStatus(daemonType: "BACKFILL") { healthy } } } }"""
REPOSITORIES = """{ repositoriesOrError { ... on RepositoryConnection {
  nodes { name location { name } } } } }"""
LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""
RUN_STATUS = """
query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"""


def wait_until(what: str, check: Any, timeout: float, poll: float = 0.25) -> Any:
    """``check()``'s first true answer, polled every ``poll`` s; RuntimeError after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: still waiting after {timeout:g} s")
        time.sleep(poll)


def section_ui(work: Path, experiment_name: str = "minimal") -> dict[str, Any]:
    """``python -m dm_assets.ui dagster`` into a fresh DM_HOME; once its backfill daemon is
    healthy, the two ways its dialog materializes every asset of ``experiment_name`` over all
    its partitions, one after the other (the second finds the models trained: it skips them):

    - ``backfill``: what "Materialize all" in the asset graph submits (an asset backfill,
      GraphQL ``launchPartitionBackfill``): a run per stage (the unpartitioned store, the
      partitions, the unpartitioned fit), each created by a tick of the backfill daemon;
    - ``single_run``: the job ``<name>_all`` launched "as a single run" over the partition
      range (GraphQL ``launchRun`` with the range tags), queued and dequeued by the daemon.
    """
    import dagster as dg

    from dm_assets.pipeline.assets import experiment_assets
    from dm_assets.pipeline.experiment import load_experiment

    experiment = load_experiment(REPO / "dm_assets" / "experiments" / f"{experiment_name}.yaml")
    keys = [
        key.path
        for a in experiment_assets(experiment)
        if isinstance(a, dg.AssetsDefinition)
        for key in a.keys
    ]
    partitions = experiment.partition_keys()
    home = work / "ui_home"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = work / "ui.log"
    t_serve = time.time()
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "dm_assets.ui", "dagster", "--port", str(port)],
            cwd=REPO,
            env=fresh_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def daemon_healthy() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"dagster dev exited:\n{log.read_text()[-3000:]}")
        try:
            health = graphql(base, DAEMON_HEALTH)
        except (urllib.error.URLError, ConnectionError, RuntimeError, TimeoutError):
            return False
        return bool(health["instance"]["daemonHealth"]["daemonStatus"]["healthy"])

    try:
        wait_until("dagster dev's backfill daemon", daemon_healthy, 300, poll=0.5)
        ready = time.time() - t_serve
        params = {
            "assetSelection": [{"path": k} for k in keys],
            "partitionNames": partitions,
            "fromFailure": False,
            "tags": [],
        }
        t0 = time.time()
        launched = graphql(base, LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(f"backfill not launched: {launched}")
        backfill_id = launched["backfillId"]

        def backfill_done() -> str | None:
            state = graphql(base, BACKFILL_STATUS, {"id": backfill_id})
            status = state["partitionBackfillOrError"].get("status")
            return None if status in ("REQUESTED", "CANCELING", None) else status

        backfill_status = wait_until(f"backfill {backfill_id}", backfill_done, 900)
        t1 = time.time()

        (repository,) = graphql(base, REPOSITORIES)["repositoriesOrError"]["nodes"]
        run_params = {
            "selector": {
                "jobName": f"{experiment_name}_all",
                "repositoryName": repository["name"],
                "repositoryLocationName": repository["location"]["name"],
            },
            "executionMetadata": {
                "tags": [
                    {"key": "dagster/asset_partition_range_start", "value": partitions[0]},
                    {"key": "dagster/asset_partition_range_end", "value": partitions[-1]},
                ]
            },
        }
        t2 = time.time()
        launched = graphql(base, LAUNCH_RUN, {"params": run_params})["launchRun"]
        if launched["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"run not launched: {launched}")
        single_id = launched["run"]["runId"]

        def run_done() -> str | None:
            state = graphql(base, RUN_STATUS, {"id": single_id})["runOrError"]["status"]
            return state if state in ("SUCCESS", "FAILURE", "CANCELED") else None

        single_status = wait_until(f"run {single_id}", run_done, 900)
        t3 = time.time()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    breakdown = sorted(
        (run_breakdown(instance, r.run_id) for r in runs), key=lambda b: b["created"]
    )
    return {
        "ui_ready_seconds": ready,
        "backfill": {"status": backfill_status, **stages(breakdown, t0, t1)},
        "single_run": {
            "status": single_status,
            **stages([run_breakdown(instance, single_id)], t2, t3),
        },
    }


def stages(breakdown: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Where the time between submission (``t0``) and the end seen (``t1``) went, run by run
    (``breakdown``: :func:`run_breakdown` of each, in order)."""
    work_s = sum(sum(b["steps"].values()) for b in breakdown)
    per_run = []
    previous_end = t0
    for b in breakdown:
        launched_at = b["launched"] if b["launched"] is not None else b["created"]
        per_run.append(
            {
                "steps": b["steps"],
                "status": b["status"],
                "wait_before_created": b["created"] - previous_end,
                "queued": launched_at - b["created"],
                "launch_to_run_start": b["started"] - launched_at,
                "steps_seconds": sum(b["steps"].values()),
                "run_start_to_end": b["ended"] - b["started"],
            }
        )
        previous_end = b["ended"]
    return {
        "seconds": t1 - t0,
        "runs": len(breakdown),
        "steps_seconds": work_s,
        "overhead_seconds": t1 - t0 - work_s,
        "last_run_end_to_seen_done": t1 - previous_end,
        "per_run": per_run,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--label", default="after", help="the results' name in the JSON")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/orchestration.json"))
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose among {', '.join(SECTIONS)}")
    work = Path(tempfile.mkdtemp(prefix="orch_bench_"))
    import torch

    out: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "load_before": os.getloadavg(),
    }
    if "per_model" in sections or "per_run" in sections:
        out.update(section_per_model(args, work, sections))
    if "minimal_all" in sections:
        out["minimal_all"] = section_minimal_all(work)
        m = out["minimal_all"]
        print(
            f"launch minimal_all: {m['seconds']:.1f} s, steps {m['steps_seconds']:.1f} s, "
            f"overhead {m['overhead_seconds']:.1f} s, without regression_dataset "
            f"{m['seconds_without_regression_dataset']:.1f} s; import definitions "
            f"{m['import_definitions_seconds']:.2f} s (dagster alone "
            f"{m['import_dagster_seconds']:.2f} s)"
        )
        print(json.dumps(m["phases"], indent=1))
    if "ui" in sections:
        out["ui"] = section_ui(work)
        for way in ("backfill", "single_run"):
            u = out["ui"][way]
            print(
                f"UI {way} of minimal: {u['status']} in {u['seconds']:.1f} s, {u['runs']} runs, "
                f"steps {u['steps_seconds']:.1f} s, overhead {u['overhead_seconds']:.1f} s"
            )
            print(json.dumps(u["per_run"], indent=1))
    out["load_after"] = os.getloadavg()
    path = Path(args.out)
    saved: dict[str, Any] = {}
    if path.exists():
        saved = json.loads(path.read_text())
        if "labels" not in saved:  # the file's earlier, unlabelled form
            saved = {"labels": {"earlier": saved}}
    saved.setdefault("labels", {})[args.label] = out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
