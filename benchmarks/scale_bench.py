"""Benchmark: the pipeline at the paper's scale (300,000 models), and the dataset's write, measured.

Run from the repository root::

    .venv/bin/python benchmarks/scale_bench.py [--parts orchestration,store,small]
        [--runs-seconds 300] [--rows 5000] [--store-repeats 3]
        [--out benchmarks/results/scale.json]

``--parts store,small`` (the dataset's numbers) takes about 2 minutes on a quiet 2-core machine,
most of it the FFCV reference's processes (each imports FFCV, seconds of numba compilation);
``orchestration`` about 6 minutes. The parts not run keep their earlier results in the output
file; each part records its machine and load (``<part>_run``).

1. ``orchestration``: a 300,000-model experiment with the no-op trainer
   (``dm_assets/examples/noop``) in blocks of ``--block`` (100: 3,000 partitions), grouped
   ``--partitions-per-run`` (20) to a run, as a backfill does: 150 runs. The ``<name>_train``
   job runs in process (``execute_in_process`` on ``DagsterInstance.get()``, ``DAGSTER_HOME``
   in a temporary folder, the range tags of each run's partitions), one run after the other,
   for as many runs as ``--runs-seconds`` allows; the rest of the 150 runs is extrapolated from
   the measured ones (and said so). Reported: seconds per run and per model (every second is
   overhead: the trainer does no work), against the floor of training one run's models in
   process (:func:`dm_assets.training.runner.run_indices`); the instance database size (SQLite files
   under ``DAGSTER_HOME``) after the runs, and its growth per run.
2. ``store``: a store of 300,000 x 50,000 bool ``masks`` + 300,000 x 10,000 float16 ``margins``
   (``Store.initialize``: sparse, about 21 GB apparent), ``--rows`` consecutive rows written with
   ``Store.write_rows`` (groups of 100), then, side by side, from a cold page cache
   (``posix_fadvise(DONTNEED)`` on the store's files first) and again warm:

   - ``raw``: a sequential read of the rows' bytes from the ``.npy`` files (``readinto`` in
     chunks of 64 MiB), the reference of the goal (write the dataset at half this bandwidth or
     better);
   - ``write_beton``: :func:`dm_assets.regression.beton_writer.write_beton` of those rows
     (its defaults: threads = CPU count, fsynced);
   - ``ffcv``: FFCV 1.0.2's own ``DatasetWriter`` at its defaults (a process per CPU, pages of
     8 MiB; FFCV and its numba compilation imported and warmed up on a tiny dataset first, not
     timed) writing the same rows, fsynced, what ``write_beton`` ran before it wrote the format
     itself.

   - ``copy`` (cold only): the least any converter of these rows does, in one thread: the
     rows' bytes read in 4 MiB pieces (masks and targets interleaved, as ``write_beton``
     reads them) and as many bytes as the dataset written, each piece started to disk at
     once (``sync_file_range``), then fsynced.

   And the floor of any writer that persists the dataset, ``write_only``: the dataset's
   bytes written from memory to a new file and fsynced, ``plain`` (64 MiB writes, then
   ``fsync``) and ``overlapped`` (4 MiB writes, each followed by ``sync_file_range`` so that
   the disk writes meanwhile, as ``write_beton`` does). All of it ``--store-repeats`` (3)
   times, alternating; medians, every sample kept. Reported: MB/s of store bytes for each,
   ``ratio_beton_to_raw`` (the goal: at least 0.5), ``ratio_ffcv_to_raw``,
   ``ratio_copy_to_raw`` and ``ratio_beton_to_copy`` (the median over repeats of each
   repeat's ratio: this machine's disk drifts between repeats more than within one),
   ``ratio_write_only_to_raw`` (the best any persisting writer can reach: it bounds the
   goal), the rows/s of the store's writes and the disk usage of the store and the dataset.
3. ``small``: the cost of a whole ``python -m dm_assets.regression.write_dataset`` process
   (start-up, imports, checks, write, fsync) on stores of the shipped experiments' shapes
   (``minimal``: 300 x 60 bool + 4 float16; ``digits``: 5,000 x 1,000 bool + 797 float32) and
   one near 100 MB (12,000 x 2,000 bool + 1,500 float16), against a fresh process running
   FFCV's ``DatasetWriter`` at its defaults on the same rows (importing FFCV, as the former
   writer did). Median of 3 process wall times each; the files' sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from orchestration_bench import write_experiment  # noqa: E402  (benchmarks/ is on sys.path)

MODELS = 300_000
MB = 1e6


def allocated_bytes(path: Path) -> int:
    """Disk blocks actually used under ``path`` (a file or a folder), in bytes."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def apparent_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def orchestration(args: argparse.Namespace, work: Path) -> dict[str, object]:
    exp_dir = work / "experiments"
    exp_dir.mkdir(parents=True)
    home = work / "home"
    dagster_home = home / "dagster"
    os.environ.update(
        DM_HOME=str(home), DM_EXPERIMENTS=str(exp_dir), DAGSTER_HOME=str(dagster_home)
    )
    name = "scale"
    write_experiment(exp_dir, name, MODELS, args.block, args.partitions_per_run)
    import dagster as dg

    from dm_assets.pipeline.definitions import build_definitions, default_resources
    from dm_assets.pipeline.experiment import load_experiment
    from dm_assets.pipeline.runs import prepare_dagster_home
    from dm_assets.store.spec import Spec
    from dm_assets.store.store import Store
    from dm_assets.training.runner import load_routine, run_indices

    prepare_dagster_home()
    experiment = load_experiment(exp_dir / f"{name}.yaml")
    t = time.perf_counter()
    defs = build_definitions([experiment], default_resources(str(home)))
    job = defs.resolve_job_def(f"{name}_train")
    definitions_seconds = time.perf_counter() - t
    keys = experiment.partition_keys()
    per = args.partitions_per_run
    groups = [keys[i : i + per] for i in range(0, len(keys), per)]
    models_per_run = args.block * per
    instance = dg.DagsterInstance.get()

    # the floor: one run's models trained in this process into a store of the same spec
    routine = load_routine("dm_assets.examples.noop.train_noop")
    spec = Spec.from_dict(
        {
            "num_models": MODELS,
            "schema": {
                "masks": {"shape": [16], "dtype": "bool_"},
                "margins": {"shape": [2], "dtype": "float16"},
            },
        }
    )
    with Store.initialize(work / "floor", spec) as store:
        t = time.perf_counter()
        run_indices(store, routine, range(models_per_run), commit_every=1.0)
        floor = time.perf_counter() - t

    runs: list[dict[str, float]] = []
    started = time.perf_counter()
    for group in groups:
        if runs and time.perf_counter() - started > args.runs_seconds:
            break
        t = time.perf_counter()
        result = job.execute_in_process(
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": group[0],
                "dagster/asset_partition_range_end": group[-1],
            },
        )
        seconds = time.perf_counter() - t
        assert result.success, f"run of {group[0]}..{group[-1]} failed"
        runs.append(
            {
                "seconds": seconds,
                "instance_bytes": apparent_bytes(dagster_home),
                "load_1min": os.getloadavg()[0],
            }
        )
        print(
            f"  run {len(runs)}/{len(groups)} ({group[0]}..{group[-1]}): {seconds:.2f} s, "
            f"instance {runs[-1]['instance_bytes'] / MB:.1f} MB",
            flush=True,
        )
    done = len(runs)
    with Store.open(home / name / "store") as store:
        completed = int(store.completed_mask().sum())
    assert completed == done * models_per_run, (completed, done * models_per_run)
    seconds = [r["seconds"] for r in runs]
    later = seconds[1:] or seconds  # the first run also initializes the store
    mean_later = sum(later) / len(later)
    db_files = {
        str(p.relative_to(dagster_home)): p.stat().st_size
        for p in sorted(dagster_home.rglob("*"))
        if p.is_file() and ".db" in p.name
    }
    instance_bytes = sum(db_files.values())
    growth = (runs[-1]["instance_bytes"] - runs[0]["instance_bytes"]) / max(1, done - 1)
    remaining = len(groups) - done
    return {
        "models": MODELS,
        "models_per_partition": args.block,
        "partitions": len(keys),
        "partitions_per_run": per,
        "runs_needed": len(groups),
        "runs_measured": done,
        "models_trained": completed,
        "definitions_seconds": definitions_seconds,
        "first_run_seconds": seconds[0],
        "mean_run_seconds_after_first": mean_later,
        "median_run_seconds": sorted(seconds)[len(seconds) // 2],
        "last_run_seconds": seconds[-1],
        "seconds_per_model": mean_later / models_per_run,
        "in_process_floor_seconds_per_run": floor,
        "in_process_floor_seconds_per_model": floor / models_per_run,
        "overhead_seconds_per_run": mean_later - floor,
        "overhead_seconds_per_model": (mean_later - floor) / models_per_run,
        "ratio_run_to_in_process": mean_later / floor,
        "measured_seconds_total": sum(seconds),
        "all_150_runs_seconds": (
            sum(seconds) + remaining * mean_later if remaining else sum(seconds)
        ),
        "all_runs_extrapolated": bool(remaining),
        "instance_db_bytes": instance_bytes,
        "instance_db_files": len(db_files),
        "instance_bytes_all_files": apparent_bytes(dagster_home),
        "instance_growth_bytes_per_run": growth,
        "instance_bytes_after_all_runs_extrapolated": (
            runs[-1]["instance_bytes"] + remaining * growth
        ),
        "runs": runs,
    }


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths_ranges: list[tuple[Path, int, int]], chunk: int = 64 << 20) -> int:
    """Read bytes ``[start, stop)`` of each file sequentially; the bytes read."""
    total = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    for path, start, stop in paths_ranges:
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            left = stop - start
            while left > 0:
                n = f.readinto(view[: min(chunk, left)])
                if not n:
                    raise OSError(f"{path}: short read at {stop - left}")
                total += n
                left -= n
    return total


def copy_floor(paths_ranges: list[tuple[Path, int, int]], out: Path, nbytes: int) -> None:
    """The least any converter of these rows into a dataset of ``nbytes`` bytes does, in one
    thread: read the rows' bytes (each file's range, in as many pieces as the output has
    4 MiB pieces, interleaved as ``write_beton`` reads masks and targets) and write ``nbytes``
    to ``out``, each piece started to disk at once (``sync_file_range``), then ``fsync``."""
    from dm_assets.regression.beton_writer import _start_writeback

    chunk = 4 << 20
    pieces = -(-nbytes // chunk)
    buf = bytearray(chunk)
    view = memoryview(buf)
    fds = [os.open(path, os.O_RDONLY) for path, _, _ in paths_ranges]
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for f in fds:
            os.posix_fadvise(f, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        steps = [-(-(stop - start) // pieces) for _, start, stop in paths_ranges]
        for piece in range(pieces):
            at = 0
            for f, (_, start, stop), step in zip(fds, paths_ranges, steps, strict=True):
                lo = start + piece * step
                n = max(0, min(step, stop - lo, chunk - at))
                if n:
                    os.preadv(f, [view[at : at + n]], lo)
                    at += n
            offset = piece * chunk
            size = min(chunk, nbytes - offset)
            written = os.pwrite(fd, view[:size], offset)
            assert written == size
            _start_writeback(fd, offset, size)
        os.fsync(fd)
    finally:
        os.close(fd)
        for f in fds:
            os.close(f)


class _StoreRows:
    """The store's rows ``indices`` as FFCV's writer asks for them (item ``i``: mask, float32
    targets, model index); each writer process maps the files itself."""

    def __init__(self, store: Path, indices: list[int]) -> None:
        self.store, self.indices = store, indices
        self._x = self._y = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_x": None, "_y": None}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[object, object, int]:
        import numpy as np

        if self._x is None:
            self._x = np.load(self.store / "masks.npy", mmap_mode="r")
            self._y = np.load(self.store / "margins.npy", mmap_mode="r")
        m = self.indices[i]
        return (
            np.ascontiguousarray(self._x[m]),
            np.asarray(self._y[m]).reshape(-1).astype(np.float32),
            m,
        )


def ffcv_write(store: Path, out: Path, n_rows: int) -> None:
    """FFCV's own DatasetWriter at its defaults on the store's first ``n_rows`` rows, fsynced."""
    import numpy as np
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    from dm_assets.store.store import fsync_path

    x = np.load(store / "masks.npy", mmap_mode="r")
    y = np.load(store / "margins.npy", mmap_mode="r")
    fields = {
        "mask": NDArrayField(dtype=x.dtype, shape=(x.shape[1],)),
        "targets": NDArrayField(dtype=np.dtype(np.float32), shape=(int(np.prod(y.shape[1:])),)),
        "idx": IntField(),
    }
    DatasetWriter(str(out), fields).from_indexed_dataset(_StoreRows(store, list(range(n_rows))))
    fsync_path(out)


def make_store(path: Path, n: int, p: int, t: int, y_dtype: str) -> None:
    import numpy as np

    from dm_assets.store.spec import Spec
    from dm_assets.store.store import Store

    spec = Spec.from_dict(
        {
            "num_models": n,
            "schema": {
                "masks": {"shape": [p], "dtype": "bool_"},
                "margins": {"shape": [t], "dtype": y_dtype},
            },
        }
    )
    rng = np.random.default_rng(0)
    masks = rng.random((100, p)) < 0.5
    margins = rng.standard_normal((100, t)).astype(y_dtype)
    with Store.initialize(path, spec) as store:
        for first in range(0, n, 100):
            batch = range(first, min(first + 100, n))
            store.write_rows(
                [(i, {"masks": masks[i % 100], "margins": margins[i % 100]}) for i in batch]
            )


def store_and_beton(args: argparse.Namespace, work: Path) -> dict[str, object]:
    import numpy as np

    from dm_assets.regression.beton_writer import _start_writeback, write_beton
    from dm_assets.store.spec import Spec
    from dm_assets.store.store import Store, read_npy_layout

    n_features, n_targets, rows = 50_000, 10_000, args.rows
    spec = Spec.from_dict(
        {
            "num_models": MODELS,
            "schema": {
                "masks": {"shape": [n_features], "dtype": "bool_"},
                "margins": {"shape": [n_targets], "dtype": "float16"},
            },
        }
    )
    path = work / "store"
    t = time.perf_counter()
    Store.initialize(path, spec).close()
    init_seconds = time.perf_counter() - t
    after_init = {"apparent": apparent_bytes(path), "allocated": allocated_bytes(path)}

    rng = np.random.default_rng(0)
    masks = rng.random((100, n_features)) < 0.5
    margins = rng.standard_normal((100, n_targets)).astype(np.float16)
    group = 100
    t = time.perf_counter()
    with Store.open(path) as store:
        for first in range(0, rows, group):
            batch = range(first, min(first + group, rows))
            store.write_rows(
                [(i, {"masks": masks[i % 100], "margins": margins[i % 100]}) for i in batch]
            )
    write_seconds = time.perf_counter() - t
    after_write = {"apparent": apparent_bytes(path), "allocated": allocated_bytes(path)}

    ranges = []
    for key, row_bytes in (("masks", n_features), ("margins", 2 * n_targets)):
        file = path / f"{key}.npy"
        _, _, offset = read_npy_layout(file)
        ranges.append((file, offset, offset + rows * row_bytes))
    store_bytes = sum(stop - start for _, start, stop in ranges)
    files = [path / "masks.npy", path / "margins.npy", path / "_completed.npy"]

    # warm-up, not timed: FFCV imported and its numba code compiled on a tiny store, and ours
    tiny = Spec.from_dict({**spec.to_dict(), "num_models": 4})
    with Store.initialize(work / "tiny", tiny) as store:
        store.write_rows([(i, {"masks": masks[i], "margins": margins[i]}) for i in range(4)])
    write_beton(work / "tiny", work / "tiny.beton")
    ffcv_write(work / "tiny", work / "tiny_ffcv.beton", 4)

    beton, ffcv_beton = work / "data.beton", work / "ffcv.beton"
    copy_out = work / "copy.bin"
    samples: dict[str, dict[str, list[float]]] = {
        "cold": {"raw": [], "write_beton": [], "ffcv": [], "copy": []},
        "warm": {"raw": [], "write_beton": [], "ffcv": []},
    }
    floors: dict[str, list[float]] = {"plain": [], "overlapped": []}
    loads: dict[str, list[float]] = {"cold": [], "warm": []}
    beton_bytes = ffcv_bytes = 0
    data = b""
    for repeat in range(args.store_repeats):
        for cache in ("cold", "warm"):
            times = samples[cache]
            # alternating, each from the same cache state; in this order: the copy writes as
            # many bytes as the dataset write_beton wrote before it
            for name in times:
                for out in (beton, ffcv_beton, copy_out):
                    out.unlink(missing_ok=True)
                if cache == "cold":
                    drop_cache(files)
                t = time.perf_counter()
                if name == "raw":
                    assert raw_read(ranges) == store_bytes
                elif name == "write_beton":
                    summary = write_beton(path, beton)
                    assert summary.rows == rows
                    assert (summary.idx_min, summary.idx_max) == (0, rows - 1)
                elif name == "ffcv":
                    ffcv_write(path, ffcv_beton, rows)
                else:
                    copy_floor(ranges, copy_out, beton_bytes)
                times[name].append(time.perf_counter() - t)
                if name == "write_beton":
                    beton_bytes = summary.nbytes
                    if not data:
                        data = beton.read_bytes()
                elif name == "ffcv":
                    ffcv_bytes = ffcv_beton.stat().st_size
            loads[cache].append(os.getloadavg()[0])
            print(
                f"  repeat {repeat + 1}, {cache}: "
                + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in times),
                flush=True,
            )
        # the floor of any writer that persists the dataset: its bytes, from memory, fsynced;
        # plainly (64 MiB writes, then fsync) and with the disk writing while the rest is
        # written (4 MiB writes, each followed by sync_file_range, as write_beton does)
        for name, chunk, overlap in (("plain", 64 << 20, False), ("overlapped", 4 << 20, True)):
            floor_file = work / f"floor_{name}.bin"
            t = time.perf_counter()
            fd = os.open(floor_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                offset = 0
                while offset < len(data):
                    n = os.pwrite(fd, memoryview(data)[offset : offset + chunk], offset)
                    if overlap:
                        _start_writeback(fd, offset, n)
                    offset += n
                os.fsync(fd)
            finally:
                os.close(fd)
            floors[name].append(time.perf_counter() - t)
            floor_file.unlink()
    del data
    median = statistics.median

    def paired(cache: str, over: str, under: str) -> float:
        """The median over repeats of ``over``'s seconds / ``under``'s of the same repeat (the
        machine's speed drifts between repeats more than within one)."""
        times = samples[cache]
        return median(a / b for a, b in zip(times[over], times[under], strict=True))

    raw_median = {cache: median(times["raw"]) for cache, times in samples.items()}
    measured: dict[str, dict[str, object]] = {}
    for cache, times in samples.items():
        raw_s = raw_median[cache]
        beton_s, ffcv_s = (median(times[k]) for k in ("write_beton", "ffcv"))
        measured[cache] = {
            "raw_read_seconds": raw_s,
            "raw_read_MB_per_s": store_bytes / MB / raw_s,
            "write_beton_seconds": beton_s,
            "write_beton_MB_per_s": store_bytes / MB / beton_s,
            "ratio_beton_to_raw": paired(cache, "raw", "write_beton"),
            "ffcv_seconds": ffcv_s,
            "ffcv_MB_per_s": store_bytes / MB / ffcv_s,
            "ratio_ffcv_to_raw": paired(cache, "raw", "ffcv"),
            "beton_bytes": beton_bytes,
            "ffcv_beton_bytes": ffcv_bytes,
            "load_1min": loads[cache],
            "samples_seconds": times,
        }
        if "copy" in times:
            measured[cache].update(
                {
                    "copy_seconds": median(times["copy"]),
                    "ratio_copy_to_raw": paired(cache, "raw", "copy"),
                    "ratio_beton_to_copy": paired(cache, "copy", "write_beton"),
                }
            )
    floor_medians = {k: median(v) for k, v in floors.items()}
    return {
        "models": MODELS,
        "n_features": n_features,
        "n_targets": n_targets,
        "rows_written": rows,
        "initialize_seconds": init_seconds,
        "write_rows_seconds": write_seconds,
        "write_rows_per_second": rows / write_seconds,
        "write_rows_MB_per_s": store_bytes / MB / write_seconds,
        "store_bytes_of_rows": store_bytes,
        "store_after_initialize": after_init,
        "store_after_writes": after_write,
        "beton_allocated_bytes": allocated_bytes(beton),
        "beton_workers": "default (threads: CPU count, at most 8)",
        "repeats": args.store_repeats,
        "write_only_seconds": floor_medians,
        "write_only_samples_seconds": floors,
        "write_only_MB_per_s_of_store_bytes": {
            k: store_bytes / MB / v for k, v in floor_medians.items()
        },
        "ratio_write_only_to_raw": {
            cache: {k: raw / v for k, v in floor_medians.items()}
            for cache, raw in raw_median.items()
        },
        "read": measured,
    }


SMALL_SHAPES = {
    # name: (models, mask values, targets, targets dtype)
    "minimal": (300, 60, 4, "float16"),
    "digits": (5_000, 1_000, 797, "float32"),
    "near_100MB": (12_000, 2_000, 1_500, "float16"),
}

_FFCV_PROCESS = """
import sys
sys.path.insert(0, {bench!r})
from pathlib import Path
from scale_bench import ffcv_write
ffcv_write(Path({store!r}), Path({out!r}), {rows})
"""


def timed_process(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - t


def small_datasets(work: Path, repeats: int = 3) -> dict[str, object]:
    """Whole ``write_dataset`` processes against fresh FFCV-writer processes (module doc)."""
    python = sys.executable
    results: dict[str, object] = {}
    for name, (n, p, t, y_dtype) in SMALL_SHAPES.items():
        store = work / name
        make_store(store, n, p, t, y_dtype)
        store_bytes = allocated_bytes(store / "masks.npy") + allocated_bytes(store / "margins.npy")
        ours, theirs = [], []
        for i in range(repeats):
            out = work / f"{name}_{i}.beton"
            ours.append(
                timed_process(
                    [
                        python,
                        "-m",
                        "dm_assets.regression.write_dataset",
                        f"--cfg.data_dir={store}",
                        f"--cfg.out_path={out}",
                    ]
                )
            )
            ffcv_out = work / f"{name}_{i}_ffcv.beton"
            code = _FFCV_PROCESS.format(
                bench=str(REPO / "benchmarks"), store=str(store), out=str(ffcv_out), rows=n
            )
            theirs.append(timed_process([python, "-c", code]))
        results[name] = {
            "models": n,
            "mask_values": p,
            "targets": t,
            "targets_dtype": y_dtype,
            "store_bytes_of_rows_allocated": store_bytes,
            "write_dataset_process_seconds": ours,
            "ffcv_process_seconds": theirs,
            "median_write_dataset_seconds": statistics.median(ours),
            "median_ffcv_seconds": statistics.median(theirs),
            "ratio_ffcv_to_ours": statistics.median(theirs) / statistics.median(ours),
            "beton_bytes": (work / f"{name}_0.beton").stat().st_size,
            "ffcv_beton_bytes": (work / f"{name}_0_ffcv.beton").stat().st_size,
            "load_1min": os.getloadavg()[0],
        }
        r = results[name]
        print(
            f"  {name}: write_dataset {r['median_write_dataset_seconds']:.2f} s "
            f"({r['beton_bytes']:,} bytes), FFCV's writer {r['median_ffcv_seconds']:.2f} s "
            f"({r['ffcv_beton_bytes']:,} bytes)",
            flush=True,
        )
    return results


def machine() -> dict[str, object]:
    import numpy
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "load": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="orchestration,store,small")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--partitions-per-run", type=int, default=20)
    parser.add_argument("--runs-seconds", type=float, default=300.0)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--store-repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/scale.json"))
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - {"orchestration", "store", "small"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: choose from orchestration, store, small")
    out_path = Path(args.out)
    # the parts not run keep their earlier results
    out: dict[str, object] = json.loads(out_path.read_text()) if out_path.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="scale_bench_"))
    import shutil

    runners = {
        "orchestration": lambda: orchestration(args, work / "orchestration"),
        "store": lambda: store_and_beton(args, work / "store"),
        "small": lambda: small_datasets(work / "small"),
    }
    try:
        for part in ("orchestration", "store", "small"):
            if part not in parts:
                continue
            (work / part).mkdir()
            before = machine()
            t = time.perf_counter()
            result = runners[part]()
            out[part] = result
            out.pop(f"{part}_wall_seconds", None)  # the former layout's
            out[f"{part}_run"] = {
                "machine": before,
                "load_before": before["load"],
                "load_after": os.getloadavg(),
                "wall_seconds": time.perf_counter() - t,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    for part in parts:
        run = out[f"{part}_run"]
        print(
            f"{part}: load before {run['load_before'][0]:.2f}, after "
            f"{run['load_after'][0]:.2f} (1 min), {run['wall_seconds']:.0f} s"
        )
    if "orchestration" in parts:
        o = out["orchestration"]
        print(
            f"orchestration: {o['models']} no-op models, {o['partitions']} partitions of "
            f"{o['models_per_partition']}, {o['runs_needed']} runs of "
            f"{o['partitions_per_run']} partitions; measured {o['runs_measured']} runs"
        )
        print(f"{'':34s} {'per run s':>10s} {'per model ms':>13s}")
        print(
            f"{'dagster run (mean after first)':34s} {o['mean_run_seconds_after_first']:10.2f} "
            f"{1000 * o['seconds_per_model']:13.3f}"
        )
        print(
            f"{'in process floor':34s} {o['in_process_floor_seconds_per_run']:10.2f} "
            f"{1000 * o['in_process_floor_seconds_per_model']:13.3f}"
        )
        print(
            f"{'overhead':34s} {o['overhead_seconds_per_run']:10.2f} "
            f"{1000 * o['overhead_seconds_per_model']:13.3f}"
        )
        word = "extrapolated" if o["all_runs_extrapolated"] else "measured"
        print(
            f"all {o['runs_needed']} runs ({word}): {o['all_150_runs_seconds']:.0f} s; "
            f"instance DB {o['instance_db_bytes'] / MB:.1f} MB after {o['runs_measured']} runs "
            f"(+{o['instance_growth_bytes_per_run'] / MB:.2f} MB/run; "
            f"{o['instance_bytes_after_all_runs_extrapolated'] / MB:.0f} MB after all runs)"
        )
    if "store" in parts:
        s = out["store"]
        print(
            f"store: {s['models']} x ({s['n_features']} bool + {s['n_targets']} float16), "
            f"{s['rows_written']} rows written at {s['write_rows_per_second']:.0f} rows/s; "
            f"disk {s['store_after_writes']['allocated'] / MB:.0f} MB allocated of "
            f"{s['store_after_writes']['apparent'] / 1e9:.1f} GB apparent; beton "
            f"{s['beton_allocated_bytes'] / MB:.0f} MB"
        )
        print(
            f"{'cache':6s} {'raw MB/s':>9s} {'beton MB/s':>11s} {'beton/raw':>10s} "
            f"{'FFCV MB/s':>10s} {'FFCV/raw':>9s}"
        )
        for cache, m in s["read"].items():
            print(
                f"{cache:6s} {m['raw_read_MB_per_s']:9.0f} {m['write_beton_MB_per_s']:11.0f} "
                f"{m['ratio_beton_to_raw']:10.3f} {m['ffcv_MB_per_s']:10.0f} "
                f"{m['ratio_ffcv_to_raw']:9.3f}"
            )
        cold = s["read"]["cold"]
        print(
            f"copy floor (read the rows cold, write the dataset's bytes, fsynced; one thread): "
            f"{cold['copy_seconds']:.2f} s, {cold['ratio_copy_to_raw']:.3f} of the cold raw read; "
            f"write_beton at {cold['ratio_beton_to_copy']:.2f} of its speed"
        )
        for name, seconds in s["write_only_seconds"].items():
            ratios = s["ratio_write_only_to_raw"]
            print(
                f"write only, {name} (the dataset's bytes from memory, fsynced): {seconds:.2f} s, "
                f"{ratios['cold'][name]:.3f} of the cold raw read, "
                f"{ratios['warm'][name]:.3f} of the warm"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
