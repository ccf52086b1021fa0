"""The store: every model's outputs in contiguous memory-mapped arrays, with completion flags.

A store is a directory, compatible with the seed's (``datamodels.training``):

================  ==============================  =========================================
file              shape                           dtype / content
================  ==============================  =========================================
``<key>.npy``     ``(num_models, *shape)``        the key's dtype; row ``i`` is model ``i``'s
                                                  value, meaningful only once completed
``_completed.npy`` ``(num_models,)``              bool; ``True`` once every row of ``i`` is
                                                  durable
``spec.json``     --                              the spec the store was initialized with
``workers/<i>/``  --                              model ``i``'s own files (its ``logdir``)
``cmds.txt``      --                              one line per completed model: the command
``.lock``         --                              empty; serializes initialization
================  ==============================  =========================================

Every ``.npy`` file is a plain numpy file (``np.load(path, mmap_mode="r")`` reads it). Files are
created sparse: a 21 GB store costs no disk until rows are written.

The write protocol: a row is written at its exact byte range with ``pwrite`` (never through a
writable memory map, whose whole-page write-back could clobber a neighbour written by another
machine on a shared filesystem), every touched file is fsynced, and only then the completion
flag is written and fsynced. A writer killed at any moment leaves each index either completed
with exactly the values it returned, or not completed.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dm_assets.errors import DmError
from dm_assets.store.rows import coerce_row
from dm_assets.store.spec import COMPLETED_KEY, ArraySpec, Spec, SpecError

SPEC_FILE = "spec.json"
WORKERS_DIR = "workers"
COMMANDS_FILE = "cmds.txt"
LOCK_FILE = ".lock"
_COMPLETED_SPEC = ArraySpec(shape=(), dtype=np.dtype(bool), dtype_name="bool_")


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
        offset = f.tell()
    if fortran:
        raise StoreError(f"{path} is Fortran-ordered; a store's arrays are C-ordered")
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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # pwrite may write less than asked (at most ~2 GiB per call on Linux)
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
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

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def initialize(cls, path: str | Path, spec: Spec) -> Store:
        """Create the store at ``path`` for ``spec``, or reopen it when it already exists.

        Reinitializing with the same spec keeps every row written so far, and adopts a store
        made by the seed (no ``spec.json``) whose arrays match the spec. A different spec raises
        :class:`StoreMismatchError` and changes nothing. Arrays are created sparse.
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
                diffs = existing.differences(spec)
                if diffs:
                    raise StoreMismatchError(path, diffs)
                return cls.open(path)
            wanted = dict(spec.schema)
            wanted[COMPLETED_KEY] = _COMPLETED_SPEC
            diffs = []
            for key, entry in wanted.items():
                file = path / f"{key}.npy"
                if file.exists():
                    shape, dtype, _ = read_npy_layout(file)
                    if shape != (spec.num_models, *entry.shape) or dtype != entry.dtype:
                        diffs.append(
                            f"{file.name}: store has shape {list(shape)} dtype {dtype.name}, "
                            f"spec needs shape {[spec.num_models, *entry.shape]} "
                            f"dtype {entry.dtype.name}"
                        )
            stray = sorted(p.stem for p in path.glob("*.npy") if p.stem not in wanted)
            if stray:
                diffs.append(f"arrays {stray} are in the store but not in the spec")
            if diffs:
                raise StoreMismatchError(path, diffs)
            for key, entry in wanted.items():
                file = path / f"{key}.npy"
                if not file.exists():
                    _create_sparse_npy(file, entry.dtype, (spec.num_models, *entry.shape))
            (path / WORKERS_DIR).mkdir(exist_ok=True)
            tmp = path / f".{SPEC_FILE}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.write_text(spec.dumps())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, spec_path)
            fsync_path(path)
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
        spec_path = path / SPEC_FILE
        spec = cls._load_spec_file(spec_path) if spec_path.exists() else cls._infer_spec(path)
        files: dict[str, _ArrayFile] = {}
        entries = dict(spec.schema)
        entries[COMPLETED_KEY] = _COMPLETED_SPEC
        for key, entry in entries.items():
            file = path / f"{key}.npy"
            if not file.exists():
                raise StoreError(f"{file} is missing; rerun initialize_store with the same spec")
            shape, dtype, offset = read_npy_layout(file)
            if shape != (spec.num_models, *entry.shape) or dtype != entry.dtype:
                raise StoreError(
                    f"{file} has shape {list(shape)} dtype {dtype.name}, but {SPEC_FILE} says "
                    f"{[spec.num_models, *entry.shape]} {entry.dtype.name}: the store is corrupt"
                )
            files[key] = _ArrayFile(key, file, entry, offset)
        return cls(path, spec, files)

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
            if file.stem == COMPLETED_KEY:
                continue
            shape, dtype, _ = read_npy_layout(file)
            if not shape or shape[0] != num_models:
                raise StoreError(
                    f"{file} has shape {list(shape)}; every array needs {num_models} rows"
                )
            schema[file.stem] = {"shape": list(shape[1:]), "dtype": _dtype_name(dtype)}
        return Spec.from_dict({"num_models": num_models, "schema": schema}, source=str(path))

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

    def _set_completed(self, indices: Sequence[int], value: bool) -> None:
        fd = self._fd(COMPLETED_KEY)
        flag = memoryview(b"\x01" if value else b"\x00")
        for index in indices:
            _pwrite_all(fd, flag, self._files[COMPLETED_KEY].row_offset(index))
        os.fsync(fd)

    def write_row(
        self, index: int, values: Mapping[str, object], *, overwrite: bool = False
    ) -> None:
        """Store model ``index``'s returned ``values`` (one per schema key), then mark it done.

        ``values`` is checked in full first (see :func:`dm_assets.store.rows.coerce_row`); on
        any problem :class:`~dm_assets.store.rows.RowError` is raised and nothing is written. A
        completed index raises :class:`StoreError` unless ``overwrite``; an overwrite clears
        the flag first, so a crash mid-way leaves the index not completed rather than half-new.
        """
        self.write_rows([(index, values)], overwrite=overwrite)

    def write_rows(
        self, rows: Sequence[tuple[int, Mapping[str, object]]], *, overwrite: bool = False
    ) -> None:
        """Store many models' values with one commit: every row written, every touched file
        fsynced once, then every flag written and fsynced once (a group commit: 2 + keys
        fsyncs for the whole group instead of per row). Same checks and guarantees as
        :meth:`write_row`; a crash leaves each index completed with its values, or not
        completed. Every row is checked before anything is written."""
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
        self._set_completed(list(checked), True)

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
        if key not in self._files:
            raise StoreError(f"no key {key!r} in this store; its keys are {list(self.spec.schema)}")
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

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, num_models={self.spec.num_models}, "
            f"keys={list(self.spec.schema)})"
        )
