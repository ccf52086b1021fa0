"""Benchmark: reading regression rows from the beton (``BetonSource``) against the store's memmap.

Run from the repository root::

    .venv/bin/python benchmarks/loader_bench.py [--out benchmarks/results/loader.json] [--quick]

A store with ``n`` models (``masks`` bool ``[p]``, ``margins`` float16 ``[t]``) is written, then
converted with ``write_beton``. Both ways then deliver every row once, in order, in batches of
``batch_size``, as float32 torch tensors on the CPU (what the solvers consume):

- **beton** (keys ``ffcv`` in the JSON, kept for comparison with earlier results):
  ``BetonSource.batches``: the FFCV-format file read through a numpy memory map, batches
  gathered ahead by threads. Until the commit that made the dataset writer and reader
  FFCV-free (issue 12), this was FFCV's ``Loader`` (numba-compiled decoding, copies out of its
  reused buffers), and ``results/loader.json`` was measured that way; rerun to measure the
  reader of today. A first short pass runs before the clock starts (its cost reported
  separately), as a solver reuses the source across passes.
- **memmap**: ``np.load(..., mmap_mode="r")`` of ``masks.npy`` and ``margins.npy``, sliced per
  batch and converted with ``torch.from_numpy(np.asarray(..., dtype=np.float32))``.

Both are timed warm (the files are in the page cache after a first pass) and the median of
``--repeats`` passes is reported, as rows/s and MB/s of mask data. ``ratio = ffcv / memmap``
rows/s: above 1, the loader is faster.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_report import write_report  # benchmarks/ is on sys.path (the script's folder)

from dm_assets.regression.beton_reader import BetonSource
from dm_assets.regression.beton_writer import write_beton
from dm_assets.store.spec import Spec
from dm_assets.store.store import Store


def fill_store(path: Path, n: int, p: int, t: int) -> None:
    spec = Spec.from_dict(
        {
            "num_models": n,
            "schema": {
                "masks": {"shape": [p], "dtype": "bool_"},
                "margins": {"shape": [t], "dtype": "float16"},
            },
        }
    )
    rng = np.random.default_rng(0)
    with Store.initialize(path, spec) as store:
        for start in range(0, n, 500):
            rows = [
                (
                    i,
                    {
                        "masks": rng.random(p) < 0.5,
                        "margins": rng.normal(size=t).astype(np.float16),
                    },
                )
                for i in range(start, min(n, start + 500))
            ]
            store.write_rows(rows)


def memmap_pass(path: Path, n: int, batch_size: int) -> float:
    masks = np.load(path / "masks.npy", mmap_mode="r")
    margins = np.load(path / "margins.npy", mmap_mode="r")
    start = time.perf_counter()
    total = 0
    for a in range(0, n, batch_size):
        x = torch.from_numpy(np.asarray(masks[a : a + batch_size], dtype=np.float32))
        y = torch.from_numpy(np.asarray(margins[a : a + batch_size], dtype=np.float32))
        total += x.shape[0] + 0 * y.shape[0]
    assert total == n
    return time.perf_counter() - start


def ffcv_pass(source: BetonSource, n: int, batch_size: int) -> float:
    start = time.perf_counter()
    total = 0
    for x, _, _ in source.batches(np.arange(n), batch_size, device=torch.device("cpu")):
        total += x.shape[0]
    assert total == n
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/loader.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    n, p, t = (4000, 2000, 50) if args.quick else (20_000, 10_000, 1000)
    scratch = Path(".dm") / "bench-tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        store = Path(tmp) / "store"
        fill_store(store, n, p, t)
        summary = write_beton(store, Path(tmp) / "data.beton")
        start = time.perf_counter()
        source = BetonSource(Path(tmp) / "data.beton", num_workers=args.num_workers)
        ffcv_pass(source, min(n, 2 * args.batch_size), args.batch_size)
        compile_seconds = time.perf_counter() - start
        memmap_pass(store, n, args.batch_size)  # warm the page cache
        ffcv_pass(source, n, args.batch_size)
        times: dict[str, list[float]] = {"ffcv": [], "memmap": []}
        for r in range(args.repeats):
            for way in ["ffcv", "memmap"] if r % 2 == 0 else ["memmap", "ffcv"]:
                if way == "ffcv":
                    times[way].append(ffcv_pass(source, n, args.batch_size))
                else:
                    times[way].append(memmap_pass(store, n, args.batch_size))
    rows_per_s = {way: n / statistics.median(ts) for way, ts in times.items()}
    mask_mb = n * p / 1e6
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load": os.getloadavg(),
        },
        "problem": {
            "n": n,
            "p": p,
            "t": t,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "beton_bytes": summary.nbytes,
        },
        "ffcv_first_batches_seconds_including_compile": compile_seconds,
        "rows_per_s": rows_per_s,
        "mask_mb_per_s": {way: mask_mb * r / n for way, r in rows_per_s.items()},
        "seconds_all": times,
        "ratio_ffcv_over_memmap": rows_per_s["ffcv"] / rows_per_s["memmap"],
    }
    print(f"{n} rows x {p} mask values + {t} targets, batch {args.batch_size}")
    for way, r in rows_per_s.items():
        print(f"  {way:<7} {r:>10.0f} rows/s  {mask_mb * r / n:>8.1f} MB/s of masks")
    print(
        f"  ffcv / memmap: {report['ratio_ffcv_over_memmap']:.2f} "
        f"(ffcv set-up and compile: {compile_seconds:.1f} s, once)"
    )
    print(f"wrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
