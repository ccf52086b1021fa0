"""FFCV's dataset file format (version 2, as FFCV 1.0.2 writes and reads it), in numpy alone.

Writing and reading our datasets needs no FFCV: importing FFCV costs seconds (it compiles its
JPEG decoders with numba at import), and our rows are fixed-size byte ranges that numpy copies
directly. The files are FFCV's own format, byte for byte where FFCV's single-process
``DatasetWriter`` would write the same rows; FFCV's ``Reader`` and ``Loader`` read them (the
tests check both of FFCV's memory managers). The structures below mirror ``ffcv.types``.

A file, in order:

=====================  ===============================  ====================================
part                   numpy dtype, count               content
=====================  ===============================  ====================================
header                 :data:`HEADER_TYPE`, 1           format version (2), number of fields,
                                                        page size, number of rows, byte
                                                        offset of the allocation table
field descriptors      :data:`FIELD_DESC_TYPE`,         per field: FFCV's type id, name
                       ``num_fields``                   (ASCII, at most 16 bytes), arguments
                                                        (for an ``NDArrayField``:
                                                        :data:`NDARRAY_ARGS_TYPE` then the
                                                        dtype's JSON ``descr``)
row metadata           aligned struct of each field's   per row: an ``NDArrayField``'s byte
                       metadata type, ``num_samples``   offset of its data (``<u8``), an
                                                        ``IntField``'s value (``<i8``), a
                                                        ``FloatField``'s value (``<f8``)
zeros                  --                               up to the next multiple of the page
                                                        size
data pages             ``page_size`` bytes each         each row's array fields, packed in
                                                        pages; no row spans two pages
allocation table       :data:`ALLOC_TABLE_TYPE`, the    ``(row, offset, size)`` of every
                       rest of the file                 array field's data
=====================  ===============================  ====================================

Our datasets (:mod:`dm_assets.regression.beton`) have fields ``mask`` (``NDArrayField``),
``targets`` (``NDArrayField``) and ``idx`` (``IntField``), and :class:`RowLayout` lays their
rows out as FFCV's writer does with one process: row ``r`` is ``mask`` bytes then ``targets``
bytes, ``rows_per_page = page_size // row_bytes`` rows per page, page ``r // rows_per_page``
at slot ``r % rows_per_page``. Two choices differ from FFCV's writer and from nothing its
reader needs: the page size is sized to the rows (:func:`choose_page_size`: small stores give
small files), and the last page ends with the last row instead of being padded to a whole
page (FFCV's writer writes a full page per writer process).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dm_assets.regression.beton import IDX_FIELD, MASK_FIELD, TARGET_DTYPE, TARGETS_FIELD

FORMAT_VERSION = 2
HEADER_TYPE = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
FIELD_DESC_TYPE = np.dtype(
    [("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True
)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
NDARRAY_ARGS_TYPE = np.dtype([("shape", "<u8", 32), ("type_length", "<u8")])

# FFCV's type ids (ffcv.types.TYPE_ID_HANDLER) of the fields we read, and their metadata.
FLOAT_FIELD_ID = 0
INT_FIELD_ID = 1
NDARRAY_FIELD_ID = 4
_METADATA_TYPES = {
    FLOAT_FIELD_ID: np.dtype("<f8"),
    INT_FIELD_ID: np.dtype("<i8"),
    NDARRAY_FIELD_ID: np.dtype("<u8"),
}
_FIELD_KIND = {FLOAT_FIELD_ID: "FloatField", INT_FIELD_ID: "IntField"}
_FIELD_KIND[NDARRAY_FIELD_ID] = "NDArrayField"

MIN_PAGE_SIZE = 1 << 12  # 4 KiB, the operating system's page
MAX_PAGE_SIZE = 1 << 31  # the header's page size is uint32 and FFCV wants a power of two
ROWS_PER_PAGE = 64  # the page size aims at this many rows: at most 1/64 of a page is padding


class FormatError(ValueError):
    """A file that is not an FFCV dataset we can read; the message says why."""


def choose_page_size(row_bytes: int) -> int:
    """The page size for rows of ``row_bytes`` bytes: the smallest power of two that holds
    :data:`ROWS_PER_PAGE` rows, at least :data:`MIN_PAGE_SIZE` and at most
    :data:`MAX_PAGE_SIZE`.

    A row never spans two pages, so a page wastes less than one row (under
    ``1 / ROWS_PER_PAGE`` of it, unless rows are over 32 MiB), and the file starts its first
    page at a multiple of the page size, so small rows give small files. Raises
    :class:`FormatError` when one row is larger than :data:`MAX_PAGE_SIZE`.
    """
    if row_bytes > MAX_PAGE_SIZE:
        raise FormatError(f"one row is {row_bytes} bytes, more than a page can hold (2 GiB)")
    want = max(MIN_PAGE_SIZE, ROWS_PER_PAGE * row_bytes)
    return min(MAX_PAGE_SIZE, 1 << (want - 1).bit_length())


def ndarray_arguments(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """An ``NDArrayField``'s 1024 argument bytes (``NDArrayField.to_binary``): the shape and
    the length of the dtype's JSON ``descr``, then that JSON."""
    args = np.zeros(1024, dtype="<u1")
    header = np.zeros(1, dtype=NDARRAY_ARGS_TYPE)
    header["shape"][0][: len(shape)] = shape
    encoded = json.dumps(np.dtype(dtype).descr).encode("ascii")
    header["type_length"][0] = len(encoded)
    packed = np.concatenate([header.view("<u1"), np.frombuffer(encoded, dtype="<u1")])
    args[: len(packed)] = packed
    return args


def _parse_ndarray_arguments(args: np.ndarray) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and shape an ``NDArrayField``'s argument bytes describe."""
    header = args[: NDARRAY_ARGS_TYPE.itemsize].view(NDARRAY_ARGS_TYPE)[0]
    length = int(header["type_length"])
    descr = json.loads(args[NDARRAY_ARGS_TYPE.itemsize :][:length].tobytes().decode("ascii"))
    dtype = np.dtype([tuple(x) for x in descr])["f0"]
    shape = [int(s) for s in header["shape"]]
    while shape and shape[-1] == 0:
        shape.pop()
    return dtype, tuple(shape)


@dataclass(frozen=True)
class Field:
    """One field of a file: FFCV's ``type_id``; for an ``NDArrayField`` its ``dtype`` and
    per-row ``shape`` (``None`` for scalar fields)."""

    name: str
    type_id: int
    dtype: np.dtype | None = None
    shape: tuple[int, ...] | None = None

    @property
    def kind(self) -> str:
        """FFCV's class name of the field (``NDArrayField``, ``IntField``, ``FloatField``)."""
        return _FIELD_KIND.get(self.type_id, f"type {self.type_id}")

    @property
    def nbytes(self) -> int:
        """Bytes of one row's data of an ``NDArrayField`` (0 for scalar fields)."""
        if self.dtype is None or self.shape is None:
            return 0
        return int(self.dtype.itemsize * np.prod(self.shape, dtype=np.int64))

    def descriptor(self) -> np.ndarray:
        """This field's :data:`FIELD_DESC_TYPE` record."""
        desc = np.zeros(1, dtype=FIELD_DESC_TYPE)
        desc["type_id"] = self.type_id
        name = np.frombuffer(self.name.encode("ascii")[:16], dtype="<u1")
        desc["name"][0][: len(name)] = name
        if self.dtype is not None and self.shape is not None:  # an NDArrayField
            desc["arguments"][0] = ndarray_arguments(self.dtype, self.shape)
        return desc


def metadata_type(fields: list[Field]) -> np.dtype:
    """The per-row metadata struct of ``fields`` (``ffcv.types.get_metadata_type``): one
    member ``f<i>`` per field, aligned."""
    return np.dtype([("", _METADATA_TYPES[f.type_id]) for f in fields], align=True)


@dataclass(frozen=True)
class RowLayout:
    """Where everything of a dataset of ``n_rows`` rows goes: ``mask`` ``(n_features,)`` in
    ``mask_dtype``, ``targets`` ``(n_targets,)`` float32, ``idx``; pages of ``page_size``
    bytes (module doc)."""

    n_rows: int
    mask_dtype: np.dtype
    n_features: int
    n_targets: int
    page_size: int

    @property
    def fields(self) -> list[Field]:
        return [
            Field(MASK_FIELD, NDARRAY_FIELD_ID, np.dtype(self.mask_dtype), (self.n_features,)),
            Field(TARGETS_FIELD, NDARRAY_FIELD_ID, TARGET_DTYPE, (self.n_targets,)),
            Field(IDX_FIELD, INT_FIELD_ID),
        ]

    @property
    def mask_bytes(self) -> int:
        return int(np.dtype(self.mask_dtype).itemsize * self.n_features)

    @property
    def targets_bytes(self) -> int:
        return 4 * self.n_targets

    @property
    def row_bytes(self) -> int:
        return self.mask_bytes + self.targets_bytes

    @property
    def rows_per_page(self) -> int:
        return self.page_size // self.row_bytes

    @property
    def n_pages(self) -> int:
        return -(-self.n_rows // self.rows_per_page)

    @property
    def metadata_start(self) -> int:
        return HEADER_TYPE.itemsize + 3 * FIELD_DESC_TYPE.itemsize

    @property
    def data_start(self) -> int:
        """The first page's offset: the end of the metadata, rounded up to a page."""
        end = self.metadata_start + self.n_rows * metadata_type(self.fields).itemsize
        return -(-end // self.page_size) * self.page_size

    @property
    def data_end(self) -> int:
        """The end of the last row (the last page is not padded)."""
        last = self.n_rows - (self.n_pages - 1) * self.rows_per_page
        return self.data_start + (self.n_pages - 1) * self.page_size + last * self.row_bytes

    @property
    def file_size(self) -> int:
        return self.data_end + 2 * self.n_rows * ALLOC_TABLE_TYPE.itemsize

    def row_offsets(self, rows: np.ndarray) -> np.ndarray:
        """The file offsets of rows ``rows`` (their ``mask`` data; ``targets`` follows), int64."""
        rows = np.asarray(rows, dtype=np.int64)
        page, slot = np.divmod(rows, self.rows_per_page)
        return self.data_start + page * self.page_size + slot * self.row_bytes

    def head(self, model_indices: np.ndarray) -> bytes:
        """The header, field descriptors and row metadata (``idx`` = ``model_indices``)."""
        header = np.zeros(1, dtype=HEADER_TYPE)
        header["version"] = FORMAT_VERSION
        header["num_fields"] = 3
        header["page_size"] = self.page_size
        header["num_samples"] = self.n_rows
        header["alloc_table_ptr"] = self.data_end
        descriptors = np.concatenate([f.descriptor() for f in self.fields])
        offsets = self.row_offsets(np.arange(self.n_rows))
        metadata = np.zeros(self.n_rows, dtype=metadata_type(self.fields))
        metadata["f0"] = offsets
        metadata["f1"] = offsets + self.mask_bytes
        metadata["f2"] = model_indices
        return header.tobytes() + descriptors.tobytes() + metadata.tobytes()

    def alloc_table(self) -> np.ndarray:
        """Every array field's allocation, in the order FFCV's writer records them: row 0's
        mask, row 0's targets, row 1's mask, ..."""
        offsets = self.row_offsets(np.arange(self.n_rows))
        table = np.zeros((self.n_rows, 2), dtype=ALLOC_TABLE_TYPE)
        table["sample_id"] = np.arange(self.n_rows)[:, None]
        table["ptr"][:, 0] = offsets
        table["ptr"][:, 1] = offsets + self.mask_bytes
        table["size"][:, 0] = self.mask_bytes
        table["size"][:, 1] = self.targets_bytes
        return table.reshape(-1)


@dataclass(frozen=True)
class BetonFile:
    """What the header, field descriptors and metadata of a file say: ``n_rows`` rows, page
    size, ``fields`` by name (in file order) and the per-row ``metadata`` (one member ``f<i>``
    per field, see :func:`metadata_type`); ``size`` is the file's size in bytes."""

    path: Path
    n_rows: int
    page_size: int
    fields: dict[str, Field]
    metadata: np.ndarray
    alloc_table_ptr: int
    size: int

    def column(self, name: str) -> np.ndarray:
        """Field ``name``'s metadata for every row: an array field's data offsets, a scalar
        field's values."""
        return self.metadata[f"f{list(self.fields).index(name)}"]


def read_head(path: Path) -> BetonFile:
    """Read and check the header, field descriptors and metadata of the file at ``path``.

    Raises
    ------
    FormatError
        When the file is too short for what its header says, has another format version, a
        field of a type other than ``NDArrayField``, ``IntField`` or ``FloatField``, or data
        offsets outside the file (a truncated file).
    """
    size = path.stat().st_size
    header = np.fromfile(path, dtype=HEADER_TYPE, count=1)
    if len(header) != 1:
        raise FormatError(f"it is {size} bytes, shorter than FFCV's header")
    version = int(header[0]["version"])
    if version != FORMAT_VERSION:
        raise FormatError(f"its format version is {version}; FFCV 1.0's is {FORMAT_VERSION}")
    num_fields = int(header[0]["num_fields"])
    n_rows = int(header[0]["num_samples"])
    page_size = int(header[0]["page_size"])
    table_ptr = int(header[0]["alloc_table_ptr"])
    descs = np.fromfile(path, dtype=FIELD_DESC_TYPE, count=num_fields, offset=HEADER_TYPE.itemsize)
    if len(descs) != num_fields:
        raise FormatError(f"it is truncated ({size} bytes)")
    fields: dict[str, Field] = {}
    for desc in descs:
        name = desc["name"].tobytes().decode("ascii", errors="replace").split("\x00")[0]
        type_id = int(desc["type_id"])
        if type_id == NDARRAY_FIELD_ID:
            try:
                dtype, shape = _parse_ndarray_arguments(desc["arguments"])
            except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
                raise FormatError(f"field {name!r} has unreadable arguments ({exc})") from exc
            fields[name] = Field(name, type_id, dtype, shape)
        elif type_id in _METADATA_TYPES:
            fields[name] = Field(name, type_id)
        else:
            raise FormatError(
                f"field {name!r} has FFCV type id {type_id}; only NDArrayField, IntField and "
                "FloatField are read here"
            )
    meta_type = metadata_type(list(fields.values()))
    meta_start = HEADER_TYPE.itemsize + num_fields * FIELD_DESC_TYPE.itemsize
    if table_ptr > size or meta_start + n_rows * meta_type.itemsize > size:
        raise FormatError(f"it is truncated ({size} bytes)")
    metadata = np.fromfile(path, dtype=meta_type, count=n_rows, offset=meta_start)
    for i, field in enumerate(fields.values()):
        if field.type_id == NDARRAY_FIELD_ID and n_rows:
            ends = metadata[f"f{i}"].astype(np.int64) + field.nbytes
            if int(ends.max()) > size:
                raise FormatError(f"it is truncated ({size} bytes)")
    return BetonFile(path, n_rows, page_size, fields, metadata, table_ptr, size)
