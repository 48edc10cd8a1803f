"""A small ConvNet for CPU runs (the demo, the tests): four 3x3 conv-BN-ReLU layers, three of them
stride 2, then global average pooling. ``dim`` (default 128) is the representation size.

>>> import torch
>>> ConvNet(dim=64)(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 64])
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, dim: int = 128, width: int = 32, in_channels: int = 3):
        super().__init__()
        channels = (in_channels, width, 2 * width, 4 * width, dim)
        layers: list[nn.Module] = []
        for i in range(4):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(channels[i], channels[i + 1], 3, stride, 1, bias=False),
                nn.BatchNorm2d(channels[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
