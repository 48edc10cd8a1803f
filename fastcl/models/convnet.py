"""A small ConvNet for CPU runs (the demo, the tests): four 3x3 conv-BN-ReLU layers, three of them
stride 2, then global average pooling. ``dim`` (default 128) is the representation size.

``residual=True`` makes the last layer a ResNet basic block at the third layer's resolution (the third
layer widens to ``dim``; the block adds two 3x3 conv-BN layers to its input, then ReLU). DirectCLR
(Jing et al.) relies on such a skip path: a loss on the first d0 dimensions of h then still trains the
features that the other dimensions carry. Without it, h's dimensions past d0 come from last-layer
filters that receive no gradient.

>>> import torch
>>> ConvNet(dim=64)(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 64])
>>> ConvNet(dim=64, residual=True)(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 64])
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]


class _ResidualBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))), channels and resolution kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(channels, channels, 1), nn.ReLU(inplace=True), *_conv_bn(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ConvNet(nn.Module):
    def __init__(self, dim: int = 128, width: int = 32, in_channels: int = 3, residual: bool = False):
        super().__init__()
        channels = (in_channels, width, 2 * width, dim if residual else 4 * width, dim)
        layers: list[nn.Module] = []
        for i in range(3 if residual else 4):
            layers += [*_conv_bn(channels[i], channels[i + 1], 1 if i == 0 else 2), nn.ReLU(inplace=True)]
        if residual:
            layers.append(_ResidualBlock(dim))
        self.features = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
