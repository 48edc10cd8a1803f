"""Differentiable colour distortion of Foster et al. 2021 (https://arxiv.org/abs/2010.09515), and the
per-step colour ops.

Brightness, contrast and saturation are kornia's torchvision-compatible functions (``x·b``;
``x·c + mean(gray(x))·(1−c)``; ``x·s + gray(x)·(1−s)``; each clamped to [0, 1]), which are exactly
Foster's formulas. Foster's hue is a rotation by 2π·h of the chroma plane of YIQ space (no clamp),
implemented here; the jitter presets use kornia's HSV hue instead (``hue_mode="hsv"``).

All of it is plain autograd: gradients flow to the image and to the factors, double backward included.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)

from fastcl.contract import RGB_TO_YIQ, YIQ_TO_RGB


def _per_sample(factor: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return factor.to(image.dtype).reshape(-1, 1, 1)


def hue_yiq(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the (I, Q) chroma of ``image`` [B, 3, H, W] by 2π·factor[b] radians (Foster's hue; no clamp)."""
    angle = _per_sample(factor, image) * (2.0 * math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    r, g, b = image.unbind(dim=-3)
    y, i, q = (m[0] * r + m[1] * g + m[2] * b for m in RGB_TO_YIQ)
    i, q = i * cos - q * sin, i * sin + q * cos
    return torch.stack([m[0] * y + m[1] * i + m[2] * q for m in YIQ_TO_RGB], dim=-3)


def hue_hsv(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """kornia/torchvision hue: shift the HSV hue by factor[b] turns (factor in [-0.5, 0.5])."""
    return adjust_hue(image, factor * (2.0 * math.pi))


def brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return adjust_brightness_accumulative(image, factor)


def contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return adjust_contrast_with_mean_subtraction(image, factor)


def saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return adjust_saturation_with_gray_subtraction(image, factor)


ColourStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def colour_steps(hue_mode: str) -> Sequence[ColourStep]:
    """The four steps indexed as in ``AugmentParams.order``: brightness, contrast, saturation, hue."""
    return (brightness, contrast, saturation, hue_yiq if hue_mode == "yiq" else hue_hsv)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """0.299 R + 0.587 G + 0.114 B, repeated on 3 channels (kornia's ``rgb_to_grayscale``)."""
    return rgb_to_grayscale(image).expand_as(image)


def colour(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Foster et al.'s colour distortion with per-sample factors, differentiable in ``x`` and ``factors``.

    Args:
        x: float images [B, 3, H, W] with values in [0, 1] (not normalized).
        factors: [B, 4] (brightness, contrast, saturation, hue); identity is (1, 1, 1, 0). May require grad.

    Order brightness → contrast → saturation → hue; each of the first three is clamped to [0, 1], the
    YIQ hue rotation is not clamped (as in Foster et al.'s code).

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> alpha = torch.tensor([[1.2, 0.8, 1.1, 0.05], [1.0, 1.0, 1.0, 0.0]], requires_grad=True)
        >>> y = colour(x, alpha)
        >>> torch.allclose(y[1], x[1], atol=1e-5)
        True
        >>> (g,) = torch.autograd.grad(y.sum(), alpha, create_graph=True)
        >>> g.shape
        torch.Size([2, 4])
    """
    if not isinstance(x, torch.Tensor) or not isinstance(factors, torch.Tensor):
        raise TypeError(f"colour: expected tensors x and factors, got {type(x).__name__} and {type(factors).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor with values in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected shape [B, 3, H, W], got {tuple(x.shape)}")
    if factors.dim() != 2 or tuple(factors.shape) != (x.shape[0], 4):
        raise ValueError(
            f"factors: expected shape ({x.shape[0]}, 4) (brightness, contrast, saturation, hue), "
            f"got {tuple(factors.shape)}"
        )
    out = x
    for index, step in enumerate(colour_steps("yiq")):
        out = step(out, factors[:, index])
    return out


def sample_colour_factors(
    batch: int,
    strength: float = 0.5,
    *,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Foster et al.'s factor distribution: b, c, s ~ U[1 − 0.8·strength, 1 + 0.8·strength],
    h ~ U[−0.2·strength, 0.2·strength].

    Args:
        batch: number of factor rows.
        strength: the jitter strength s (Foster et al. use 0.5).
        generator: the ``torch.Generator`` to draw from (None: torch's default).
        device: where the result goes (None: the generator's device).

    Returns a float32 [batch, 4] tensor (drawn on the generator's device, then moved to ``device``).

    Example:
        >>> f = sample_colour_factors(1000, 0.5, generator=torch.Generator().manual_seed(0))
        >>> bool((f[:, :3] >= 0.6).all() and (f[:, :3] <= 1.4).all() and (f[:, 3].abs() <= 0.1).all())
        True
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
    if not (isinstance(strength, (int, float)) and 0 <= strength <= 1.25):
        raise ValueError(f"strength: expected a number in [0, 1.25] (factors stay >= 0), got {strength!r}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch, 4, generator=generator, device=gen_device) * 2 - 1
    half_width = torch.tensor([0.8, 0.8, 0.8, 0.2], device=gen_device) * strength
    centre = torch.tensor([1.0, 1.0, 1.0, 0.0], device=gen_device)
    factors = centre + u * half_width
    return factors.to(device) if device is not None else factors
