"""CIFAR-10 image preparation on the training device, a whole batch at a time, in plain torch.

Images arrive as uint8 ``(batch, 32, 32, 3)`` (height, width, RGB, as FFCV decodes them) and
leave as float ``(batch, 3, 32, 32)`` normalized per channel (:func:`normalize`), in torch's
channels-last memory layout. The training augmentations act on normalized images, so the
value 0 they fill with is the dataset's mean colour (the seed fills with the mean before
normalizing): a random horizontal flip, a random translation by up to ``padding`` pixels, and
cutout, one ``size`` x ``size`` square set to 0. Each draws its randomness from ``generator``
(on the images' device), so a seeded generator repeats the same augmentations.
"""

from __future__ import annotations

import torch
from torch.nn import functional

# Per-channel mean and standard deviation of CIFAR-10's training images, on the 0..255 scale
# (the seed's constants).
CIFAR_MEAN = (125.307, 122.961, 113.8575)
CIFAR_STD = (51.5865, 50.847, 51.255)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(b, h, w, 3)`` images as ``dtype`` ``(b, 3, h, w)``, ``(x - mean) / std`` per
    channel, channels-last in memory."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device, dtype=torch.float32)
    std = torch.tensor(CIFAR_STD, device=images.device, dtype=torch.float32)
    out = (images.float() - mean) / std  # (b, h, w, 3)
    return out.permute(0, 3, 1, 2).to(dtype=dtype, memory_format=torch.channels_last)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``(b, c, h, w)`` mirrored left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_translate(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each image of ``(b, c, h, w)`` shifted by its own random ``(dy, dx)``, each uniform in
    ``-padding .. padding``, the uncovered border set to 0: a random ``h`` x ``w`` crop of the
    image padded with ``padding`` zeros on every side."""
    if padding == 0:
        return images
    b, _, h, w = images.shape
    padded = functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=images.device, generator=generator)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (b, h)
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (b, w)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # advanced indices around a slice: the result is (b, h, w, c)
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def cutout(
    images: torch.Tensor, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each image of ``(b, c, h, w)`` with one ``size`` x ``size`` square, at its own random
    position entirely inside the image, set to 0 in every channel."""
    if size == 0:
        return images
    b, _, h, w = images.shape
    top = torch.randint(0, h - size + 1, (b,), device=images.device, generator=generator)
    left = torch.randint(0, w - size + 1, (b,), device=images.device, generator=generator)
    r = torch.arange(h, device=images.device)
    c = torch.arange(w, device=images.device)
    in_rows = (r >= top[:, None]) & (r < top[:, None] + size)  # (b, h)
    in_cols = (c >= left[:, None]) & (c < left[:, None] + size)  # (b, w)
    square = in_rows[:, :, None] & in_cols[:, None, :]  # (b, h, w)
    return images.masked_fill(square[:, None], 0)


def augment(
    images: torch.Tensor,
    *,
    translate: int = 2,
    cutout_size: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The seed's training augmentations in its order: flip, translate, cutout."""
    images = random_flip(images, generator)
    images = random_translate(images, translate, generator)
    return cutout(images, cutout_size, generator)
