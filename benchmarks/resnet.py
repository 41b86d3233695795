"""A ResNet-18 for 32x32 images (CIFAR layout), defined here because torchvision may be missing.

Symbols: w the stem width (64 gives the standard 11.17 M parameters), C classes.

Layout of He et al. (2016), adapted to small images as is usual for CIFAR: a 3x3 stem without max
pooling, four stages of two basic blocks with widths ``w, 2w, 4w, 8w`` and strides ``1, 2, 2, 2``,
global average pooling and a linear classifier. Batch normalization everywhere; the benchmarks use
the network in eval mode (running statistics), the Hessian every tool here computes by default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch normalization and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18(num_classes: int = 10, width: int = 64) -> nn.Sequential:
    """ResNet-18 for ``[n, 3, H, W]`` images; ``width=64`` has 11,173,962 parameters for 10 classes."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage, stride in enumerate((1, 2, 2, 2)):
        out = width * 2**stage
        layers += [BasicBlock(channels, out, stride), BasicBlock(out, out, 1)]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
