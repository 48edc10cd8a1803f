"""The canonical per-sample, per-view augmentation parameters and their sampler.

Both backends (kornia reference and the fused Triton kernel) and ``replay`` consume exactly an
``AugmentParams``; nothing random happens after sampling. Sampling uses a caller's ``torch.Generator``
(kornia's own samplers use the global RNG), always draws the same number of values whatever the
probabilities, and so is reproducible for a seeded generator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import torch

from fastcl.augment.presets import Policy

_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params


@dataclasses.dataclass
class AugmentParams:
    """Per-sample, per-view parameters; every field has leading dims [B, V] (see docs/augment.md).

    Attributes: ``box`` int64 [B,V,4] crop (x0, y0, w, h) in input pixels; ``flip`` bool; ``jitter`` float32
    [B,V,4] factors (brightness, contrast, saturation, hue), identity (1, 1, 1, 0); ``jitter_apply`` bool;
    ``order`` int64 [B,V,4] permutation of the jitter steps (0 b, 1 c, 2 s, 3 h); ``gray`` bool;
    ``blur_sigma`` float32; ``blur_apply`` bool; ``solarize_threshold`` float32; ``solarize_apply`` bool.

    Example:
        >>> from fastcl.augment import resolve, sample_params
        >>> p = sample_params(resolve("simclr", 32, 1.0, {}), 2, 2, 40, 40, torch.Generator().manual_seed(0))
        >>> p.box.shape, p.jitter.shape
        (torch.Size([2, 2, 4]), torch.Size([2, 2, 4]))
    """

    box: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_apply: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur_sigma: torch.Tensor
    blur_apply: torch.Tensor
    solarize_threshold: torch.Tensor
    solarize_apply: torch.Tensor

    @property
    def batch(self) -> int:
        return self.box.shape[0]

    @property
    def views(self) -> int:
        return self.box.shape[1]

    def to(self, device: torch.device) -> "AugmentParams":
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def view(self, index: int) -> Dict[str, torch.Tensor]:
        """The parameters of view ``index`` as a dict of contiguous [B, ...] tensors."""
        return {f.name: getattr(self, f.name)[:, index].contiguous() for f in dataclasses.fields(self)}


def _sample_boxes(n: int, height: int, width: int, policy: Policy, rand) -> torch.Tensor:
    """torchvision's RandomResizedCrop draw, vectorized: first of 10 candidates that fits, else the fallback."""
    area = float(height * width)
    target_area = area * (policy.scale[0] + (policy.scale[1] - policy.scale[0]) * rand(n, _CROP_ATTEMPTS))
    log_r0, log_r1 = math.log(policy.ratio[0]), math.log(policy.ratio[1])
    aspect = torch.exp(log_r0 + (log_r1 - log_r0) * rand(n, _CROP_ATTEMPTS))
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first fitting candidate
    any_fits = fits.any(dim=1)
    # Fallback: the whole image, cut to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < policy.ratio[0]:
        fallback_w, fallback_h = width, round(width / policy.ratio[0])
    elif in_ratio > policy.ratio[1]:
        fallback_w, fallback_h = round(height * policy.ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    fallback_w, fallback_h = min(max(fallback_w, 1), width), min(max(fallback_h, 1), height)
    w = torch.where(any_fits, w.gather(1, first)[:, 0], fallback_w)
    h = torch.where(any_fits, h.gather(1, first)[:, 0], fallback_h)
    x0 = (rand(n) * (width - w + 1)).long().clamp(max=width - 1)
    y0 = (rand(n) * (height - h + 1)).long().clamp(max=height - 1)
    x0 = torch.minimum(x0, width - w)
    y0 = torch.minimum(y0, height - h)
    return torch.stack([x0, y0, w, h], dim=1)


def sample_params(
    policy: Policy,
    batch: int,
    views: int,
    height: int,
    width: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> AugmentParams:
    """Draws ``AugmentParams`` for a [batch, C, height, width] input (on the generator's device, then moved).

    Args:
        policy: a :class:`Policy` (from :func:`resolve`).
        batch, views, height, width: the input's batch size and side lengths, and the number of views.
        generator: the ``torch.Generator`` to draw from (None: torch's default).
        device: where the parameters go (None: the generator's device).

    Example:
        >>> from fastcl.augment.presets import resolve
        >>> p = sample_params(resolve("simclr", 32, 1.0, {}), 4, 2, 32, 32, torch.Generator().manual_seed(0))
        >>> tuple(p.box.shape), p.flip.dtype
        ((4, 2, 4), torch.bool)
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=gen_device)

    b, v = batch, views
    box = _sample_boxes(b * v, height, width, policy, rand).view(b, v, 4)
    flip = rand(b, v) < policy.flip_p
    mb, mc, ms, mh = policy.jitter
    low = torch.tensor([max(0.0, 1 - mb), max(0.0, 1 - mc), max(0.0, 1 - ms), -mh], device=gen_device)
    high = torch.tensor([1 + mb, 1 + mc, 1 + ms, mh], device=gen_device)
    jitter = low + (high - low) * rand(b, v, 4)
    jitter_apply = rand(b, v) < policy.jitter_p
    order_keys = rand(b, v, 4)
    if policy.random_order:
        order = order_keys.argsort(dim=-1)
    else:
        order = torch.arange(4, device=gen_device).expand(b, v, 4).clone()
    gray = rand(b, v) < policy.gray_p

    def per_view(probabilities) -> torch.Tensor:
        return torch.tensor([probabilities[i % len(probabilities)] for i in range(v)], device=gen_device)

    sigma_low, sigma_high = policy.blur_sigma
    blur_sigma = sigma_low + (sigma_high - sigma_low) * rand(b, v)
    blur_apply = rand(b, v) < per_view(policy.blur_p)
    solarize_threshold = torch.full((b, v), policy.solarize_threshold, device=gen_device)
    solarize_apply = rand(b, v) < per_view(policy.solarize_p)
    params = AugmentParams(
        box=box,
        flip=flip,
        jitter=jitter,
        jitter_apply=jitter_apply,
        order=order,
        gray=gray,
        blur_sigma=blur_sigma,
        blur_apply=blur_apply,
        solarize_threshold=solarize_threshold,
        solarize_apply=solarize_apply,
    )
    return params.to(device) if device is not None else params
