"""ResNet-9 for CIFAR-10, in plain torch: the network of FFCV's CIFAR example and the seed's
``train_cifar.py`` (after KakaoBrain's torchskeleton and Page's DAWNBench entry).

Input: float images ``(batch, 3, 32, 32)``, normalized per channel. Output: float logits
``(batch, num_classes)``. The layers, with the feature maps after each::

    conv-bn-relu 3x3      3 ->  64   32 x 32
    conv-bn-relu 5x5/2   64 -> 128   16 x 16
    residual: 2 x conv-bn-relu 3x3 128 -> 128
    conv-bn-relu 3x3    128 -> 256   16 x 16
    max-pool 2                        8 x 8
    residual: 2 x conv-bn-relu 3x3 256 -> 256
    conv-bn-relu 3x3 (no padding) 256 -> 128   6 x 6
    global max-pool, linear 128 -> num_classes (no bias), times ``logit_scale``

The fixed ``logit_scale`` keeps the initial logits small, so the loss starts near log(10).
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_LOGIT_SCALE = 0.125
DEFAULT_WIDTH = 64


class Scale(nn.Module):
    """Multiplies its input by a fixed number."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class Residual(nn.Module):
    """``x + module(x)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.module(x)


def conv_bn(
    channels_in: int, channels_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1
) -> nn.Sequential:
    """Convolution (no bias: batch norm follows), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(
            channels_in,
            channels_out,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            bias=False,
        ),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


def resnet9(
    num_classes: int = 10, logit_scale: float = DEFAULT_LOGIT_SCALE, width: int = DEFAULT_WIDTH
) -> nn.Sequential:
    """A freshly initialized ResNet-9 (torch's default initialization, so its weights follow
    torch's global random state: seed it first for a reproducible model).

    ``width`` is the first layer's channels (64, as above); the others keep their ratios to it
    (128, 256, 128 for 64). A narrower network (8) trains about 60 times faster, for tests.
    """
    if width < 1:
        raise ValueError(f"width={width} must be a positive number of channels (64: ResNet-9)")
    w1, w2, w4 = width, 2 * width, 4 * width
    return nn.Sequential(
        conv_bn(3, w1, kernel_size=3, stride=1, padding=1),
        conv_bn(w1, w2, kernel_size=5, stride=2, padding=2),
        Residual(nn.Sequential(conv_bn(w2, w2), conv_bn(w2, w2))),
        conv_bn(w2, w4, kernel_size=3, stride=1, padding=1),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(conv_bn(w4, w4), conv_bn(w4, w4))),
        conv_bn(w4, w2, kernel_size=3, stride=1, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(w2, num_classes, bias=False),
        Scale(logit_scale),
    )
