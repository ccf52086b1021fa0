"""CIFAR-10's python batches as the two FFCV datasets the CIFAR-10 example trains and evaluates on.

    python -m dm_assets.examples.cifar10.convert --cifar-dir DIR --out-dir DIR [--num-workers N]

``--cifar-dir`` is the unpacked "CIFAR-10 python version" (``cifar-10-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html unpacks to ``cifar-10-batches-py/``); nothing is
downloaded here. Its files ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` are each a
pickled dict with ``b"data"``, uint8 ``(n, 3072)`` (per image 1,024 red, then 1,024 green, then
1,024 blue values, each a 32 x 32 image row by row), and ``b"labels"``, ``n`` ints in 0..9.

Written to ``--out-dir`` (each file replaced atomically: written under a temporary name, checked
byte for byte against the source, then renamed):

==============  ==========  ===============================================================
file            rows        content
==============  ==========  ===============================================================
``train.beton``  50,000     ``data_batch_1`` .. ``data_batch_5`` in order: row ``i`` is
                            training example ``i``, position ``i`` of every model's mask
``val.beton``    10,000     ``test_batch`` in order: row ``j`` is target ``j`` of the margins
==============  ==========  ===============================================================

Fields, in this order: ``image``, FFCV ``RGBImageField`` stored raw (uncompressed: the decoded
pixels are exactly CIFAR's, no JPEG artifacts), uint8 ``(32, 32, 3)`` height x width x RGB; and
``label``, FFCV ``IntField`` (int64), the class 0..9 in CIFAR's order (airplane, automobile,
bird, cat, deer, dog, frog, horse, ship, truck).

:func:`make_fake_cifar` writes files of the same format with few images, for tests and timing.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dm_assets.cli import EXIT_FAILED, configure_logging, make_parser
from dm_assets.errors import DmError
from dm_assets.store.store import fsync_path

logger = logging.getLogger(__name__)

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
TRAIN_BETON = "train.beton"
VAL_BETON = "val.beton"
IMAGE_FIELD = "image"
LABEL_FIELD = "label"
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_PIXELS = int(np.prod(IMAGE_SHAPE))
_DOWNLOAD_HINT = (
    "download the CIFAR-10 python version (cifar-10-python.tar.gz) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, unpack it with `tar xzf`, and pass the "
    "cifar-10-batches-py folder as --cifar-dir"
)
# The smallest page FFCV allows (2 MiB): rows are 3 KiB, and tiny test datasets stay small.
_PAGE_SIZE = 1 << 21
_WRITE_CHUNK_ROWS = 500


class CifarError(DmError, ValueError):
    """CIFAR-10 files that cannot be converted; ``problems`` lists every one with its fix."""

    def headline(self) -> str:
        return f"cannot convert CIFAR-10 ({len(self.problems)} problem(s))"


@dataclass(frozen=True)
class CifarSplit:
    """One split: ``images`` uint8 ``(n, 32, 32, 3)`` (height, width, RGB) and ``labels``
    int64 ``(n,)`` in 0..9, in the order of the source files."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------- reading
class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: a batch holds a dict, lists, bytes and one
    numpy array, so any other global a pickle names (code it would run) is refused."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes, as Python 3 pickles them with protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR-10 batch never does"
            )
        if module == "numpy.core.multiarray":  # the official files were pickled by numpy 1
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's _reconstruct, warning-free
        return super().find_class(module, name)


def _load_batch(path: Path, problems: list[str]) -> CifarSplit | None:
    """The images and labels of one batch file, or None with its problems appended."""
    try:
        with open(path, "rb") as f:
            raw = _BatchUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        problems.append(f"{path}: cannot read it ({exc.strerror})")
        return None
    except Exception as exc:  # any unpickling failure: truncated, not a pickle, foreign objects
        problems.append(
            f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); {_DOWNLOAD_HINT}"
        )
        return None
    if not isinstance(raw, dict):
        problems.append(f"{path}: holds a {type(raw).__name__}, not the dict of a CIFAR-10 batch")
        return None
    batch = {k.decode() if isinstance(k, bytes) else str(k): v for k, v in raw.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        problems.append(
            f"{path}: has no {' or '.join(repr(k) for k in missing)} entry (its keys are "
            f"{sorted(batch)}); {_DOWNLOAD_HINT}"
        )
        return None
    data = batch["data"]
    before = len(problems)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = (
            f"{data.dtype} array of shape {list(data.shape)}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        problems.append(f"{path}: 'data' is a {what}; a CIFAR-10 batch holds uint8 (n, 3072)")
    elif data.shape[1] != _PIXELS:
        problems.append(
            f"{path}: 'data' has shape {list(data.shape)}; CIFAR-10 images are 32 x 32 x 3 = "
            f"{_PIXELS} values per row (is this CIFAR-100 or another dataset?)"
        )
    try:
        labels = np.asarray(batch["labels"])
    except Exception:
        labels = np.zeros(0, dtype=object)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        problems.append(f"{path}: 'labels' must be a list of integers; got {labels.dtype} values")
    else:
        bad = (labels < 0) | (labels >= NUM_CLASSES)
        if bad.any():
            problems.append(
                f"{path}: {int(bad.sum())} label(s) outside 0..{NUM_CLASSES - 1} (e.g. "
                f"{int(labels[bad][0])})"
            )
        if isinstance(data, np.ndarray) and data.ndim == 2 and len(labels) != len(data):
            problems.append(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(problems) > before:
        return None
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return CifarSplit(images, labels.astype(np.int64))


def _check_layout(cifar_dir: Path) -> None:
    """Raise :class:`CifarError` when ``cifar_dir`` lacks any batch file, naming the likely
    mistake (the archive itself, its parent folder, the binary version)."""
    if not cifar_dir.exists():
        raise CifarError([f"--cifar-dir {cifar_dir} does not exist; {_DOWNLOAD_HINT}"])
    if cifar_dir.is_file():
        raise CifarError(
            [
                f"--cifar-dir {cifar_dir} is a file, not a folder; unpack the archive (tar xzf) "
                "and pass the cifar-10-batches-py folder"
            ]
        )
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if not (cifar_dir / n).is_file()]
    if not missing:
        return
    hint = _DOWNLOAD_HINT
    if (cifar_dir / "cifar-10-batches-py").is_dir():
        hint = f"pass {cifar_dir / 'cifar-10-batches-py'} instead"
    elif (cifar_dir / "data_batch_1.bin").exists():
        hint = f"this is the binary version; {_DOWNLOAD_HINT}"
    raise CifarError([f"{cifar_dir} has no file {', '.join(missing)}; {hint}"])


def read_cifar_python(cifar_dir: str | os.PathLike[str]) -> tuple[CifarSplit, CifarSplit]:
    """``(train, test)`` from the python batches in ``cifar_dir``: train is ``data_batch_1`` ..
    ``data_batch_5`` concatenated in order, test is ``test_batch``.

    Raises :class:`CifarError` listing every missing file, or every file that is not a CIFAR-10
    batch (not a pickle, other keys, wrong shapes or dtypes, labels outside 0..9).
    """
    cifar_dir = Path(cifar_dir).expanduser()
    _check_layout(cifar_dir)
    problems: list[str] = []
    train = [_load_batch(cifar_dir / name, problems) for name in TRAIN_FILES]
    test = _load_batch(cifar_dir / TEST_FILE, problems)
    if problems:
        raise CifarError(problems)
    parts = [b for b in train if b is not None]
    if test is None or len(parts) != len(TRAIN_FILES):  # unreachable: each None has a problem
        raise CifarError([f"{cifar_dir}: a batch could not be read"])
    joined = CifarSplit(
        np.concatenate([b.images for b in parts]), np.concatenate([b.labels for b in parts])
    )
    return joined, test


# ------------------------------------------------------------------------------- writing
class _SplitRows:
    """Row ``i`` as FFCV's writer asks for it: ``(image uint8 (32, 32, 3), label int)``."""

    def __init__(self, split: CifarSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.split.images[i], int(self.split.labels[i])


def verify_image_beton(path: str | os.PathLike[str], split: CifarSplit) -> None:
    """Raise :class:`CifarError` unless the dataset at ``path`` holds exactly ``split``: the
    fields ``image`` (raw RGB, 32 x 32) and ``label``, and every pixel and label equal. Reads
    the stored bytes directly (not through FFCV's decoders)."""
    from dm_assets.regression.ffcv_glue import ffcv_classes as _ffcv

    path = Path(path)
    reader = _ffcv().Reader(str(path))  # FFCV imported with torch's thread count kept
    kinds = {name: type(h).__name__ for name, h in reader.handlers.items()}
    if kinds != {IMAGE_FIELD: "RGBImageField", LABEL_FIELD: "IntField"}:
        raise CifarError([f"{path}: fields {kinds}; expected image (RGBImageField), label"])
    if int(reader.num_samples) != len(split):
        raise CifarError([f"{path}: {int(reader.num_samples)} rows, expected {len(split)}"])
    columns = reader.metadata.dtype.names
    meta_image = reader.metadata[columns[reader.field_names.index(IMAGE_FIELD)]]
    meta_label = reader.metadata[columns[reader.field_names.index(LABEL_FIELD)]]
    problems = []
    raw_mode = 1  # ffcv.fields.rgb_image.IMAGE_MODES["raw"]
    if (meta_image["mode"] != raw_mode).any():
        problems.append(f"{path}: some images are not stored raw (JPEG-compressed)")
    if (meta_image["height"] != 32).any() or (meta_image["width"] != 32).any():
        problems.append(f"{path}: some images are not 32 x 32")
    if not np.array_equal(meta_label, split.labels):
        problems.append(f"{path}: the labels differ from the source's")
    table = reader.alloc_table
    if len(table) < len(split) or int((table["ptr"] + table["size"]).max()) > path.stat().st_size:
        problems.append(f"{path}: the allocation table is incomplete (the write failed)")
    if problems:
        raise CifarError(problems)
    stored = np.memmap(path, dtype=np.uint8, mode="r")
    flat = split.images.reshape(len(split), -1)
    for i, ptr in enumerate(meta_image["data_ptr"].astype(np.int64)):
        if not np.array_equal(stored[ptr : ptr + _PIXELS], flat[i]):
            raise CifarError([f"{path}: image {i} differs from the source's"])


def write_image_beton(
    path: str | os.PathLike[str], split: CifarSplit, *, num_workers: int = 4
) -> Path:
    """Write ``split`` to ``path`` as an FFCV dataset (fields ``image``, raw RGB, and
    ``label``), atomically: under a temporary name, checked against ``split`` byte for byte,
    fsynced, then renamed over ``path``. ``num_workers`` writer processes. Returns ``path``."""
    from dm_assets.regression.ffcv_glue import ffcv_classes as _ffcv

    path = Path(path)
    needed = len(split) * (_PIXELS + 64) + 4 * _PAGE_SIZE
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise CifarError(
            [
                f"{path.parent} has {free / 2**20:.0f} MiB free; {path.name} needs about "
                f"{needed / 2**20:.0f} MiB"
            ]
        )
    ffcv = _ffcv()  # FFCV's classes, and a writer that fails instead of hanging
    from ffcv.fields import IntField, RGBImageField

    fields = {IMAGE_FIELD: RGBImageField(write_mode="raw"), LABEL_FIELD: IntField()}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        writer = ffcv.GuardedWriter(
            str(tmp), fields, page_size=_PAGE_SIZE, num_workers=max(1, num_workers)
        )
        writer.from_indexed_dataset(_SplitRows(split), chunksize=_WRITE_CHUNK_ROWS)
        verify_image_beton(tmp, split)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def convert(
    cifar_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, num_workers: int = 4
) -> dict[str, Path]:
    """Read the python batches in ``cifar_dir`` and write ``train.beton`` and ``val.beton`` to
    ``out_dir`` (created if needed). Returns ``{"train": path, "val": path}``.

    Raises :class:`CifarError` (nothing written) when the batches are missing or malformed.
    """
    started = time.perf_counter()
    train, test = read_cifar_python(cifar_dir)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, split, file in (("train", train, TRAIN_BETON), ("val", test, VAL_BETON)):
        written[name] = write_image_beton(out / file, split, num_workers=num_workers)
        counts = np.bincount(split.labels, minlength=NUM_CLASSES)
        logger.info("wrote %s: %d images, per class %s", written[name], len(split), counts.tolist())
    logger.info("converted in %.1f s", time.perf_counter() - started)
    return written


# ------------------------------------------------------------------------------- fake data
def make_fake_cifar(
    directory: str | os.PathLike[str], n_train: int, n_test: int, seed: int = 0
) -> Path:
    """Write CIFAR-10 python batches with ``n_train`` training and ``n_test`` test images to
    ``directory`` (created if needed), in the official files' format: ``data_batch_1`` ..
    ``data_batch_5`` (the training images split as evenly as possible), ``test_batch`` and
    ``batches.meta``. Returns ``directory``.

    Each image is its class's colour and coarse 4 x 4 pattern plus pixel noise, so a network
    can learn the labels through flips, shifts and cutout (labels cycle 0..9, then are shuffled);
    the same arguments give the same files.
    """
    if n_train < len(TRAIN_FILES) or n_test < 1:
        raise ValueError(
            f"n_train={n_train}, n_test={n_test}: need at least {len(TRAIN_FILES)} training "
            "images (one per batch file) and 1 test image"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.uniform(60, 196, size=(NUM_CLASSES, 1, 1, 3))
    coarse = rng.normal(0, 30, size=(NUM_CLASSES, 4, 4, 3))
    # each class's mean image, (classes, 32, 32, 3): its colour plus 8 x 8 blocks of pattern
    means = colours + np.kron(coarse, np.ones((1, 8, 8, 1)))

    def images_and_labels(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.permutation(np.arange(n) % NUM_CLASSES)
        images = means[labels] + rng.normal(0, 40, size=(n, *IMAGE_SHAPE))
        pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        # CIFAR's row layout: all red values, then green, then blue, each 32 rows of 32
        return pixels.transpose(0, 3, 1, 2).reshape(n, _PIXELS), [int(v) for v in labels]

    def dump(name: str, batch_label: str, n: int) -> None:
        data, labels = images_and_labels(n)
        content = {
            b"batch_label": batch_label.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"fake_{i:05d}.png".encode() for i in range(n)],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(content, f, protocol=2)

    for i, part in enumerate(np.array_split(np.arange(n_train), len(TRAIN_FILES))):
        dump(TRAIN_FILES[i], f"training batch {i + 1} of 5", len(part))
    dump(TEST_FILE, "testing batch 1 of 1", n_test)
    meta = {
        b"label_names": [n.encode() for n in CLASS_NAMES],
        b"num_cases_per_batch": n_train // len(TRAIN_FILES),
        b"num_vis": _PIXELS,
    }
    with open(directory / META_FILE, "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return directory


# ------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(
        "python -m dm_assets.examples.cifar10.convert",
        "Convert the CIFAR-10 python batches (data_batch_1..5, test_batch) to the FFCV "
        "datasets train.beton and val.beton of the CIFAR-10 example.",
    )
    parser.add_argument(
        "--cifar-dir", required=True, help="the unpacked cifar-10-batches-py folder"
    )
    parser.add_argument(
        "--out-dir", required=True, help="where train.beton and val.beton are written"
    )
    parser.add_argument(
        "--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="writer processes"
    )
    args = parser.parse_args(argv)
    configure_logging()
    try:
        written = convert(args.cifar_dir, args.out_dir, num_workers=args.num_workers)
    except CifarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "CifarError",
    "CifarSplit",
    "convert",
    "make_fake_cifar",
    "read_cifar_python",
    "verify_image_beton",
    "write_image_beton",
]
