"""Compile the package's numba kernels into numba's on-disk cache, before the first fit.

python -m dm_assets.precompile

The CPU solver (:mod:`dm_assets.regression.cd_kernel`, :mod:`dm_assets.regression.bit_stats`)
and the bootstrap of the held-out scores (:mod:`dm_assets.evaluation.uncertainty`) are numba
kernels, compiled on their first call and cached beside their source (``__pycache__``, or
``NUMBA_CACHE_DIR``), keyed by the source file. In a fresh checkout the first fit would compile
them inside the ``datamodels`` step and the evaluation's inside ``datamodel_eval``: a minute
and more of a stage that otherwise takes seconds. ``scripts/setup.sh`` runs this module once
after installing and again whenever a kernel's source file changes.

It runs the stages' own entry points (``fit_gram`` with its refit, ``cross_validated_lasso``,
``score_held_out``, ``bootstrap_lds``) on a tiny generated problem, so the argument types
compiled are the ones the stages pass (the library casts its inputs to them). Once cached, a
run takes seconds: it only loads.

Compiling is single-threaded, so on a machine with two or more cores the command starts a
helper process that compiles the steps after ``fit_gram`` (:data:`HELPER_STEPS`) while this one
compiles ``fit_gram``'s path (about 50 s of the 85 s on 2 cores); this process then runs those
steps too and finds them in the cache (numba looks there before compiling, and writes each
cache file whole). The in-process warm-up of a run (:mod:`dm_assets.pipeline.warmup`) calls
:func:`compile_kernels` alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Sequence

import numpy as np

# The modules whose kernels are cached (each kernel ``@numba.njit(cache=True)``).
KERNEL_MODULES = (
    "dm_assets.regression.bit_stats",
    "dm_assets.regression.cd_kernel",
    "dm_assets.evaluation.uncertainty",
)


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """120 models' 0/1 masks over 16 examples and 3 float32 targets, linear plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.random((120, 16)) < 0.5
    w = rng.normal(size=(16, 3))
    y = (x @ w + rng.normal(size=(120, 3))).astype(np.float32)
    return x, y


# What the helper process of ``python -m dm_assets.precompile`` compiles (every step but
# ``fit_gram``, which compiles the path kernel and runs first here); ``fit_gram``'s refit
# needs the fixed-lambda kernel that ``cross_validated_lasso`` compiles.
HELPER_STEPS = ("cross_validated_lasso", "accumulate_stats", "score_held_out", "bootstrap_lds")


def compile_kernels(only: Collection[str] | None = None) -> dict[str, float]:
    """Run every cached kernel once, through the functions the stages call (the steps named
    in ``only``, or all); the seconds each step took (compiling, or loading from the
    cache)."""
    import torch

    from dm_assets.evaluation.uncertainty import bootstrap_lds, score_held_out
    from dm_assets.regression.cross_validation import cross_validated_lasso
    from dm_assets.regression.data import ArraySource
    from dm_assets.regression.gram import fit_gram
    from dm_assets.regression.stats import accumulate_stats

    x, y = _problem()
    held_y = y[:40].astype(np.float64)  # 40 held-out models' outputs
    groups = np.arange(40) // 2  # 20 masks trained twice: the noise ceiling's code path too
    steps: dict[str, Callable[[], object]] = {
        # the statistics (bit packing, popcounts), every target's path, the refit
        "fit_gram": lambda: fit_gram(
            ArraySource(x, y), np.arange(20, 100), np.arange(100, 120), k=4, eps=0.1
        ),
        # masks that are not all 0/1 (the packing taken back, then float sums and checks)
        "accumulate_stats": lambda: accumulate_stats(
            ArraySource(np.where(np.arange(120)[:, None] == 0, 0.5, x), y),
            np.arange(120),
            batch_size=40,
            device=torch.device("cpu"),
        ),
        # fixed-lambda solves with validation scores, as the LDS curve runs them
        "cross_validated_lasso": lambda: cross_validated_lasso(
            x[20:], y[20:], folds=2, k=4, eps=0.1, device=torch.device("cpu")
        ),
        # the bootstrap's resampled scores (ranks, correlations, reliability)
        "score_held_out": lambda: score_held_out(
            held_y + 0.1, held_y, groups=groups, resamples=20, seed=0
        ),
        "bootstrap_lds": lambda: bootstrap_lds(
            [held_y + 0.1, held_y - 0.1], held_y, groups=groups, resamples=20, seed=0
        ),
    }
    unknown = set(only or ()) - set(steps)
    if unknown:
        raise ValueError(f"unknown precompile steps {sorted(unknown)}; known: {sorted(steps)}")
    seconds = {}
    for name, step in steps.items():
        if only is not None and name not in only:
            continue
        start = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dm_assets.precompile",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.helper:  # the share of the helper process main starts
        compile_kernels(only=HELPER_STEPS)
        return 0
    start = time.perf_counter()
    helper = None
    # the helper's error output goes to a file, read once it has exited (a pipe read only
    # then could fill up and stall it)
    with tempfile.TemporaryFile(mode="w+") as helper_log:
        if (os.cpu_count() or 1) > 1:
            helper = subprocess.Popen(
                [sys.executable, "-m", "dm_assets.precompile", "--helper"],
                stdout=subprocess.DEVNULL,
                stderr=helper_log,
            )
        try:
            seconds = compile_kernels()
        finally:
            if helper is not None:
                helper.wait()
        helper_log.seek(0)
        helper_error = helper_log.read()
    if helper is not None and helper.returncode != 0:
        # this process ran every step itself, so the kernels are ready; say what failed
        print(
            f"precompile: the helper process failed (exit {helper.returncode}); every kernel "
            f"was compiled here instead:\n{helper_error.strip()}",
            file=sys.stderr,
        )
    parts = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
    processes = "two processes" if helper is not None and helper.returncode == 0 else "one process"
    print(
        f"precompile: numba kernels ready in {time.perf_counter() - start:.1f} s "
        f"({processes}; this one's steps: {parts})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
