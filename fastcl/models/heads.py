"""Projection heads applied to the encoder's representation h.

- ``mlp``: Linear-BN-ReLU-Linear (SimCLR), hidden size = input size.
- ``linear``: one Linear layer.
- ``none``: identity (z = h).
- ``reweight``: the fixed, non-trainable head of Xue et al. (ICLR 2024):
  z = h * (1, kappa^-1, ..., kappa^-(d-1)); kappa > 1 weights later coordinates less.

>>> import torch
>>> head = ReweightHead(3, kappa=2.0)
>>> head(torch.ones(1, 3))
tensor([[1.0000, 0.5000, 0.2500]])
"""

from __future__ import annotations

import torch
from torch import nn

HEADS = ("mlp", "linear", "none", "reweight")


class ReweightHead(nn.Module):
    """z = h * kappa^(-i) for coordinate i; the weights are a buffer, so the optimizer never sees them."""

    def __init__(self, dim: int, kappa: float = 1.05):
        super().__init__()
        if not kappa > 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        self.kappa = kappa
        self.register_buffer("weights", torch.tensor(float(kappa)).pow(-torch.arange(dim, dtype=torch.float32)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weights.to(h.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.weights.numel()}, kappa={self.kappa}"


def build_head(kind: str, in_dim: int, out_dim: int = 128, kappa: float = 1.05) -> nn.Module:
    """Return the head ``kind`` mapping ``[B, in_dim]`` to ``[B, out_dim]`` (``in_dim`` for none/reweight)."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_dim, in_dim, bias=False),
            nn.BatchNorm1d(in_dim),
            nn.ReLU(inplace=True),
            nn.Linear(in_dim, out_dim),
        )
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "none":
        return nn.Identity()
    if kind == "reweight":
        return ReweightHead(in_dim, kappa)
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}")
