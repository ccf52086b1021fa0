"""Benchmark: the dm_assets store against the seed's (MadryLab ``datamodels``) way, in one run.

Run from the repository root::

    .venv/bin/python benchmarks/store_bench.py [--out benchmarks/results/store.json] [--quick]
        [--group 32]

What is measured (every number is taken for every way in the same run, on the same disk):

1. **Creation at the paper's CIFAR-10 scale** (300,000 models, ``masks`` bool [50000] and
   ``margins`` float16 [10000]: about 21 GB apparent size). Ours is
   ``Store.initialize(dir, Spec.from_dict(spec))``; the seed's is, per key and for
   ``_completed``, ``np.lib.format.open_memmap(path, mode="w+", ...)`` then ``.flush()``
   (``datamodels/training/initialize_store.py``). Reported: seconds, and the disk blocks
   actually allocated (``st_blocks * 512``) against the apparent size (``st_size``), summed over
   the ``.npy`` files. Also timed at that scale: reopening (ours ``Store.open``; the seed's
   ``np.load(path, mmap_mode="r+")`` per key, what its worker does) and ``Store.status()`` (the
   seed has no status; its equivalent is taken as ``np.load(_completed, mmap_mode="r")``, the
   completed count and the missing indices), on a fresh store and on one whose every other
   index is marked completed (the most missing ranges possible).
2. **Concurrent writers**: P processes (P = 1, 2, 4, 8; ``fork`` context) write distinct,
   interleaved indices (process ``w`` writes ``w, w + P, w + 2P, ...``) into one fresh store,
   with a datamodels-shaped row (``masks`` bool [50000] + ``margins`` float16 [10000], about
   70 KB). Three ways write:

   - ``ours``: ``Store.write_row`` per row, one commit per row (checks the values, ``pwrite``
     per key, ``fsync`` per file, then the completion flag, ``fsync``);
   - ``ours_group``: each process buffers its rows and calls ``Store.write_rows`` every G rows
     (G = 32 unless ``--group`` says otherwise; the final, partial group at the end, before its
     clock stops): one group commit per G rows (every row ``pwrite``-n, every touched file
     fsynced once, then all G completion flags written and fsynced once), what the worker does
     with ``--worker.commit_every`` (there the group is whatever finished training within the
     wait, 1 s by default; here it is a fixed row count);
   - ``seed``: as its worker does, read the ``_completed`` flag, then per key
     ``m = np.load(path, mmap_mode="r+")`` (cached per file and mode per process)
     ``m[index] = value; m.flush()``, then the same for ``_completed``.

   Every process opens its store before a barrier; the clock runs from the earliest process
   passing the barrier to the latest finishing its last row (``time.perf_counter``, a
   system-wide monotonic clock on Linux). The rows are generated before the processes start, so
   no way pays for them. No way's ``workers/<i>/`` directory nor ``cmds.txt`` line is included.
   After every run every row of every key, and every completion flag, is read back with
   ``np.load(..., mmap_mode="r")`` and compared with ``np.array_equal``; a mismatch aborts the
   benchmark. The same is repeated with a small row (one float32 [16] key, 64 bytes, 64 rows per
   4 KiB page) where neighbouring indices written by different processes share pages.

How to read the ratios: every ratio is **ours / seed** (in the writer tables also
**ours_group / seed**). For seconds and bytes, below 1 means ours is faster or smaller; for
rows/s, above 1 means ours is faster. Each timing is the median of ``repeats`` runs (the writer
tables also show min-max rows/s; the JSON keeps every run), and the order of the ways changes
between repeats (creation: alternates; writers: rotates, so each way takes each place). Note
that the seed's ``flush()`` is ``msync(MS_SYNC)`` over the whole mapping, which on Linux also
writes the dirty pages back and syncs the file's data range; ours additionally fsyncs the
metadata and orders the completion flag after the data (the crash-safety protocol in
``dm_assets/store.py``), and ``ours_group`` keeps that order for the whole group.

The load average before and after is recorded: anything else running on the machine (builds,
package installs, tests) competes for the disk and skews the numbers, so run it on a quiet
machine. On a machine with fewer cores than P, the P processes share the cores: the rows/s there
measure contention, not parallel speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from dm_assets.store.spec import COMPLETED_KEY, Spec
from dm_assets.store.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "store.json"
DEFAULT_SCRATCH = REPO_ROOT / ".dm" / "bench-tmp"
CIFAR_SCHEMA: dict[str, dict[str, Any]] = {
    "masks": {"shape": [50000], "dtype": "bool_"},
    "margins": {"shape": [10000], "dtype": "float16"},
}
SMALL_SCHEMA: dict[str, dict[str, Any]] = {"logits": {"shape": [16], "dtype": "float32"}}
WAYS = ("ours", "seed")  # creation
WRITER_WAYS = ("ours", "ours_group", "seed")
DEFAULT_GROUP_ROWS = 32
BARRIER_TIMEOUT_S = 120.0
MmapMode = Literal["r", "r+"]


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run."""

    creation_models: int
    creation_repeats: int
    probe_repeats: int
    writer_models: int
    small_models: int
    processes: tuple[int, ...]
    write_repeats: int
    group_rows: int = DEFAULT_GROUP_ROWS  # ours_group: rows per Store.write_rows call


FULL = BenchConfig(
    creation_models=300_000,
    creation_repeats=3,
    probe_repeats=5,
    writer_models=4000,
    small_models=20_000,
    processes=(1, 2, 4, 8),
    write_repeats=3,
)
QUICK = BenchConfig(
    creation_models=30_000,
    creation_repeats=1,
    probe_repeats=2,
    writer_models=300,
    small_models=1500,
    processes=(1, 2, 4, 8),
    write_repeats=1,
)


# --------------------------------------------------------------------------- the seed's way
def seed_path(directory: Path, key: str) -> Path:
    """``memmap_path`` of the seed: ``<logdir>/<key>.npy``."""
    return directory / f"{key}.npy"


def seed_schema(spec_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The seed's ``preprocess_spec``: the schema plus ``_completed`` (bool, scalar per model)."""
    schema = dict(spec_dict["schema"])
    schema[COMPLETED_KEY] = {"shape": [], "dtype": "bool_"}
    return schema


def seed_initialize(directory: Path, spec_dict: Mapping[str, Any]) -> None:
    """The seed's ``initialize_store``: ``open_memmap(mode="w+")`` then ``flush()`` per key."""
    num_models = int(spec_dict["num_models"])
    for key, meta in seed_schema(spec_dict).items():
        mmap = np.lib.format.open_memmap(
            seed_path(directory, key),
            mode="w+",
            dtype=getattr(np, meta["dtype"]),
            shape=(num_models, *meta["shape"]),
        )
        mmap.flush()
        del mmap


class SeedWriter:
    """The seed worker's ``kv_read``/``kv_log``: memmaps cached per (file, mode) per process."""

    def __init__(self, directory: Path, keys: Sequence[str]) -> None:
        self.directory = directory
        self._maps: dict[tuple[Path, MmapMode], np.memmap] = {}
        # open every map up front (the seed opens them on first use; same maps, same cost)
        for key in [*keys, COMPLETED_KEY]:
            self._get(seed_path(directory, key), "r+")
        self._get(seed_path(directory, COMPLETED_KEY), "r")

    def _get(self, path: Path, mode: MmapMode) -> np.memmap:
        mmap = self._maps.get((path, mode))
        if mmap is None:
            mmap = np.load(path, mmap_mode=mode)
            self._maps[(path, mode)] = mmap
        return mmap

    def _kv_log(self, key: str, value: object, index: int) -> None:
        mmap = self._get(seed_path(self.directory, key), "r+")
        mmap[index] = value
        mmap.flush()

    def write_row(self, index: int, values: Mapping[str, np.ndarray]) -> None:
        if self._get(seed_path(self.directory, COMPLETED_KEY), "r")[index]:
            raise RuntimeError(f"seed: index {index} already completed")
        for key, value in values.items():
            self._kv_log(key, value, index)
        self._kv_log(COMPLETED_KEY, 1, index)

    def close(self) -> None:
        self._maps.clear()


class GroupWriter:
    """``ours_group``: rows buffered, then ``Store.write_rows`` (one group commit) every
    ``group_rows`` rows; :meth:`finish` commits the final, partial group."""

    def __init__(self, directory: Path, group_rows: int) -> None:
        if group_rows < 1:
            raise ValueError(f"group_rows must be at least 1; got {group_rows}")
        self.store = Store.open(directory)
        self.group_rows = group_rows
        self._pending: list[tuple[int, Mapping[str, np.ndarray]]] = []

    def write_row(self, index: int, values: Mapping[str, np.ndarray]) -> None:
        self._pending.append((index, values))
        if len(self._pending) >= self.group_rows:
            self.finish()

    def finish(self) -> None:
        if self._pending:
            self.store.write_rows(self._pending)
            self._pending = []

    def close(self) -> None:
        self.store.close()


class RowWriter(Protocol):
    def write_row(self, index: int, values: Mapping[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


def open_writer(
    way: str, directory: Path, keys: Sequence[str], group_rows: int = DEFAULT_GROUP_ROWS
) -> RowWriter:
    if way == "ours":
        return Store.open(directory)
    if way == "ours_group":
        return GroupWriter(directory, group_rows)
    return SeedWriter(directory, keys)


def initialize(way: str, directory: Path, spec_dict: Mapping[str, Any]) -> None:
    if way in ("ours", "ours_group"):
        Store.initialize(directory, Spec.from_dict(spec_dict)).close()
    else:
        directory.mkdir(parents=True, exist_ok=True)
        seed_initialize(directory, spec_dict)


# --------------------------------------------------------------------------- helpers
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def npy_disk_usage(directory: Path) -> dict[str, int]:
    """Apparent and allocated bytes summed over the directory's ``.npy`` files."""
    apparent = allocated = 0
    for file in directory.glob("*.npy"):
        st = file.stat()
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return {"apparent_bytes": apparent, "allocated_bytes": allocated}


def filesystem_of(path: Path) -> str:
    """``"<fstype> on <mountpoint>"`` for ``path`` from /proc/mounts, or ``"unknown"``."""
    best, best_len = "unknown", -1
    target = str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best_len:
            best, best_len = f"{parts[2]} on {mount}", len(mount)
    return best


def repeat(fn: Callable[[], object], times: int) -> list[float]:
    """Seconds of each of ``times`` calls of ``fn``."""
    return [timed(fn) for _ in range(times)]


def ratio(ours: float, seed: float) -> float | None:
    return ours / seed if seed else None


@contextmanager
def scratch_directory(parent: Path) -> Iterator[Path]:
    """A fresh directory under ``parent``, removed with everything in it afterwards."""
    created = [p for p in (parent.parent, parent) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="store-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        for p in reversed(created):  # only the folders this run made, and only when empty
            try:
                p.rmdir()
            except OSError:
                break


# --------------------------------------------------------------------------- 1. creation
def seed_status(directory: Path) -> tuple[int, np.ndarray]:
    """What a seed user computes for a status: completed count and missing indices."""
    mask = np.load(seed_path(directory, COMPLETED_KEY), mmap_mode="r")
    return int(mask.sum()), np.flatnonzero(~np.asarray(mask))


def reopen_ours(directory: Path) -> None:
    Store.open(directory).close()


def seed_reopen(directory: Path, keys: Sequence[str]) -> list[np.memmap]:
    return [np.load(seed_path(directory, k), mmap_mode="r+") for k in [*keys, COMPLETED_KEY]]


def mark_every_other_completed(directory: Path) -> None:
    """Set ``_completed[::2]`` directly (both ways share the file format)."""
    mask = np.load(seed_path(directory, COMPLETED_KEY), mmap_mode="r+")
    mask[::2] = True
    mask.flush()
    del mask


def bench_creation(scratch: Path, cfg: BenchConfig) -> dict[str, Any]:
    spec_dict = {"num_models": cfg.creation_models, "schema": CIFAR_SCHEMA}
    keys = list(CIFAR_SCHEMA)
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    for rep in range(cfg.creation_repeats):
        order = WAYS if rep % 2 == 0 else WAYS[::-1]
        for way in order:
            directory = scratch / f"create-{way}-{rep}"
            seconds = timed(partial(initialize, way, directory, spec_dict))
            run: dict[str, Any] = {"create_s": seconds, **npy_disk_usage(directory)}
            half_done = (cfg.creation_models + 1) // 2
            n = cfg.probe_repeats
            if way == "ours":
                run["reopen_s"] = repeat(partial(reopen_ours, directory), n)
                with Store.open(directory) as store:
                    assert store.status().completed == 0
                    run["status_fresh_s"] = repeat(store.status, n)
                    mark_every_other_completed(directory)
                    assert store.status().completed == half_done
                    run["status_half_s"] = repeat(store.status, n)
            else:
                run["reopen_s"] = repeat(partial(seed_reopen, directory, keys), n)
                assert seed_status(directory)[0] == 0
                run["status_fresh_s"] = repeat(partial(seed_status, directory), n)
                mark_every_other_completed(directory)
                assert seed_status(directory)[0] == half_done
                run["status_half_s"] = repeat(partial(seed_status, directory), n)
            runs[way].append(run)
            shutil.rmtree(directory)

    def summary(way: str) -> dict[str, float]:
        rs = runs[way]
        return {
            "create_s": median([r["create_s"] for r in rs]),
            "reopen_s": median([x for r in rs for x in r["reopen_s"]]),
            "status_fresh_s": median([x for r in rs for x in r["status_fresh_s"]]),
            "status_half_s": median([x for r in rs for x in r["status_half_s"]]),
            "apparent_bytes": rs[0]["apparent_bytes"],
            "allocated_bytes": rs[0]["allocated_bytes"],
        }

    ours, seed = summary("ours"), summary("seed")
    return {
        "spec": spec_dict,
        "ours": ours,
        "seed": seed,
        "ratio_ours_over_seed": {k: ratio(ours[k], seed[k]) for k in ours},
        "runs": runs,
    }


# --------------------------------------------------------------------------- 2. writers
def make_rows(
    schema: Mapping[str, Mapping[str, Any]], num_models: int, seed: int
) -> dict[str, np.ndarray]:
    """Random, distinct rows for every index, in each key's dtype."""
    rng = np.random.default_rng(seed)
    rows: dict[str, np.ndarray] = {}
    for key, meta in schema.items():
        shape = (num_models, *meta["shape"])
        dtype = np.dtype(getattr(np, meta["dtype"]))
        if dtype.kind == "b":
            rows[key] = rng.integers(0, 2, size=shape, dtype=np.uint8).view(bool)
        else:
            rows[key] = rng.standard_normal(size=shape, dtype=np.float32).astype(dtype)
    return rows


def _writer_process(
    way: str,
    directory: Path,
    rows: Mapping[str, np.ndarray],
    indices: range,
    barrier: Barrier,
    results: Any,
    group_rows: int = DEFAULT_GROUP_ROWS,
) -> None:
    """One writer: open the store, wait at the barrier, write its rows, report its times."""
    try:
        writer = open_writer(way, directory, list(rows), group_rows)
        barrier.wait()
        start = time.perf_counter()
        for index in indices:
            writer.write_row(index, {key: arr[index] for key, arr in rows.items()})
        if isinstance(writer, GroupWriter):
            writer.finish()  # the final, partial group is inside the clock
        end = time.perf_counter()
        writer.close()
        results.put(("ok", start, end))
    except BaseException as exc:
        barrier.abort()
        results.put(("error", f"{way} writer {indices}: {type(exc).__name__}: {exc}", 0.0))
        raise


def verify(directory: Path, rows: Mapping[str, np.ndarray]) -> None:
    """Every row and every completion flag reads back exactly, or ``AssertionError``."""
    for key, expected in rows.items():
        stored = np.load(seed_path(directory, key), mmap_mode="r")
        if not np.array_equal(stored, expected):
            bad = np.flatnonzero(
                ~(np.asarray(stored) == expected).reshape(len(expected), -1).all(axis=1)
            )
            raise AssertionError(f"{directory.name}: key {key!r} differs at indices {bad[:10]}")
    done = np.load(seed_path(directory, COMPLETED_KEY), mmap_mode="r")
    if not np.asarray(done).all():
        missing = np.flatnonzero(~np.asarray(done))[:10]
        raise AssertionError(f"{directory.name}: indices {missing} not completed")


def collect_reports(procs: Sequence[Any], results: Any) -> list[tuple[str, Any, float]]:
    """One report per process; a process that died without reporting counts as an error."""
    reports: list[tuple[str, Any, float]] = []
    while len(reports) < len(procs):
        try:
            reports.append(results.get(timeout=1.0))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                try:  # a report put just before the process ended
                    reports.append(results.get(timeout=1.0))
                except queue.Empty:
                    reports.append(("error", "a writer process ended without a report", 0.0))
    return reports


def run_writers(
    way: str,
    directory: Path,
    spec_dict: Mapping[str, Any],
    rows: Mapping[str, np.ndarray],
    processes: int,
    group_rows: int = DEFAULT_GROUP_ROWS,
) -> dict[str, Any]:
    """Initialize a fresh store, write every row from ``processes`` processes, verify it."""
    ctx = mp.get_context("fork")
    num_models = int(spec_dict["num_models"])
    initialize(way, directory, spec_dict)
    barrier = ctx.Barrier(processes, timeout=BARRIER_TIMEOUT_S)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_writer_process,
            args=(
                way,
                directory,
                rows,
                range(w, num_models, processes),
                barrier,
                results,
                group_rows,
            ),
        )
        for w in range(processes)
    ]
    try:
        for p in procs:
            p.start()
        reports = collect_reports(procs, results)
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    errors = [r[1] for r in reports if r[0] != "ok"]
    if errors or any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{way} writers failed: {errors or [p.exitcode for p in procs]}")
    seconds = max(r[2] for r in reports) - min(r[1] for r in reports)
    verify(directory, rows)
    row_bytes = sum(int(arr[0].nbytes) for arr in rows.values())
    result = {
        "processes": processes,
        "rows": num_models,
        "row_bytes": row_bytes,
        "seconds": seconds,
        "rows_per_s": num_models / seconds,
        "mb_per_s": num_models * row_bytes / seconds / 1e6,
        "verified": True,
        **npy_disk_usage(directory),
    }
    shutil.rmtree(directory)
    return result


def spread(runs: Sequence[Mapping[str, Any]]) -> list[float]:
    """``[min, max]`` rows/s over the repeats."""
    values = [r["rows_per_s"] for r in runs]
    return [min(values), max(values)]


def bench_writers(
    scratch: Path,
    name: str,
    schema: Mapping[str, Mapping[str, Any]],
    num_models: int,
    processes: Sequence[int],
    repeats: int,
    group_rows: int = DEFAULT_GROUP_ROWS,
) -> dict[str, Any]:
    spec_dict = {"num_models": num_models, "schema": dict(schema)}
    rows = make_rows(schema, num_models, seed=num_models)
    table = []
    n_ways = len(WRITER_WAYS)
    for p in processes:
        runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WRITER_WAYS}
        for rep in range(repeats):
            first = (rep + p) % n_ways  # rotate who goes first
            for way in WRITER_WAYS[first:] + WRITER_WAYS[:first]:
                directory = scratch / f"{name}-{way}-p{p}-r{rep}"
                runs[way].append(run_writers(way, directory, spec_dict, rows, p, group_rows))
        rates = {way: median([r["rows_per_s"] for r in runs[way]]) for way in WRITER_WAYS}
        table.append(
            {
                "processes": p,
                **{f"{way}_rows_per_s": rates[way] for way in WRITER_WAYS},
                "ratio_ours_over_seed": ratio(rates["ours"], rates["seed"]),
                "ratio_ours_group_over_seed": ratio(rates["ours_group"], rates["seed"]),
                **{f"{way}_rows_per_s_min_max": spread(runs[way]) for way in WRITER_WAYS},
                **{
                    f"{way}_allocated_bytes": runs[way][0]["allocated_bytes"] for way in WRITER_WAYS
                },
                "verified": True,
                "runs": runs,
            }
        )
    return {
        "spec": spec_dict,
        "row_bytes": sum(int(a[0].nbytes) for a in rows.values()),
        "group_rows": group_rows,
        "results": table,
    }


# --------------------------------------------------------------------------- report
def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms" if seconds < 1 else f"{seconds:9.3f} s "


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n:8.0f} B "


def fmt_ratio(r: float | None) -> str:
    return "     n/a" if r is None else f"{r:8.3f}"


def print_report(results: Mapping[str, Any]) -> None:
    m = results["machine"]
    print(f"\nmachine: {m['platform']}, {m['cpu_count']} CPUs, scratch {m['scratch_filesystem']}")
    load = ", ".join(
        f"{a:.2f} -> {b:.2f}"
        for a, b in zip(m["loadavg_1_5_15_before"], m["loadavg_1_5_15_after"], strict=True)
    )
    print(f"load average 1/5/15 min, before -> after: {load} (other work skews the numbers)")
    c = results["creation"]
    print(
        f"\n1. store creation, {c['spec']['num_models']} models "
        f"(masks bool[50000] + margins float16[10000])"
    )
    print(f"{'measure':<34}{'ours':>14}{'seed':>14}{'ours/seed':>11}")
    rows = [
        ("create (s)", "create_s", fmt_s),
        ("reopen (s)", "reopen_s", fmt_s),
        ("status, fresh store (s)", "status_fresh_s", fmt_s),
        ("status, every other done (s)", "status_half_s", fmt_s),
        ("apparent size", "apparent_bytes", fmt_bytes),
        ("allocated on disk", "allocated_bytes", fmt_bytes),
    ]
    for label, key, fmt in rows:
        print(
            f"{label:<34}{fmt(c['ours'][key]):>14}{fmt(c['seed'][key]):>14}"
            f"{fmt_ratio(c['ratio_ours_over_seed'][key]):>11}"
        )
    for title, key in (
        ("2a. concurrent writers, datamodels row", "writers_large"),
        ("2b. concurrent writers, small row", "writers_small"),
    ):
        w = results[key]
        schema = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in w["spec"]["schema"].items())
        print(
            f"\n{title}: {schema} ({w['row_bytes']} B/row), {w['spec']['num_models']} rows; "
            f"ours_group commits every {w['group_rows']} rows"
        )
        header = "".join(f"{way + ' rows/s':>19}{'(min-max)':>16}" for way in WRITER_WAYS)
        print(f"{'processes':<11}{header}{'ours/seed':>11}{'ours_group/seed':>17}{'verified':>10}")
        for r in w["results"]:
            verified = "yes" if r["verified"] else "NO"
            cells = ""
            for way in WRITER_WAYS:
                lo, hi = r[f"{way}_rows_per_s_min_max"]
                cells += f"{r[f'{way}_rows_per_s']:>19.0f}{f'({lo:.0f}-{hi:.0f})':>16}"
            print(
                f"{r['processes']:<11}{cells}{fmt_ratio(r['ratio_ours_over_seed']):>11}"
                f"{fmt_ratio(r['ratio_ours_group_over_seed']):>17}{verified:>10}"
            )
    print(f"\ntotal benchmark time: {results['total_s']:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=DEFAULT_SCRATCH,
        help="folder for the temporary stores (same disk as the real ones; "
        "not tmpfs); everything made there is deleted afterwards",
    )
    parser.add_argument(
        "--group",
        type=int,
        default=DEFAULT_GROUP_ROWS,
        metavar="G",
        help=f"ours_group: rows per Store.write_rows call (default {DEFAULT_GROUP_ROWS})",
    )
    args = parser.parse_args(argv)
    if args.group < 1:
        parser.error(f"--group must be at least 1; got {args.group}")
    cfg = dataclasses.replace(QUICK if args.quick else FULL, group_rows=args.group)
    started = time.perf_counter()
    with scratch_directory(args.scratch) as scratch:
        machine = {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "scratch_filesystem": filesystem_of(scratch),
            "loadavg_1_5_15_before": list(os.getloadavg()),
        }
        print(f"scratch: {scratch} ({machine['scratch_filesystem']})", flush=True)
        print("1. creation ...", flush=True)
        creation = bench_creation(scratch, cfg)
        print("2a. writers, datamodels row ...", flush=True)
        large = bench_writers(
            scratch,
            "large",
            CIFAR_SCHEMA,
            cfg.writer_models,
            cfg.processes,
            cfg.write_repeats,
            cfg.group_rows,
        )
        print("2b. writers, small row ...", flush=True)
        small = bench_writers(
            scratch,
            "small",
            SMALL_SCHEMA,
            cfg.small_models,
            cfg.processes,
            cfg.write_repeats,
            cfg.group_rows,
        )
    machine["loadavg_1_5_15_after"] = list(os.getloadavg())
    results = {
        "benchmark": "dm_assets store vs seed (MadryLab datamodels) memmap store",
        "ratios": "ours / seed (writers also ours_group / seed): seconds and bytes below 1 "
        "favour ours; rows/s above 1 favour ours",
        "quick": args.quick,
        "machine": machine,
        "config": cfg.__dict__,
        "creation": creation,
        "writers_large": large,
        "writers_small": small,
        "total_s": time.perf_counter() - started,
    }
    print_report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
