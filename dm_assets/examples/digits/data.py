"""The digits split: 1,000 training images the masks range over, 797 target images.

The images are scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``:
1,797 grayscale 8x8 images of the digits 0-9, about 180 per class, shipped inside the package so
nothing is downloaded). A seeded permutation of the 1,797 puts its first 1,000 in the training
set and the remaining 797 in the target set; the same ``seed`` gives the same split on every
machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

NUM_IMAGES = 1797
NUM_TRAIN = 1000
NUM_TARGETS = NUM_IMAGES - NUM_TRAIN
NUM_CLASSES = 10
NUM_PIXELS = 64
_MAX_PIXEL = 16.0  # load_digits' pixels are counts 0..16 (of a 32x32 bitmap, 4x4 blocks)


@dataclass(frozen=True)
class DigitsSplit:
    """The training and target images and labels (every array read-only).

    - ``train_images`` float32 ``(1000, 64)``: row ``j`` is training example ``j`` (mask entry
      ``j``), the 8x8 image flattened row by row, scaled to [0, 1].
    - ``train_labels`` int64 ``(1000,)``: its digit, 0-9.
    - ``target_images`` float32 ``(797, 64)`` and ``target_labels`` int64 ``(797,)``: target
      ``t`` (column ``t`` of the margins), likewise.
    - ``train_ids`` and ``target_ids`` int64 ``(1000,)`` and ``(797,)``: each example's position
      in ``load_digits()``'s order, for looking the images up there.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    target_images: np.ndarray
    target_labels: np.ndarray
    train_ids: np.ndarray
    target_ids: np.ndarray


@functools.lru_cache(maxsize=4)
def load_split(seed: int = 0) -> DigitsSplit:
    """The split for ``seed`` (a permutation by ``np.random.default_rng(seed)``), read once per
    process and cached; the arrays are read-only because every caller shares them."""
    from sklearn.datasets import load_digits  # scikit-learn is slow to import; only when needed

    digits = load_digits()
    images = (np.asarray(digits.data, dtype=np.float32) / _MAX_PIXEL).astype(np.float32)
    labels = np.asarray(digits.target, dtype=np.int64)
    if images.shape != (NUM_IMAGES, NUM_PIXELS):
        raise RuntimeError(
            f"load_digits() returned images of shape {images.shape}, expected "
            f"{(NUM_IMAGES, NUM_PIXELS)}: this scikit-learn ships a different digits data set"
        )
    order = np.random.default_rng(seed).permutation(NUM_IMAGES)
    train_ids, target_ids = np.sort(order[:NUM_TRAIN]), np.sort(order[NUM_TRAIN:])
    arrays: dict[str, np.ndarray] = {
        "train_images": images[train_ids],
        "train_labels": labels[train_ids],
        "target_images": images[target_ids],
        "target_labels": labels[target_ids],
        "train_ids": train_ids.astype(np.int64),
        "target_ids": target_ids.astype(np.int64),
    }
    for array in arrays.values():
        array.setflags(write=False)
    return DigitsSplit(**arrays)
