"""Encoders and heads for the reference trainer.

>>> import torch
>>> model = ContrastiveModel(build_encoder("convnet"), "mlp", proj_dim=32)
>>> h, z = model(torch.zeros(4, 3, 32, 32))
>>> tuple(h.shape), tuple(z.shape)
((4, 128), (4, 32))
"""

from __future__ import annotations

import torch
from torch import nn

from .convnet import ConvNet
from .heads import HEADS, ReweightHead, build_head
from .resnet import CifarResNet, resnet18, resnet50

ENCODERS = ("resnet18", "resnet50", "convnet")


def build_encoder(name: str, in_channels: int = 3) -> nn.Module:
    """An encoder with attribute ``dim`` (representation size) mapping ``[B, C, 32, 32]`` to ``[B, dim]``."""
    if name == "resnet18":
        return resnet18(in_channels)
    if name == "resnet50":
        return resnet50(in_channels)
    if name == "convnet":
        return ConvNet(in_channels=in_channels)
    raise ValueError(f"encoder must be one of {ENCODERS}, got {name!r}")


class ContrastiveModel(nn.Module):
    """Encoder + head; ``forward(x)`` returns ``(h, z)``: representation and projection."""

    def __init__(self, encoder: nn.Module, head: str = "mlp", proj_dim: int = 128, kappa: float = 1.05):
        super().__init__()
        self.encoder = encoder
        self.head = build_head(head, encoder.dim, proj_dim, kappa)
        self.dim = encoder.dim
        self.proj_dim = proj_dim if head in ("mlp", "linear") else encoder.dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.head(h)


__all__ = [
    "ENCODERS",
    "HEADS",
    "CifarResNet",
    "ContrastiveModel",
    "ConvNet",
    "ReweightHead",
    "build_encoder",
    "build_head",
    "resnet18",
    "resnet50",
]
