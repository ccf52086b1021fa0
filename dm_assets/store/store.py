"""The store: every model's outputs in contiguous memory-mapped arrays, with completion flags.

A store is a directory, compatible with the seed's (``datamodels.training``):

================  ==============================  =========================================
file              shape                           dtype / content
================  ==============================  =========================================
``<key>.npy``     ``(num_models, *shape)``        the key's dtype; row ``i`` is model ``i``'s
                                                  value, meaningful only once completed
``_completed.npy`` ``(num_models,)``              bool; ``True`` once every row of ``i`` is
                                                  durable
``_configuration.npy`` ``(num_models,)``          int32; the id of the training configuration
                                                  that produced row ``i`` (a key of
                                                  ``configurations.json``), ``-1`` unknown;
                                                  absent until a configuration is registered
                                                  (a seed store: every row unknown)
``spec.json``     --                              the spec the store was initialized with
``configurations.json`` --                        ``{"configurations": {"<id>": {"fingerprint":
                                                  hex, "configuration": {...}, "registered":
                                                  ISO time}}}``: every training configuration
                                                  that wrote rows (see
                                                  :mod:`dm_assets.training.configuration`)
``workers/<i>/``  --                              model ``i``'s own files (its ``logdir``)
``cmds.txt``      --                              one line per completed model: the command
``.lock``         --                              empty; serializes initialization,
                                                  registration and growth against commits
``.grow.json``    --                              ``{"num_models": N}`` while a grow to ``N``
                                                  runs; left only by an interrupted grow
================  ==============================  =========================================

Every ``.npy`` file is a plain numpy file (``np.load(path, mmap_mode="r")`` reads it). Files are
created sparse: a 21 GB store costs no disk until rows are written.

The write protocol: a row is written at its exact byte range with ``pwrite`` (never through a
writable memory map, whose whole-page write-back could clobber a neighbour written by another
machine on a shared filesystem), every touched file is fsynced, and only then the completion
flag is written and fsynced. The row's configuration id is part of the same commit: the data
is written and fsynced, then the id, then the flag. A writer killed at any moment leaves each
index either completed with exactly the values it returned and the id of the configuration that
produced them, or not completed.

A store grows (:meth:`Store.grow`, ``Store.initialize(..., grow=True)``): every array gets more
rows in place, sparsely, keeping every row, flag and id; it never shrinks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dm_assets.errors import DmError
from dm_assets.store.rows import coerce_row
from dm_assets.store.spec import COMPLETED_KEY, CONFIGURATION_KEY, ArraySpec, Spec, SpecError
from dm_assets.training.configuration import (
    UNKNOWN_CONFIGURATION,
    ConfigurationError,
    TrainingConfiguration,
)

SPEC_FILE = "spec.json"
CONFIGURATIONS_FILE = "configurations.json"
WORKERS_DIR = "workers"
COMMANDS_FILE = "cmds.txt"
LOCK_FILE = ".lock"
GROW_FILE = ".grow.json"
_COMPLETED_SPEC = ArraySpec(shape=(), dtype=np.dtype(bool), dtype_name="bool_")
_CONFIGURATION_SPEC = ArraySpec(shape=(), dtype=np.dtype(np.int32), dtype_name="int32")
_RESERVED = (COMPLETED_KEY, CONFIGURATION_KEY)
_COPY_CHUNK = 4 * 2**20

logger = logging.getLogger(__name__)


class StoreError(DmError, RuntimeError):
    """The store cannot be used as asked; the message says why and how to fix it."""


class StoreMismatchError(StoreError):
    """The directory holds a store made from a different spec; ``differences`` lists how."""

    def __init__(self, path: Path, differences: list[str]) -> None:
        self.differences = differences
        super().__init__(differences, path)

    def render(self) -> str:
        lines = "\n".join(f"  - {d}" for d in self.differences)
        return (
            f"{self.source} already holds a store with a different spec; nothing was changed:\n"
            f"{lines}\nUse the store's own spec (its spec.json), or initialize a new directory."
        )


@dataclass(frozen=True)
class _ArrayFile:
    """Where one key's array lives: the file and the byte offset of row 0."""

    key: str
    path: Path
    spec: ArraySpec
    data_offset: int
    inode: int = 0  # the file's inode when opened: a grow that rewrites a file changes it

    def row_offset(self, index: int) -> int:
        return self.data_offset + index * self.spec.row_nbytes


@dataclass(frozen=True)
class StoreStatus:
    """How far a store is: ``completed`` of ``num_models`` rows, and which ranges are missing.

    ``missing_ranges`` holds inclusive ``(first, last)`` index pairs, in increasing order.
    """

    num_models: int
    completed: int
    missing_ranges: tuple[tuple[int, int], ...]

    @property
    def fraction_completed(self) -> float:
        return self.completed / self.num_models

    def format_missing(self, limit: int = 10) -> str:
        """The missing ranges as ``"3, 5-9, 12"``, at most ``limit`` ranges then a count."""
        parts = [str(a) if a == b else f"{a}-{b}" for a, b in self.missing_ranges[:limit]]
        rest = len(self.missing_ranges) - limit
        if rest > 0:
            parts.append(f"... ({rest} more ranges)")
        return ", ".join(parts) if parts else "none"

    def __str__(self) -> str:
        return (
            f"{self.completed}/{self.num_models} models completed "
            f"({100 * self.fraction_completed:.1f}%); missing: {self.format_missing()}"
        )


def ranges_text(indices: np.ndarray | Sequence[int], max_runs: int | None = None) -> str:
    """Model indices as text, ``0-199, 220-259`` (``none`` when empty): the runs of
    :func:`index_ranges`, the first ``max_runs`` of them when given, then how many more."""
    runs = index_ranges(np.asarray(indices, dtype=np.int64))
    if not runs:
        return "none"
    shown = runs if max_runs is None else runs[:max_runs]
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in shown)
    if len(runs) > len(shown):
        text += f", ... ({len(runs) - len(shown)} more ranges)"
    return text


def index_ranges(indices: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Sorted unique indices as inclusive ``(first, last)`` runs of consecutive values."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return ()
    if not (np.diff(idx) > 0).all():  # already sorted and unique (np.flatnonzero's) is common
        idx = np.unique(idx)
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks], [idx[-1]]))
    return tuple((int(a), int(b)) for a, b in zip(starts, ends, strict=True))


def _dtype_name(dtype: np.dtype) -> str:
    return "bool_" if dtype.kind == "b" else dtype.name


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    import io

    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": shape,
    }
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:  # header longer than 64 KiB: only version 2.0 can hold it
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def read_npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data_offset)`` of a C-ordered ``.npy`` file, checking its size."""
    shape, dtype, offset, _ = _read_npy_header(path)
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise StoreError(
            f"{path} is {actual} bytes but its header says {expected}: the file is truncated or "
            "corrupt; restore it or initialize a new store"
        )
    return tuple(shape), dtype, offset


def fsync_path(path: Path) -> None:
    """Make a file's data, or a directory's entries, durable (``fsync`` on a read-only fd)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_sparse_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Create ``path`` as a .npy file of zeros without writing them (a sparse file).

    Written under a temporary name and renamed, so ``path`` is either absent or complete.
    """
    header = _npy_header(dtype, shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.truncate(len(header) + nbytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_file_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` durably: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def _fill(fd: int, offset: int, count: int, value: np.ndarray) -> None:
    """Write ``count`` copies of the one-element array ``value`` from byte ``offset`` on."""
    chunk = np.full(min(count, _COPY_CHUNK // value.itemsize), value[0], dtype=value.dtype)
    done = 0
    while done < count:
        n = min(count - done, chunk.size)
        _pwrite_all(fd, memoryview(chunk[:n].tobytes()), offset + done * value.itemsize)
        done += n


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int, tuple[int, int]]:
    """``(shape, dtype, data_offset, version)`` from a ``.npy`` header, not checking the size."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as exc:
            raise StoreError(f"{path} is not a readable .npy file: {exc}") from exc
        if fortran:
            raise StoreError(f"{path} is Fortran-ordered; a store's arrays are C-ordered")
        return tuple(shape), dtype, f.tell(), version


def _header_in_place(
    dtype: np.dtype, shape: tuple[int, ...], data_offset: int, version: tuple[int, int]
) -> bytes | None:
    """A ``.npy`` header for ``shape`` exactly ``data_offset`` bytes long (so the data stays
    where it is), or None when it does not fit in the old header's padding."""
    text = (
        f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, "
        f"'shape': {shape!r}, }}"
    )
    length_bytes = 2 if version == (1, 0) else 4
    prefix = len(np.lib.format.MAGIC_PREFIX) + 2 + length_bytes
    pad = data_offset - prefix - len(text) - 1
    if pad < 0:
        return None
    body = (text + " " * pad + "\n").encode("latin1")
    length = len(body).to_bytes(length_bytes, "little")
    return np.lib.format.magic(*version) + length + body


def _copy_sparse(src: int, dst: int, src_start: int, nbytes: int, dst_start: int) -> None:
    """Copy ``nbytes`` from ``src`` at ``src_start`` to ``dst`` at ``dst_start``, leaving holes
    where the source has holes or zeros (so a sparse array stays sparse)."""
    end = src_start + nbytes
    pos = src_start
    while pos < end:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
            hole = min(os.lseek(src, data, os.SEEK_HOLE), end)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                return
            data, hole = pos, end  # no SEEK_DATA here: copy everything, skipping zero chunks
        data = max(data, pos)
        while data < hole:
            chunk = os.pread(src, min(_COPY_CHUNK, hole - data), data)
            if not chunk:
                return
            if chunk.count(0) != len(chunk):
                _pwrite_all(dst, memoryview(chunk), dst_start + data - src_start)
            data += len(chunk)
        pos = hole


def _grow_npy(path: Path, num_models: int, fill: np.ndarray | None) -> None:
    """Give the ``.npy`` array at ``path`` ``num_models`` rows, keeping every existing byte.

    The new rows are holes (zeros) or, with ``fill``, that one value. The header is rewritten in
    place when the new shape fits in its padding (numpy leaves room for 21 digits of rows, so
    every file this store creates); otherwise the whole file is copied under a temporary name
    (sparsely) and renamed over the old one. Either way a crash leaves a file that a second run
    of this function finishes.
    """
    shape, dtype, offset, version = _read_npy_header(path)
    old_rows = shape[0]
    row_nbytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    new_shape = (num_models, *shape[1:])
    new_size = offset + num_models * row_nbytes
    header = _header_in_place(dtype, new_shape, offset, version)
    if header is not None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            # extend (and fill) before the header says so: a crash in between leaves the old
            # header over a longer file, which this function finishes on its next run
            os.ftruncate(fd, max(new_size, os.fstat(fd).st_size))
            if fill is not None:
                _fill(fd, offset + old_rows * row_nbytes, num_models - old_rows, fill)
            os.fsync(fd)
            _pwrite_all(fd, memoryview(header), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    new_header = _npy_header(dtype, new_shape)
    tmp = path.with_name(f".{path.name}.grow-tmp-{uuid.uuid4().hex[:8]}")
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        dst = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _pwrite_all(dst, memoryview(new_header), 0)
            os.ftruncate(dst, len(new_header) + num_models * row_nbytes)
            _copy_sparse(src, dst, offset, old_rows * row_nbytes, len(new_header))
            if fill is not None:
                start = len(new_header) + old_rows * row_nbytes
                _fill(dst, start, num_models - old_rows, fill)
            os.fsync(dst)
        finally:
            os.close(src)
            os.close(dst)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


_UNKNOWN_FILL = np.array([UNKNOWN_CONFIGURATION], dtype=np.int32)


def _create_filled_npy(path: Path, value: np.ndarray, rows: int) -> None:
    """Create ``path`` as a ``(rows,)`` .npy array of ``value`` (a one-element array), under a
    temporary name renamed into place, so ``path`` is either absent or complete."""
    header = _npy_header(value.dtype, (rows,))
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            _fill(fd, len(header), rows, value)
            os.ftruncate(fd, len(header) + rows * value.itemsize)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def _grow_target(path: Path) -> int | None:
    """The ``num_models`` of a grow under way (or interrupted) in the store at ``path``."""
    try:
        return int(json.loads((path / GROW_FILE).read_text())["num_models"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"{path / GROW_FILE} (left by an interrupted grow) is unreadable ({exc}); "
            "grow the store again with the num_models you asked for"
        ) from exc


def _shrink_error(path: Path, current: int, wanted: int) -> StoreError:
    return StoreError(
        f"cannot shrink the store at {path} from {current} to {wanted} models: a store only "
        f"grows. Keep num_models at {current} or more (the rows already trained stay), or "
        f"use a new store directory for {wanted} models"
    )


def _grow_store(path: Path, spec: Spec) -> None:
    """Grow every array of the store at ``path`` to ``spec.num_models`` rows, then write
    ``spec.json`` (the caller holds the store's lock and checked ``spec.schema``).

    ``.grow.json`` names the target while it runs, so an interrupted grow is reported by
    :meth:`Store.open` and finished by the next grow to at least that size.
    """
    spec_path = path / SPEC_FILE
    if spec_path.exists():
        current = Spec.load(spec_path).num_models
    else:  # a seed store: its size is its arrays'
        current = _read_npy_header(path / f"{COMPLETED_KEY}.npy")[0][0]
    target = spec.num_models
    interrupted = _grow_target(path)
    if target < current:
        raise _shrink_error(path, current, target)
    if interrupted is not None and target < interrupted:
        raise StoreError(
            f"a grow of the store at {path} to {interrupted} models was interrupted and some "
            f"arrays already have {interrupted} rows; grow it to {interrupted} or more, not "
            f"{target}"
        )
    entries: dict[str, tuple[ArraySpec, np.ndarray | None]] = {
        key: (entry, None) for key, entry in spec.schema.items()
    }
    entries[COMPLETED_KEY] = (_COMPLETED_SPEC, None)
    if (path / f"{CONFIGURATION_KEY}.npy").exists():
        entries[CONFIGURATION_KEY] = (_CONFIGURATION_SPEC, _UNKNOWN_FILL)
    plan = []
    for key, (entry, fill) in entries.items():
        file = path / f"{key}.npy"
        shape, dtype, _, _ = _read_npy_header(file)
        if tuple(shape[1:]) != entry.shape or dtype != entry.dtype or shape[0] > target:
            raise StoreError(
                f"{file} has shape {list(shape)} dtype {dtype.name}; growing to {target} models "
                f"needs shape {[target, *entry.shape]} dtype {entry.dtype.name}: the store is "
                "corrupt"
            )
        plan.append((file, fill))
    if current == target and interrupted is None:
        return
    for stale in path.glob(".*.grow-tmp-*"):  # copies left by a killed grow
        stale.unlink(missing_ok=True)
    _write_file_atomically(path / GROW_FILE, json.dumps({"num_models": target}) + "\n")
    for file, fill in plan:
        shape, _, _, _ = _read_npy_header(file)
        if shape[0] < target:
            _grow_npy(file, target, fill)
    _write_file_atomically(spec_path, spec.dumps())
    (path / GROW_FILE).unlink()
    fsync_path(path)
    logger.info("grew the store at %s from %s to %d models", path, current, target)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # pwrite may write less than asked (at most ~2 GiB per call on Linux)
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """The store's exclusive lock: initialization, registration and growth."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Store:
    """An open store directory. Create one with :meth:`initialize`, reopen with :meth:`open`.

    Safe to use from many processes and machines at once, as long as no two write the same
    index at the same time.
    """

    def __init__(self, path: Path, spec: Spec, files: Mapping[str, _ArrayFile]) -> None:
        self.path = path
        self.spec = spec
        self._files = dict(files)
        self._fds: dict[str, int] = {}
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def initialize(cls, path: str | Path, spec: Spec, *, grow: bool = False) -> Store:
        """Create the store at ``path`` for ``spec``, or reopen it when it already exists.

        Reinitializing with the same spec keeps every row written so far, and adopts a store
        made by the seed (no ``spec.json``) whose arrays match the spec. A different spec raises
        :class:`StoreMismatchError` and changes nothing. Arrays are created sparse.

        With ``grow=True`` a spec that differs only by a larger ``num_models`` grows the store
        (see :meth:`grow`; it also finishes an interrupted grow); a smaller one raises
        :class:`StoreError` and changes nothing.
        """
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StoreError(f"{path} exists and is not a directory; choose another path") from exc
        with _locked(path):
            spec_path = path / SPEC_FILE
            if spec_path.exists():
                existing = cls._load_spec_file(spec_path)
                if not grow:
                    diffs = existing.differences(spec)
                    if diffs:
                        raise StoreMismatchError(path, diffs)
                    return cls.open(path)
                same_size = Spec(num_models=spec.num_models, schema=existing.schema)
                diffs = same_size.differences(spec)
                if diffs:
                    raise StoreMismatchError(path, diffs)
                _grow_store(path, spec)
                return cls.open(path)
            wanted = dict(spec.schema)
            wanted[COMPLETED_KEY] = _COMPLETED_SPEC
            diffs = []
            to_grow = []
            for key, entry in wanted.items():
                file = path / f"{key}.npy"
                if file.exists():
                    # a grow killed mid-file leaves a longer file than its header says
                    shape, dtype = (_read_npy_header(file) if grow else read_npy_layout(file))[:2]
                    fits = tuple(shape[1:]) == entry.shape and dtype == entry.dtype
                    if grow and fits and shape[0] < spec.num_models:
                        to_grow.append(file)
                    elif shape != (spec.num_models, *entry.shape) or dtype != entry.dtype:
                        diffs.append(
                            f"{file.name}: store has shape {list(shape)} dtype {dtype.name}, "
                            f"spec needs shape {[spec.num_models, *entry.shape]} "
                            f"dtype {entry.dtype.name}"
                        )
            stray = sorted(
                p.stem
                for p in path.glob("*.npy")
                if p.stem not in wanted and p.stem not in _RESERVED
            )
            if stray:
                diffs.append(f"arrays {stray} are in the store but not in the spec")
            if diffs:
                raise StoreMismatchError(path, diffs)
            for file in to_grow:
                _grow_npy(file, spec.num_models, None)
            ids_file = path / f"{CONFIGURATION_KEY}.npy"
            if ids_file.exists() and read_npy_layout(ids_file)[0][0] < spec.num_models:
                _grow_npy(ids_file, spec.num_models, _UNKNOWN_FILL)
            for key, entry in wanted.items():
                file = path / f"{key}.npy"
                if not file.exists():
                    _create_sparse_npy(file, entry.dtype, (spec.num_models, *entry.shape))
            (path / WORKERS_DIR).mkdir(exist_ok=True)
            _write_file_atomically(spec_path, spec.dumps())
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open an existing store; a seed store without ``spec.json`` has its spec inferred."""
        path = Path(path)
        completed_path = path / f"{COMPLETED_KEY}.npy"
        if not path.is_dir() or not completed_path.exists():
            raise StoreError(
                f"no store at {path}: create one with `python -m dm_assets.initialize_store "
                f"--logging.logdir={path} --logging.spec=SPEC.json`"
            )
        growing = _grow_target(path)
        if growing is not None:
            raise StoreError(
                f"a grow of the store at {path} to {growing} models was interrupted; finish it "
                f"with Store.initialize(path, spec, grow=True) and num_models {growing} (or "
                "more), e.g. by materializing the experiment's store asset again"
            )
        spec_path = path / SPEC_FILE
        spec = cls._load_spec_file(spec_path) if spec_path.exists() else cls._infer_spec(path)
        return cls(path, spec, cls._layouts(path, spec))

    @staticmethod
    def _layouts(path: Path, spec: Spec) -> dict[str, _ArrayFile]:
        files: dict[str, _ArrayFile] = {}
        entries = dict(spec.schema)
        entries[COMPLETED_KEY] = _COMPLETED_SPEC
        if (path / f"{CONFIGURATION_KEY}.npy").exists():
            entries[CONFIGURATION_KEY] = _CONFIGURATION_SPEC
        for key, entry in entries.items():
            file = path / f"{key}.npy"
            if not file.exists():
                raise StoreError(f"{file} is missing; rerun initialize_store with the same spec")
            inode = file.stat().st_ino
            shape, dtype, offset = read_npy_layout(file)
            if shape != (spec.num_models, *entry.shape) or dtype != entry.dtype:
                raise StoreError(
                    f"{file} has shape {list(shape)} dtype {dtype.name}, but {SPEC_FILE} says "
                    f"{[spec.num_models, *entry.shape]} {entry.dtype.name}: the store is corrupt"
                )
            files[key] = _ArrayFile(key, file, entry, offset, inode)
        return files

    @staticmethod
    def _load_spec_file(spec_path: Path) -> Spec:
        try:
            return Spec.load(spec_path)
        except SpecError as exc:
            raise StoreError(f"the store's own {spec_path} is unreadable:\n{exc}") from exc

    @staticmethod
    def _infer_spec(path: Path) -> Spec:
        completed_shape, _, _ = read_npy_layout(path / f"{COMPLETED_KEY}.npy")
        num_models = completed_shape[0]
        schema: dict[str, Any] = {}
        for file in sorted(path.glob("*.npy")):
            if file.stem in _RESERVED:
                continue
            shape, dtype, _ = read_npy_layout(file)
            if not shape or shape[0] != num_models:
                raise StoreError(
                    f"{file} has shape {list(shape)}; every array needs {num_models} rows"
                )
            schema[file.stem] = {"shape": list(shape[1:]), "dtype": _dtype_name(dtype)}
        return Spec.from_dict({"num_models": num_models, "schema": schema}, source=str(path))

    def _reload(self) -> None:
        """Reread the spec and every file's layout (after a grow, or a registration)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        fresh = Store.open(self.path)
        self.spec, self._files = fresh.spec, fresh._files

    def _refresh(self) -> None:
        """Reload when another process grew the store by rewriting a file (a new inode) or
        created ``_configuration.npy`` since this store was opened."""
        ids_appeared = (
            CONFIGURATION_KEY not in self._files
            and (self.path / f"{CONFIGURATION_KEY}.npy").exists()
        )
        replaced = any(f.path.stat().st_ino != f.inode for f in self._files.values() if f.inode)
        if ids_appeared or replaced:
            self._reload()

    # ------------------------------------------------------------------ configurations
    def register_configuration(self, config: TrainingConfiguration) -> int:
        """The id of ``config`` in this store, registering it in ``configurations.json`` when
        new (the same fingerprint always gets the same id; ids count up from 0).

        The first registration creates ``_configuration.npy``, every row unknown (-1). Safe
        when several processes register at once.
        """
        fingerprint = config.fingerprint()
        with _locked(self.path):
            ids_file = self.path / f"{CONFIGURATION_KEY}.npy"
            if not ids_file.exists():
                rows = read_npy_layout(self.path / f"{COMPLETED_KEY}.npy")[0][0]
                _create_filled_npy(ids_file, _UNKNOWN_FILL, rows)
            table = self._read_configurations_file()
            for key, entry in table.items():
                if entry.get("fingerprint") == fingerprint:
                    self._refresh()
                    return int(key)
            new_id = max((int(k) for k in table), default=-1) + 1
            table[str(new_id)] = {
                "fingerprint": fingerprint,
                "configuration": config.to_dict(),
                "registered": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            text = json.dumps({"configurations": table}, indent=1, sort_keys=True) + "\n"
            _write_file_atomically(self.path / CONFIGURATIONS_FILE, text)
        self._refresh()
        return new_id

    def configuration_id(self, config: TrainingConfiguration) -> int | None:
        """The id ``config`` is recorded under in this store (by fingerprint), or None."""
        fingerprint = config.fingerprint()
        return next(
            (
                int(k)
                for k, e in self._read_configurations_file().items()
                if e.get("fingerprint") == fingerprint
            ),
            None,
        )

    def _read_configurations_file(self) -> dict[str, dict[str, Any]]:
        path = self.path / CONFIGURATIONS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"the store's {path} is unreadable ({exc}); restore it from a backup"
            ) from exc
        table = data.get("configurations") if isinstance(data, dict) else None
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and k.lstrip("-").isdigit() and isinstance(v, dict)
            for k, v in table.items()
        ):
            raise StoreError(
                f"the store's {path} is not a configurations table "
                '({"configurations": {"<id>": {...}}}); restore it from a backup'
            )
        return table

    def configurations(self) -> dict[int, TrainingConfiguration]:
        """Every registered configuration by id (empty for a store with none, e.g. a seed's)."""
        out = {}
        for key, entry in self._read_configurations_file().items():
            try:
                out[int(key)] = TrainingConfiguration.from_dict(entry.get("configuration"))
            except ConfigurationError as exc:
                raise StoreError(
                    f"configuration {key} in {self.path / CONFIGURATIONS_FILE} is unreadable: {exc}"
                ) from exc
        return dict(sorted(out.items()))

    def configuration_ids(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The id of the configuration that produced each row: int32, ``(num_models,)`` or
        ``(len(indices),)``; ``-1`` (unknown) for a row written without one, and everywhere in
        a store without ``_configuration.npy``. Like every row, meaningful only where the row
        is completed."""
        self._refresh()
        if indices is None:
            n = self.spec.num_models
            if CONFIGURATION_KEY not in self._files:
                return np.full(n, UNKNOWN_CONFIGURATION, dtype=np.int32)
            return np.array(self._memmap(CONFIGURATION_KEY), dtype=np.int32)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= self.spec.num_models)]
        if bad.size:
            raise StoreError(
                f"model index(es) {bad[:10].tolist()} outside this store's range "
                f"[0, {self.spec.num_models})"
            )
        if CONFIGURATION_KEY not in self._files:
            return np.full(idx.size, UNKNOWN_CONFIGURATION, dtype=np.int32)
        return np.array(self._memmap(CONFIGURATION_KEY)[idx], dtype=np.int32)

    # ------------------------------------------------------------------ growing
    def grow(self, num_models: int) -> None:
        """Give the store ``num_models`` rows (at least its current number), in place.

        Every array gets the new rows sparsely (no disk used until they are written), every
        existing row, flag and configuration id stays bit for bit, the new rows are not
        completed and their configuration is unknown (-1). ``spec.json`` is rewritten last.
        A smaller ``num_models`` raises :class:`StoreError` and changes nothing.

        Safe while other processes write rows of this store (their commits wait while a file
        is rewritten, and then use the new file).
        """
        with _locked(self.path):
            spec = Spec(num_models=num_models, schema=self._load_current_spec().schema)
            _grow_store(self.path, spec)
        self._reload()

    def _load_current_spec(self) -> Spec:
        spec_path = self.path / SPEC_FILE
        return self._load_spec_file(spec_path) if spec_path.exists() else self.spec

    # ------------------------------------------------------------------ writing
    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(self._files[key].path, os.O_RDWR | os.O_CLOEXEC)
            self._fds[key] = fd
        return fd

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise StoreError(f"model index must be an integer; got {index!r}")
        if not 0 <= index < self.spec.num_models:
            raise StoreError(
                f"model index {index} is outside this store's range [0, {self.spec.num_models})"
            )
        return int(index)

    @contextmanager
    def _commit_lock(self) -> Iterator[None]:
        """The store's lock, shared: commits run side by side, but never during a grow (which
        may replace a file) or a registration."""
        if self._lock_fd is None:
            self._lock_fd = os.open(
                self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _set_completed(self, indices: Sequence[int], value: bool) -> None:
        fd = self._fd(COMPLETED_KEY)
        flag = memoryview(b"\x01" if value else b"\x00")
        for index in indices:
            _pwrite_all(fd, flag, self._files[COMPLETED_KEY].row_offset(index))
        os.fsync(fd)

    def write_row(
        self,
        index: int,
        values: Mapping[str, object],
        *,
        overwrite: bool = False,
        configuration_id: int | None = None,
    ) -> None:
        """Store model ``index``'s returned ``values`` (one per schema key), then mark it done.

        Parameters
        ----------
        index : int
            The model's index, in ``[0, num_models)``.
        values : mapping
            One value per schema key. Checked in full first (see
            :func:`dm_assets.store.rows.coerce_row`); on any problem
            :class:`~dm_assets.store.rows.RowError` is raised and nothing is written.
        overwrite : bool
            A completed index raises :class:`StoreError` unless set; an overwrite clears the
            flag first, so a crash mid-way leaves the index not completed rather than half-new.
        configuration_id : int, optional
            The id (from :meth:`register_configuration`) of the configuration that produced
            ``values``, written in the same commit. None: unknown (-1 in a store that records
            configurations; nothing written in one that does not).
        """
        self.write_rows([(index, values)], overwrite=overwrite, configuration_id=configuration_id)

    def write_rows(
        self,
        rows: Sequence[tuple[int, Mapping[str, object]]],
        *,
        overwrite: bool = False,
        configuration_id: int | None = None,
    ) -> None:
        """Store many models' values with one commit: every row written and every touched file
        fsynced once, then every row's configuration id written and fsynced, then every flag
        written and fsynced once (a group commit: 3 + keys fsyncs for the whole group instead
        of per row). Same checks, parameters and guarantees as :meth:`write_row`; a crash
        leaves each index completed with its values and id, or not completed. Every row is
        checked before anything is written."""
        with self._commit_lock():
            self._refresh()
            self._write_rows(rows, overwrite, configuration_id)

    def _write_rows(
        self,
        rows: Sequence[tuple[int, Mapping[str, object]]],
        overwrite: bool,
        configuration_id: int | None,
    ) -> None:
        config_id = self._check_configuration_id(configuration_id)
        checked: dict[int, dict[str, np.ndarray]] = {}
        for index, values in rows:
            index = self._check_index(index)
            if index in checked:
                raise StoreError(f"model index {index} appears twice in one write")
            checked[index] = coerce_row(values, self.spec.schema, index=index)
        done = [i for i in checked if self.is_completed(i)]
        if done and not overwrite:
            raise StoreError(
                f"model index(es) {done[:10]} already completed; pass overwrite=True "
                "(--worker.do_if_complete) to replace them"
            )
        if done:
            self._set_completed(done, False)
        touched: set[int] = set()
        for index, arrays in checked.items():
            for key, arr in arrays.items():
                if arr.nbytes == 0:
                    continue
                fd = self._fd(key)
                _pwrite_all(fd, arr.data.cast("B"), self._files[key].row_offset(index))
                touched.add(fd)
        for fd in sorted(touched):
            os.fsync(fd)
        if CONFIGURATION_KEY in self._files:
            ids = self._files[CONFIGURATION_KEY]
            fd = self._fd(CONFIGURATION_KEY)
            value = memoryview(np.array([config_id], dtype=np.int32).tobytes())
            for index in checked:
                _pwrite_all(fd, value, ids.row_offset(index))
            os.fsync(fd)
        self._set_completed(list(checked), True)

    def _check_configuration_id(self, configuration_id: int | None) -> int:
        if configuration_id is None or configuration_id == UNKNOWN_CONFIGURATION:
            return UNKNOWN_CONFIGURATION
        if isinstance(configuration_id, bool) or not isinstance(
            configuration_id, (int, np.integer)
        ):
            raise StoreError(f"configuration_id must be an integer; got {configuration_id!r}")
        known = self._read_configurations_file()
        if str(int(configuration_id)) not in known or CONFIGURATION_KEY not in self._files:
            raise StoreError(
                f"configuration id {configuration_id} is not registered in the store at "
                f"{self.path} (registered: {sorted(int(k) for k in known)}); get ids from "
                "register_configuration()"
            )
        return int(configuration_id)

    def log_command(self, command: str) -> None:
        """Append one line to ``cmds.txt`` (the seed's record of completed commands)."""
        line = command.replace("\n", " ") + "\n"
        fd = os.open(self.path / COMMANDS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def worker_dir(self, index: int) -> Path:
        """Model ``index``'s own directory, ``workers/<index>/``, created on demand."""
        directory = self.path / WORKERS_DIR / str(self._check_index(index))
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    # ------------------------------------------------------------------ reading
    def is_completed(self, index: int) -> bool:
        """Whether model ``index``'s row is complete and durable."""
        index = self._check_index(index)
        flag = os.pread(self._fd(COMPLETED_KEY), 1, self._files[COMPLETED_KEY].row_offset(index))
        return flag != b"\x00"

    def completed_mask(self) -> np.ndarray:
        """A fresh copy of the completion flags: bool, ``(num_models,)``."""
        return np.array(self.read(COMPLETED_KEY), dtype=bool)

    def completed_indices(self) -> np.ndarray:
        """Indices of completed models, increasing: int64, ``(n_completed,)``."""
        return np.flatnonzero(self.completed_mask()).astype(np.int64)

    def read(self, key: str) -> np.memmap:
        """Key's whole array as a read-only memory map, ``(num_models, *shape)``.

        Rows of models not yet completed hold zeros or partial data: use
        :meth:`completed_rows` or :meth:`completed_mask` to select.
        """
        if key not in self._files or key == CONFIGURATION_KEY:
            raise StoreError(f"no key {key!r} in this store; its keys are {list(self.spec.schema)}")
        self._refresh()
        return self._memmap(key)

    def _memmap(self, key: str) -> np.memmap:
        file = self._files[key]
        return np.memmap(
            file.path,
            dtype=file.spec.dtype,
            mode="r",
            offset=file.data_offset,
            shape=(self.spec.num_models, *file.spec.shape),
        )

    def completed_rows(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, rows)`` of the completed models: int64 ``(n,)`` and ``(n, *shape)``."""
        indices = self.completed_indices()
        return indices, np.asarray(self.read(key)[indices])

    def status(self) -> StoreStatus:
        """Completed count and missing index ranges."""
        mask = self.completed_mask()
        return StoreStatus(
            num_models=self.spec.num_models,
            completed=int(mask.sum()),
            missing_ranges=index_ranges(np.flatnonzero(~mask)),
        )

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, num_models={self.spec.num_models}, "
            f"keys={list(self.spec.schema)})"
        )
