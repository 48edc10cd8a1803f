"""The Spirograph dataset of Foster, Pukdee & Rainforth (ICLR 2021), generated on the fly.

A sample is 4 targets (m, b, sigma, f_r) -- what a downstream linear probe regresses -- and 6 nuisances
(h, f_g, f_b, b_r, b_g, b_b), the "transformation": views of one sample share the targets and redraw the
nuisances. Rendering (``render_spirograph``) is a closed-form, differentiable function of all ten
parameters, evaluated on whichever device the parameters live on:

  x(t) = (m-h) cos t + h cos((m-h) t / b),   y(t) = (m-h) sin t - h sin((m-h) t / b),
  40 points t in [0, 2 pi] (endpoints included),
  i(u, v) = (1/40) sum_k exp(-((u-x_k)^2 + (v-y_k)^2) / sigma), divided by (max over the image + 1e-8),
  on a 32x32 grid over [-6, 6]^2 ('ij' indexing: u varies along rows),
  colour(u, v) = i * (f_r, f_g, f_b) + (1 - i) * (b_r, b_g, b_b).

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> targets = sample_uniform(TARGET_RANGES, 2, g)
>>> nuisances = sample_uniform(NUISANCE_RANGES, 2, g)
>>> render_spirograph(targets, nuisances).shape
torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import math

import torch

TARGET_RANGES: dict[str, tuple[float, float]] = {
    "m": (2.0, 5.0),
    "b": (0.1, 1.1),
    "sigma": (0.25, 1.0),
    "f_r": (0.4, 1.0),
}
NUISANCE_RANGES: dict[str, tuple[float, float]] = {
    "h": (0.5, 2.5),
    "f_g": (0.4, 1.0),
    "f_b": (0.4, 1.0),
    "b_r": (0.0, 0.6),
    "b_g": (0.0, 0.6),
    "b_b": (0.0, 0.6),
}


def sample_uniform(
    ranges: dict[str, tuple[float, float]], n: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[n, len(ranges)]`` float32, column j ~ U(ranges[j]); drawn with ``generator`` on its device."""
    low = torch.tensor([r[0] for r in ranges.values()])
    high = torch.tensor([r[1] for r in ranges.values()])
    u = torch.rand(n, len(ranges), generator=generator, device=generator.device)
    return (low.to(u.device) + (high - low).to(u.device) * u).to(device)


def render_spirograph(
    targets: torch.Tensor, nuisances: torch.Tensor, size: int = 32, points: int = 40, extent: float = 6.0
) -> torch.Tensor:
    """Render ``[B, 3, size, size]`` images in [0, 1] from targets ``[B, 4]`` and nuisances ``[B, 6]``."""
    if targets.ndim != 2 or targets.shape[1] != len(TARGET_RANGES):
        raise ValueError(f"targets must be [B, {len(TARGET_RANGES)}], got {tuple(targets.shape)}")
    if nuisances.shape != (targets.shape[0], len(NUISANCE_RANGES)):
        raise ValueError(
            f"nuisances must be [{targets.shape[0]}, {len(NUISANCE_RANGES)}], got {tuple(nuisances.shape)}"
        )
    m, b, sigma, f_r = (c[:, None] for c in targets.unbind(1))
    h, f_g, f_b, b_r, b_g, b_b = nuisances.unbind(1)
    t = torch.linspace(0, 2 * math.pi, points, device=targets.device, dtype=targets.dtype)
    k = m - h[:, None]
    x = k * torch.cos(t) + h[:, None] * torch.cos(k * t / b)  # [B, P]
    y = k * torch.sin(t) - h[:, None] * torch.sin(k * t / b)
    grid = torch.linspace(-extent, extent, size, device=targets.device, dtype=targets.dtype)
    u, v = torch.meshgrid(grid, grid, indexing="ij")
    dist2 = (u[None, :, :, None] - x[:, None, None, :]) ** 2 + (v[None, :, :, None] - y[:, None, None, :]) ** 2
    intensity = torch.exp(-dist2 / sigma[:, :, None, None]).mean(-1)  # [B, S, S]
    intensity = (intensity / (intensity.amax(dim=(1, 2), keepdim=True) + 1e-8))[:, None]
    foreground = torch.stack([f_r[:, 0], f_g, f_b], 1)[:, :, None, None]
    background = torch.stack([b_r, b_g, b_b], 1)[:, :, None, None]
    return intensity * foreground + (1 - intensity) * background


def unit_targets(targets: torch.Tensor) -> torch.Tensor:
    """Targets rescaled by their sampling ranges to [0, 1], so that per-target MSEs are comparable."""
    low = torch.tensor([r[0] for r in TARGET_RANGES.values()], device=targets.device)
    high = torch.tensor([r[1] for r in TARGET_RANGES.values()], device=targets.device)
    return (targets - low) / (high - low)
