"""``MultiViewAugment``: sample ``AugmentParams`` once, render every view with the kornia or Triton backend."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
from kornia.enhance import solarize
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import crop_by_indices, hflip

from fastcl import dispatch
from fastcl.augment.colour import colour_steps, grayscale
from fastcl.augment.params import AugmentParams, sample_params
from fastcl.augment.presets import Policy, resolve

BACKENDS = ("kornia", "triton")
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 0-255 → float32 0-1; float → float32."""
    return x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)


def _per_sample_mask(flag: torch.Tensor) -> torch.Tensor:
    return flag[:, None, None, None]


def _standardize(x: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
    shape = (-1, 1, 1)
    return (x - torch.tensor(mean, device=x.device, dtype=x.dtype).view(shape)) / torch.tensor(
        std, device=x.device, dtype=x.dtype
    ).view(shape)


def _box_corners(box: torch.Tensor) -> torch.Tensor:
    """(x0, y0, w, h) → kornia's [B, 4, 2] inclusive corners (TL, TR, BR, BL) in (x, y)."""
    x0, y0, w, h = box.unbind(-1)
    x1, y1 = x0 + w - 1, y0 + h - 1
    return torch.stack(
        [torch.stack([x0, y0], -1), torch.stack([x1, y0], -1), torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)],
        dim=1,
    )


def jitter(
    img: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor, hue_mode: str
) -> torch.Tensor:
    """Colour jitter with per-sample factors and per-sample step order (reference path).

    Step k of every sample runs on the group of samples whose k-th step is the same op. With one
    channel only brightness and contrast apply (saturation, hue need colour).
    """
    selected = apply.nonzero()[:, 0]
    if selected.numel() == 0:
        return img
    steps = colour_steps(hue_mode)[: 4 if img.shape[1] == 3 else 2]
    sub, sub_factors, sub_order = img[selected], factors[selected], order[selected]
    for position in range(4):
        for op, step in enumerate(steps):
            group = (sub_order[:, position] == op).nonzero()[:, 0]
            if group.numel():
                sub[group] = step(sub[group], sub_factors[group, op])
    img = img.clone()
    img[selected] = sub
    return img


def render_kornia(x: torch.Tensor, view: Dict[str, torch.Tensor], policy: Policy, size: int) -> torch.Tensor:
    """Crop-resize, flip, jitter and grayscale of one view with kornia ops; [B, C, size, size] in [0, 1]."""
    img = crop_by_indices(
        to_unit(x), _box_corners(view["box"]), (size, size), interpolation="bilinear", align_corners=False
    )
    img = torch.where(_per_sample_mask(view["flip"]), hflip(img), img)
    img = jitter(img, view["jitter"], view["order"], view["jitter_apply"], policy.hue_mode)
    if img.shape[1] == 3:
        img = torch.where(_per_sample_mask(view["gray"]), grayscale(img), img)
    return img


def finish(img: torch.Tensor, view: Dict[str, torch.Tensor], policy: Policy) -> torch.Tensor:
    """Gaussian blur (reflect border, σ in output pixels) and solarize of one view, both backends."""
    blurred = view["blur_apply"].nonzero()[:, 0]
    if blurred.numel() and policy.blur_kernel > 1:
        sigma = view["blur_sigma"][blurred, None].expand(-1, 2).to(img.dtype)
        img = img.clone()
        img[blurred] = gaussian_blur2d(img[blurred], policy.blur_kernel, sigma, border_type="reflect")
    solarized = solarize(img, view["solarize_threshold"].to(img.dtype))
    return torch.where(_per_sample_mask(view["solarize_apply"]), solarized, img)


class MultiViewAugment:
    """Per-sample random multi-view augmentation with returned, replayable parameters.

    See docs/augment.md for the presets, the strength mapping and the parameter fields.

    Args:
        preset: ``"simclr"``, ``"supcon"``, ``"byol"`` or ``"colour"``.
        size: output side in pixels (int ≥ 1).
        views: number of views V ≥ 1.
        strength: s ≥ 0, scales the whole policy; 0 is the identity up to the resize.
        backend: ``"kornia"``, ``"triton"`` or ``"auto"`` (triton for CUDA tensors when importable).
        generator: the ``torch.Generator`` the parameters are drawn from (None: torch's default).
        output_dtype: dtype of the returned views.
        **overrides: any field of :class:`Policy` (e.g. ``jitter_p=0.0``).

    Raises:
        ValueError: a bad size, views, strength, preset or override, naming it.
        RuntimeError: ``backend="triton"`` where it cannot run.

    Example:
        >>> x = torch.randint(0, 256, (4, 3, 40, 36), dtype=torch.uint8)
        >>> aug = MultiViewAugment("simclr", size=32, views=2, generator=torch.Generator().manual_seed(0))
        >>> views, params = aug(x, return_params=True)
        >>> views.shape
        torch.Size([4, 2, 3, 32, 32])
        >>> torch.equal(aug.replay(x, params), views)
        True
    """

    def __init__(
        self,
        preset: str = "simclr",
        size: int = 32,
        views: int = 2,
        strength: float = 1.0,
        backend: str = "auto",
        generator: Optional[torch.Generator] = None,
        output_dtype: torch.dtype = torch.float32,
        **overrides: Any,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected an int >= 1 (output side in pixels), got {size!r}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views: expected an int >= 1, got {views!r}")
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not (math.isfinite(strength) and strength >= 0)
        ):
            raise ValueError(f"strength: expected a finite number >= 0, got {strength!r}")
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"backend: expected one of {list(BACKENDS + ('auto',))}, got {backend!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype: expected one of {list(OUTPUT_DTYPES)}, got {output_dtype!r}")
        self.preset, self.size, self.views, self.strength = preset, size, views, float(strength)
        self.backend, self.generator, self.output_dtype = backend, generator, output_dtype
        self.policy = resolve(preset, size, float(strength), overrides)

    def __repr__(self) -> str:
        return (
            f"MultiViewAugment(preset={self.preset!r}, size={self.size}, views={self.views}, "
            f"strength={self.strength}, backend={self.backend!r})"
        )

    def __call__(
        self, x: torch.Tensor, return_params: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, AugmentParams]]:
        self._check_input(x)
        params = sample_params(self.policy, x.shape[0], self.views, x.shape[2], x.shape[3], self.generator, x.device)
        views = self._render(x, params)
        return (views, params) if return_params else views

    def replay(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The views of ``x`` under ``params`` (bit-identical to the call that returned them)."""
        self._check_input(x)
        if not isinstance(params, AugmentParams):
            raise TypeError(f"params: expected AugmentParams, got {type(params).__name__}")
        if params.batch != x.shape[0]:
            raise ValueError(f"params: expected batch {x.shape[0]} (as x), got {params.batch}")
        box = params.box
        inside = (
            (box[..., :2] >= 0).all()
            and (box[..., 2:] >= 1).all()
            and (box[..., 0] + box[..., 2] <= x.shape[3]).all()
            and (box[..., 1] + box[..., 3] <= x.shape[2]).all()
        )
        if not bool(inside):
            raise ValueError(f"params: crop boxes must lie inside x's {x.shape[2]}x{x.shape[3]} image")
        return self._render(x, params.to(x.device))

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """(x01 − mean) / std per channel with the preset's statistics (also when ``normalize=False``).

        ``x01`` is [..., C, H, W] in [0, 1]; e.g. the output of ``colour`` in Foster's gradient penalty.
        """
        return _standardize(x01, *self._channel_stats(x01.shape[-3]))

    def _channel_stats(self, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        def fit(values: Tuple[float, ...]) -> Tuple[float, ...]:
            if len(values) == channels:
                return values
            return (sum(values) / len(values),) * channels  # 3 stats for 1 channel: their average

        return fit(self.policy.mean), fit(self.policy.std)

    def _output_stats(self, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        if not self.policy.normalize:
            return (0.0,) * channels, (1.0,) * channels
        return self._channel_stats(channels)

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D tensor [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"x: expected C = 1 or 3 channels (dim 1), got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"x: expected a non-empty batch and image, got shape {tuple(x.shape)}")
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise TypeError(f"x: expected uint8 (0-255) or a floating dtype (0-1), got {x.dtype}")

    def resolved_backend(self, device: torch.device) -> str:
        """The backend that renders tensors on ``device`` ("auto": triton on CUDA when importable)."""
        if self.backend == "kornia":
            return "kornia"
        reason = dispatch.unavailable_reason("triton", device)
        if self.backend == "auto":
            return "triton" if device.type == "cuda" and reason is None else "kornia"
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}. Use backend='kornia' or 'auto'.")
        return "triton"

    def _render(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        backend = self.resolved_backend(x.device)
        batch, channels, size = x.shape[0], x.shape[1], self.size
        mean, std = self._output_stats(channels)
        out = torch.empty(batch, params.views, channels, size, size, dtype=self.output_dtype, device=x.device)
        for index in range(params.views):
            view = params.view(index)
            if backend == "kornia":
                img = finish(render_kornia(x, view, self.policy, size), view, self.policy)
                out[:, index] = _standardize(img, mean, std)
                continue
            from fastcl.kernels.augment import augment_view

            if bool(view["blur_apply"].any()) and self.policy.blur_kernel > 1:
                unit = torch.empty(batch, channels, size, size, dtype=torch.float32, device=x.device)
                augment_view(x, view, unit, hue_mode=self.policy.hue_mode, mean=mean, std=std, solarize_normalize=False)
                out[:, index] = _standardize(finish(unit, view, self.policy), mean, std)
            else:
                augment_view(
                    x, view, out[:, index], hue_mode=self.policy.hue_mode, mean=mean, std=std, solarize_normalize=True
                )
        return out
