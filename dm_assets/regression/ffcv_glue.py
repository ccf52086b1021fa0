"""FFCV, imported on first use, with the fixes its users here need.

The regression's own dataset is written and read without FFCV
(:mod:`dm_assets.regression.beton_format`); FFCV itself serves the CIFAR-10 example's image
datasets (:mod:`dm_assets.examples.cifar10`) and the tests that check our files against FFCV's
own writer, Reader and Loader.

:func:`ffcv_classes` imports FFCV (pinned at 1.0.2) once per process and returns its classes
together with three subclasses that fix its failure modes:

- ``RowDecoder``: FFCV's ``NDArrayDecoder`` copying rows with numba (no ctypes wrapper whose
  finalizer misfires once a Loader is freed);
- ``GuardedEpochIterator``: FFCV's per-pass reading thread, ending the pass on an error
  instead of leaving the reader waiting forever;
- ``GuardedWriter``: FFCV's ``DatasetWriter``, failing when a writer process dies instead of
  waiting forever, and always releasing its shared memory.

FFCV is imported on first use: importing it takes seconds (it compiles its JPEG decoders with
numba at import). Importing it, and each FFCV Loader and writer, set torch's (process-wide) and
numba's thread counts; :class:`KeepThreadCounts` and :func:`restore_thread_counts` put them
back.
"""

from __future__ import annotations

import ctypes
import functools
import queue
import time
from collections.abc import Sequence
from multiprocessing import Process, Queue, Value
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from dm_assets.regression.beton import BetonError


def ffcv_classes() -> SimpleNamespace:
    """FFCV's classes and our three subclasses of them, imported and defined on first use.

    Returns
    -------
    SimpleNamespace
        Attributes ``IntField``, ``NDArrayField``, ``IntDecoder``, ``Loader``,
        ``OrderOption``, ``Reader``, ``Squeeze``, ``ToTensor`` and ``HeaderType`` (FFCV's
        own) and ``RowDecoder``, ``GuardedEpochIterator`` and ``GuardedWriter`` (module
        doc). The same classes on every call.
    """
    with KeepThreadCounts():  # importing ffcv sets torch's threads to 1, process-wide
        return _import_ffcv()


class KeepThreadCounts:
    """Restores torch's and numba's thread counts in this thread on exit. FFCV sets both to
    its ``num_workers`` (to 1 on import), and torch's count is process-wide.

    On entry it records the counts in ``torch_threads`` and ``numba_threads``.
    """

    def __enter__(self) -> None:
        import numba

        self.torch_threads = torch.get_num_threads()
        self.numba_threads = numba.get_num_threads()

    def __exit__(self, *exc: object) -> None:
        restore_thread_counts(self.torch_threads, self.numba_threads)


def restore_thread_counts(torch_threads: int, numba_threads: int) -> None:
    """Set torch's and numba's thread counts back to ``torch_threads`` and ``numba_threads``
    where they differ (an FFCV thread changed them)."""
    import numba

    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    if numba.get_num_threads() != numba_threads:
        numba.set_num_threads(numba_threads)


@functools.cache
def _import_ffcv() -> SimpleNamespace:
    """:func:`ffcv_classes` without restoring the thread counts (imports once per process)."""
    from ffcv.fields import IntField, NDArrayField
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader
    from ffcv.transforms import Squeeze, ToTensor
    from ffcv.types import HeaderType
    from ffcv.writer import DatasetWriter

    return SimpleNamespace(
        IntField=IntField,
        NDArrayField=NDArrayField,
        IntDecoder=IntDecoder,
        RowDecoder=_define_row_decoder(NDArrayDecoder, Compiler),
        Loader=Loader,
        OrderOption=OrderOption,
        GuardedEpochIterator=_define_guarded_epoch_iterator(EpochIterator),
        GuardedWriter=_define_guarded_writer(DatasetWriter, MemoryAllocator),
        Reader=Reader,
        Squeeze=Squeeze,
        ToTensor=ToTensor,
        HeaderType=HeaderType,
    )


def _define_row_decoder(ndarray_decoder: type, compiler: Any) -> type:
    """``RowDecoder``, a subclass of FFCV's ``NDArrayDecoder`` (``compiler``: FFCV's
    ``Compiler``, for its parallel range)."""

    class RowDecoder(ndarray_decoder):
        """FFCV's NDArrayDecoder, copying with numba instead of FFCV's ctypes ``memcpy``.

        Every NDArrayDecoder compiles its own numba wrapper of that ``memcpy``; with numba 0.68
        a freed Loader then prints ``Exception ignored in: <finalize ...> KeyError`` from
        numba's finalizers while a later Loader lives (and sharing one wrapper instead kills
        the later Loader's thread). A plain numba copy has no such wrapper.
        """

        def generate_code(self) -> Any:
            my_range = compiler.get_iterator()
            mem_read = self.memory_read

            def decoder(indices, destination, metadata, storage_state):
                for ix in my_range(indices.shape[0]):
                    data = mem_read(metadata[indices[ix]], storage_state)
                    row = destination[ix].view(np.uint8)
                    # a plain loop: numba compiles it faster than a slice assignment
                    for k in range(data.shape[0]):
                        row[k] = data[k]
                return destination

            return decoder

    return RowDecoder


def _define_guarded_epoch_iterator(epoch_iterator: type) -> type:
    """``GuardedEpochIterator``, a subclass of FFCV's ``EpochIterator``."""

    class GuardedEpochIterator(epoch_iterator):
        """FFCV's per-pass thread, ending the pass instead of hanging when a batch fails.

        FFCV's thread catches StopIteration only: any other exception ends it while the reader
        waits forever for the next batch. Here the exception is kept in ``error`` and the pass
        ends; the reader (:mod:`dm_assets.examples.cifar10.data`) raises it.
        """

        error: BaseException | None = None

        def run(self) -> None:
            try:
                super().run()
            except BaseException as exc:
                self.error = exc
                self.output_queue.put(None)

    return GuardedEpochIterator


def _define_guarded_writer(dataset_writer: type, memory_allocator: type) -> type:
    """``GuardedWriter``, a subclass of FFCV's ``DatasetWriter`` (``memory_allocator``:
    FFCV's ``MemoryAllocator``)."""

    class GuardedWriter(dataset_writer):
        """FFCV's DatasetWriter, failing instead of hanging when a writer process dies.

        FFCV's loop waits until every row is counted, so a worker that dies (an exception, a
        full disk, the out-of-memory killer) makes it wait forever, and its shared memory is
        never released. This is FFCV 1.0.2's ``_write_common`` with the workers watched, the
        shared memory always released and the progress bar shown on a terminal only.
        """

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args) -> None:
            self.num_samples = num_samples
            self.prepare()
            try:
                work: Any = Queue()
                for todo in queue_content:
                    work.put(todo)
                for _ in range(self.num_workers):
                    work.put(None)  # one stop token per worker
                allocations: Any = Queue()
                done: Any = Value(ctypes.c_uint64, 0)
                allocator = memory_allocator(self.fname, self.data_region_start, self.page_size)
                args = (
                    work,
                    self.metadata_sm,
                    self.metadata_type,
                    self.fields,
                    allocator,
                    done,
                    allocations,
                    *extra_worker_args,
                )
                processes = [
                    Process(target=work_fn, args=args, daemon=True) for _ in range(self.num_workers)
                ]
                allocation_list = _run_writers(processes, done, allocations, num_samples)
                self.finalize(allocation_list)
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return GuardedWriter


def _run_writers(
    processes: Sequence[Any], done: Any, allocations: Any, num_samples: int
) -> list[Any]:
    """Start the writer ``processes``, wait for their ``num_samples`` rows (counted in the
    shared ``done``) and return the page allocations they report on ``allocations``; raises
    :class:`BetonError` when one dies. Every process has ended when this returns or raises."""
    from tqdm import tqdm

    allocation_list: list[Any] = []
    try:
        for p in processes:
            p.start()
        with tqdm(total=num_samples, disable=None, desc="rows written") as bar:
            counted = 0
            while counted != num_samples:
                _check_writers(processes, done, num_samples)
                now = int(done.value)
                bar.update(now - counted)
                counted = now
                time.sleep(0.02)
        for _ in processes:
            while True:
                try:
                    allocation_list.extend(allocations.get(timeout=0.2))
                    break
                except queue.Empty:
                    _check_writers(processes, done, num_samples)
        for p in processes:
            p.join()
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
                p.join()
    return allocation_list


def _check_writers(processes: Sequence[Any], done: Any, num_samples: int) -> None:
    """Raise when a writer process died, or when all finished with rows left uncounted."""
    failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
    if failed:
        raise BetonError(
            f"a writer process exited with code {failed[0]} before every row was written (its "
            "traceback, if any, is above; a negative code is the signal that ended it, -9 "
            "often the out-of-memory killer); nothing was written under the final name. Fix "
            "the cause (disk space, memory) and rerun, or pass fewer num_workers"
        )
    # Workers count their rows before they exit, so once all have exited the count is final.
    if all(p.exitcode == 0 for p in processes) and int(done.value) != num_samples:
        raise BetonError(
            f"every writer process finished but only {int(done.value)} of {num_samples} rows "
            "were counted; nothing was written under the final name. Rerun"
        )
