"""Warm-up of a run's fitting steps, done while its training step waits on its workers.

A run executes its steps in one process (the definitions' in-process executor). Before a fit
step fits anything it spends seconds on first-time work that has nothing to do with its data:
importing MLflow and its SQLAlchemy store (about 3 s on a 2-core machine), numba's CPU target
and the kernels' cached machine code (about 1.5 s; a minute and more when the cache is stale),
the solver's modules, matplotlib for the path figure (about 1 s). Measured on ``digits_mlp``,
that was about half of its ``datamodels`` step. Meanwhile the training step before it spends
minutes waiting: its models train in worker processes (or SLURM jobs) and the run's own
thread only polls them.

So the training step waits on its workers inside :func:`while_training`: when the run will
also execute a step that fits or evaluates (``datamodels``, ``datamodel_slices``,
``datamodel_eval``, ``attributions``) and the training is still running after
:data:`DELAY_SECONDS`, a background thread does that first-time work once per process
(:func:`warm`: the imports, then :func:`dm_assets.precompile.compile_kernels`' tiny problem,
which loads every cached kernel through the stages' own entry points). A run that only
trains, or trains for less than the delay, starts nothing; ``DM_WARMUP=0`` turns warm-ups off.

Those steps call :func:`wait` before they compute. A Python thread working beside a numba or
torch computation makes it wait for the GIL at every release (a fit took 13 times as long
beside a spinning thread), so the warm-up never overlaps a fit: at worst a step waits for the
rest of it, which it would have spent importing anyway. Other steps (the dataset's writer:
numpy and file I/O) run beside it. The warm-up's errors are only logged: the step that needs
the module imports it again and fails with the real error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dagster as dg

logger = logging.getLogger(__name__)

# the assets (by their name under an experiment's key prefix) whose steps the warm-up serves
WARMED_ASSETS = frozenset({"datamodels", "datamodel_slices", "datamodel_eval", "attributions"})

# seconds of training before a warm-up starts (:func:`while_training`): the warm-up takes about
# 7-11 s on a 2-core machine; a shorter training has nothing to hide it behind
DELAY_SECONDS = 10.0

_lock = threading.Lock()
_thread: threading.Thread | None = None
_seconds: float | None = None


def warm(assets: frozenset[str] = WARMED_ASSETS) -> float:
    """The first-time work (module doc) of the steps of ``assets`` (names from
    :data:`WARMED_ASSETS`), in this thread; its seconds."""
    start = time.perf_counter()
    # what the steps import where they need it (the definitions import none of it): MLflow
    # for every one of them (each logs to it), the attribution methods' only for theirs
    import mlflow
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    import dm_assets.evaluation.figures
    import dm_assets.evaluation.held_out
    import dm_assets.regression.compute_datamodels
    import dm_assets.regression.fit_run

    if "attributions" in assets:
        import dm_assets.attribution.report  # noqa: F401
    from dm_assets.precompile import compile_kernels

    compile_kernels()
    return time.perf_counter() - start


def _run(assets: frozenset[str]) -> None:
    global _seconds
    try:
        _seconds = warm(assets)
    except BaseException:  # the step that needs it fails with the real error
        logger.debug("warm-up failed", exc_info=True)


def start(assets: frozenset[str] = WARMED_ASSETS) -> bool:
    """Start the warm-up of the steps of ``assets`` in a background thread, once per process;
    whether this call started it."""
    global _thread
    with _lock:
        if _thread is not None:
            return False
        thread = threading.Thread(target=_run, args=(assets,), name="dm_assets-warmup", daemon=True)
        thread.start()
        _thread = thread  # published once started: wait() never sees it not yet alive
        return True


def wait() -> float:
    """Wait for the warm-up to finish, if one was started; the seconds waited."""
    thread = _thread
    if thread is None or not thread.is_alive():
        return 0.0
    start_wait = time.perf_counter()
    thread.join()
    return time.perf_counter() - start_wait


def wait_in_step(context: dg.AssetExecutionContext) -> None:
    """:func:`wait`, saying in the step's log how long it waited (when it did)."""
    waited = wait()
    if waited > 0.05:
        context.log.info("waited %.1f s for the warm-up of its imports and kernels", waited)


def warmed_seconds() -> float | None:
    """How long the finished warm-up took (None: none finished in this process)."""
    return _seconds


def run_warmed_assets(context: dg.AssetExecutionContext, experiment: str) -> frozenset[str]:
    """Which of ``experiment``'s :data:`WARMED_ASSETS` the run of ``context`` also executes
    (its job, subset to the run's selection, holds them)."""
    try:
        keys = context.job_def.asset_layer.selected_asset_keys
    except Exception:  # an unexpected context: no warm-up rather than a failed step
        return frozenset()
    return frozenset(
        key.path[1]
        for key in keys
        if len(key.path) == 2 and key.path[0] == experiment and key.path[1] in WARMED_ASSETS
    )


@contextmanager
def while_training(
    context: dg.AssetExecutionContext, experiment: str
) -> Iterator[Callable[[], bool]]:
    """Around the training step's wait on its workers: when the run needs a warm-up
    (:func:`run_warmed_assets`, :func:`enabled`) and the block is still running after
    :data:`DELAY_SECONDS`, :func:`start` it. Yields a function saying whether this block
    started one. A training that ends sooner starts nothing: its run would only have the fit
    wait for a warm-up that competed with the training and the dataset for the CPU (measured:
    ``minimal_all``, about 1 s of training, took 2-3 s longer with one started at once)."""
    assets = run_warmed_assets(context, experiment)
    started: list[bool] = []

    def fire() -> None:
        started.append(start(assets))

    timer = None
    if assets and enabled():
        timer = threading.Timer(DELAY_SECONDS, fire)
        timer.daemon = True
        timer.start()
    try:
        yield lambda: any(started)
    finally:
        if timer is not None:
            timer.cancel()


def enabled() -> bool:
    """Whether warm-ups may start: ``DM_WARMUP=0`` in the environment turns them off."""
    return os.environ.get("DM_WARMUP", "1").strip() != "0"
