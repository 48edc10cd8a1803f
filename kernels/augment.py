"""Fused Triton augmentation: one launch writes one view from the sampled ``AugmentParams``.

Per output pixel, in one pass: bilinear resample from the integer crop box (half-pixel grid,
``align_corners=False``, PyTorch's ``interpolate`` rule), horizontal flip, colour jitter in the sample's
own step order (brightness, contrast, saturation, hue — HSV hue as kornia, or Foster's YIQ hue),
grayscale, solarize, normalize, cast to the output dtype. uint8 (÷255) or float input, any strides.

Contrast needs the mean gray level of the image *as it is when contrast runs* (after the steps before
it in that sample's order). A cheap pre-pass (one program per sample, no writes but B floats) computes
it by running the same resample and the preceding steps and reducing.

Gaussian blur is not fused (it needs neighbours of the colour-processed image): a view in which some
sample is blurred is written in [0, 1] without solarize/normalize, and the caller blurs, solarizes and
normalizes it with the reference functions (``fastcl.augment.pipeline.finish``).

Where it differs from the kornia path: float rounding only (summation order of the bilinear weights and
the contrast mean, fused multiply-adds); measured and tested tolerance in docs/augment.md.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import triton
import triton.language as tl

from fastcl.contract import RGB_TO_YIQ, YIQ_TO_RGB
from fastcl.kernels._common import LAUNCH_OPTIONS, CompileSpec

_TWO_PI = tl.constexpr(6.283185307179586)
# Forward / inverse YIQ matrices as compile-time constants (Triton cannot read Python globals otherwise).
_F00, _F01, _F02 = (tl.constexpr(v) for v in RGB_TO_YIQ[0])
_F10, _F11, _F12 = (tl.constexpr(v) for v in RGB_TO_YIQ[1])
_F20, _F21, _F22 = (tl.constexpr(v) for v in RGB_TO_YIQ[2])
_I00, _I01, _I02 = (tl.constexpr(v) for v in YIQ_TO_RGB[0])
_I10, _I11, _I12 = (tl.constexpr(v) for v in YIQ_TO_RGB[1])
_I20, _I21, _I22 = (tl.constexpr(v) for v in YIQ_TO_RGB[2])


@triton.jit
def _clamp01(v):
    return tl.minimum(tl.maximum(v, 0.0), 1.0)


@triton.jit
def _gray(r, g, b):
    return r * 0.299 + g * 0.587 + b * 0.114


@triton.jit
def _load_pixel(ptr, mask, IS_U8: tl.constexpr):
    v = tl.load(ptr, mask=mask, other=0).to(tl.float32)
    if IS_U8:
        v = v / 255.0
    return v


@triton.jit
def _bilinear(ptr, mask, dx, dy, lx, ly, IS_U8: tl.constexpr):
    v00 = _load_pixel(ptr, mask, IS_U8)
    v01 = _load_pixel(ptr + dx, mask, IS_U8)
    v10 = _load_pixel(ptr + dy, mask, IS_U8)
    v11 = _load_pixel(ptr + dy + dx, mask, IS_U8)
    top = v00 * (1.0 - lx) + v01 * lx
    bottom = v10 * (1.0 - lx) + v11 * lx
    return top * (1.0 - ly) + bottom * ly


@triton.jit
def _source_index(o, scale, extent):
    """PyTorch's linear source index (align_corners=False): index, next-index step (0/1) and weight."""
    src = tl.maximum((o.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), extent - 1)  # src >= 0, so truncation is floor
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    step = (i0 < extent - 1).to(tl.int32)
    return i0, step, lam


@triton.jit
def _resample(x_ptr, n, pix, mask, box_ptr, flip, S, sxb, sxc, sxh, sxw, C: tl.constexpr, IS_U8: tl.constexpr):
    x0 = tl.load(box_ptr + n * 4 + 0).to(tl.int32)
    y0 = tl.load(box_ptr + n * 4 + 1).to(tl.int32)
    w = tl.load(box_ptr + n * 4 + 2).to(tl.int32)
    h = tl.load(box_ptr + n * 4 + 3).to(tl.int32)
    oy = pix // S
    ox = pix % S
    ox = tl.where(flip != 0, S - 1 - ox, ox)
    ix, stepx, lx = _source_index(ox, w.to(tl.float32) / S, w)
    iy, stepy, ly = _source_index(oy, h.to(tl.float32) / S, h)
    base = (x_ptr + n.to(tl.int64) * sxb + (y0 + iy).to(tl.int64) * sxh + (x0 + ix).to(tl.int64) * sxw)
    dx = stepx.to(tl.int64) * sxw
    dy = stepy.to(tl.int64) * sxh
    r = _bilinear(base, mask, dx, dy, lx, ly, IS_U8)
    if C == 3:
        # Channel steps as pointer steps (no 2 × stride product in int32).
        g = _bilinear(base + sxc, mask, dx, dy, lx, ly, IS_U8)
        b = _bilinear(base + sxc + sxc, mask, dx, dy, lx, ly, IS_U8)
    else:
        g = r
        b = r
    return r, g, b


@triton.jit
def _hue_hsv(r, g, b, f):
    """kornia's rgb_to_hsv → hue + 2π·f (mod 2π) → hsv_to_rgb, per pixel."""
    mx = tl.maximum(tl.maximum(r, g), b)
    mn = tl.minimum(tl.minimum(r, g), b)
    delta = mx - mn
    v = mx
    s = delta / tl.where(mx == 0, 1.0, mx + 1e-8)
    dc = tl.where(delta == 0, 1.0, delta)
    rc = mx - r
    gc = mx - g
    bc = mx - b
    hue = tl.where((r >= g) & (r >= b), bc - gc, tl.where(g >= b, (rc - bc) + 2.0 * dc, (gc - rc) + 4.0 * dc))
    hue = hue / dc / 6.0
    hue = hue - tl.floor(hue)
    hue = hue * _TWO_PI
    hue = tl.where(hue >= _TWO_PI, 0.0, hue)
    hue = hue + f * _TWO_PI
    hue = hue - tl.floor(hue / _TWO_PI) * _TWO_PI
    hue = tl.where(hue >= _TWO_PI, 0.0, hue)
    h6 = (hue / _TWO_PI) * 6.0
    sector = tl.floor(h6)
    sector = sector - tl.floor(sector / 6.0) * 6.0
    frac = (h6 - tl.floor(h6 / 6.0) * 6.0) - sector
    p = v * (1.0 - s)
    q = v * (1.0 - frac * s)
    t = v * (1.0 - (1.0 - frac) * s)
    hi = tl.minimum(tl.maximum(sector, 0.0), 5.0).to(tl.int32)
    r = tl.where(hi == 0, v, tl.where(hi == 1, q, tl.where(hi == 2, p, tl.where(hi == 3, p, tl.where(hi == 4, t, v)))))
    g = tl.where(hi == 0, t, tl.where(hi == 1, v, tl.where(hi == 2, v, tl.where(hi == 3, q, tl.where(hi == 4, p, p)))))
    b = tl.where(hi == 0, p, tl.where(hi == 1, p, tl.where(hi == 2, t, tl.where(hi == 3, v, tl.where(hi == 4, v, q)))))
    return r, g, b


@triton.jit
def _hue_yiq(r, g, b, f):
    """Foster et al.'s hue: rotate (I, Q) by 2π·f; no clamp."""
    angle = f * _TWO_PI
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    # tensor * constexpr (not constexpr * tensor, which stays a constexpr wrapper under the interpreter)
    y = r * _F00 + g * _F01 + b * _F02
    i = r * _F10 + g * _F11 + b * _F12
    q = r * _F20 + g * _F21 + b * _F22
    i2 = i * cos - q * sin
    q2 = i * sin + q * cos
    return (y * _I00 + i2 * _I01 + q2 * _I02, y * _I10 + i2 * _I11 + q2 * _I12, y * _I20 + i2 * _I21 + q2 * _I22)


@triton.jit
def _colour_step(op, f, r, g, b, mean, C: tl.constexpr, HUE_YIQ: tl.constexpr):
    """Step ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with factor f; kornia's formulas."""
    if op == 0:
        r = _clamp01(r * f)
        g = _clamp01(g * f)
        b = _clamp01(b * f)
    elif op == 1:
        r = _clamp01(r * f + mean * (1.0 - f))
        g = _clamp01(g * f + mean * (1.0 - f))
        b = _clamp01(b * f + mean * (1.0 - f))
    elif op == 2:
        if C == 3:
            gray = _gray(r, g, b)
            r = _clamp01((1.0 - f) * gray + f * r)
            g = _clamp01((1.0 - f) * gray + f * g)
            b = _clamp01((1.0 - f) * gray + f * b)
    else:
        if C == 3:
            if HUE_YIQ:
                r, g, b = _hue_yiq(r, g, b, f)
            else:
                r, g, b = _hue_hsv(r, g, b, f)
    return r, g, b


@triton.jit
def _contrast_mean_kernel(
    x_ptr, mean_ptr, box_ptr, flip_ptr, jitter_ptr, order_ptr, contrast_pos_ptr,
    S, sxb, sxc, sxh, sxw,
    C: tl.constexpr, IS_U8: tl.constexpr, HUE_YIQ: tl.constexpr, BLOCK: tl.constexpr,
):
    """mean_ptr[n] = mean gray level of sample n after the jitter steps that precede contrast."""
    n = tl.program_id(0)
    contrast_pos = tl.load(contrast_pos_ptr + n)
    flip = tl.load(flip_ptr + n)  # irrelevant to the mean; loaded so both kernels share _resample's types
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, S * S, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        mask = pix < S * S
        r, g, b = _resample(x_ptr, n, pix, mask, box_ptr, flip, S, sxb, sxc, sxh, sxw, C, IS_U8)
        for k in tl.static_range(4):
            if k < contrast_pos:
                op = tl.load(order_ptr + n * 4 + k)
                f = tl.load(jitter_ptr + n * 4 + op)
                r, g, b = _colour_step(op, f, r, g, b, 0.0, C, HUE_YIQ)
        if C == 3:
            level = _gray(r, g, b)
        else:
            level = r
        acc += tl.where(mask, level, 0.0)
    tl.store(mean_ptr + n, tl.sum(acc, axis=0) / (S * S))


@triton.jit
def _augment_view_kernel(
    x_ptr, out_ptr, box_ptr, flip_ptr, jitter_ptr, jitter_apply_ptr, order_ptr, gray_ptr,
    solarize_threshold_ptr, solarize_apply_ptr, contrast_mean_ptr,
    mean0, mean1, mean2, std0, std1, std2,
    S, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    C: tl.constexpr, IS_U8: tl.constexpr, HUE_YIQ: tl.constexpr, SOLARIZE_NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < S * S
    flip = tl.load(flip_ptr + n)
    r, g, b = _resample(x_ptr, n, pix, mask, box_ptr, flip, S, sxb, sxc, sxh, sxw, C, IS_U8)
    if tl.load(jitter_apply_ptr + n) != 0:
        contrast_mean = tl.load(contrast_mean_ptr + n)
        for k in tl.static_range(4):
            op = tl.load(order_ptr + n * 4 + k)
            f = tl.load(jitter_ptr + n * 4 + op)
            r, g, b = _colour_step(op, f, r, g, b, contrast_mean, C, HUE_YIQ)
    if C == 3:
        if tl.load(gray_ptr + n) != 0:
            level = _gray(r, g, b)
            r = level
            g = level
            b = level
    if SOLARIZE_NORMALIZE:
        if tl.load(solarize_apply_ptr + n) != 0:
            threshold = tl.load(solarize_threshold_ptr + n)
            r = tl.where(r >= threshold, 1.0 - r, r)
            g = tl.where(g >= threshold, 1.0 - g, g)
            b = tl.where(b >= threshold, 1.0 - b, b)
        r = (r - mean0) / std0
        g = (g - mean1) / std1
        b = (b - mean2) / std2
    oy = pix // S
    ox = pix % S
    out = out_ptr + n.to(tl.int64) * sob + oy.to(tl.int64) * soh + ox.to(tl.int64) * sow
    tl.store(out, r.to(out_ptr.dtype.element_ty), mask=mask)
    if C == 3:
        tl.store(out + soc, g.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + soc + soc, b.to(out_ptr.dtype.element_ty), mask=mask)


def augment_view(
    x: torch.Tensor,
    params: Dict[str, torch.Tensor],
    out: torch.Tensor,
    *,
    hue_mode: str,
    mean: Sequence[float],
    std: Sequence[float],
    solarize_normalize: bool,
) -> torch.Tensor:
    """Writes one view of ``x`` [B, C, H, W] into ``out`` [B, C, S, S] (any strides, float32/bf16/fp16).

    ``params`` is one view of ``AugmentParams`` (``AugmentParams.view(v)``), on ``x``'s device. With
    ``solarize_normalize=False`` the view is written in [0, 1] before solarize and normalize (for blur).
    ``mean``/``std`` hold C values.
    """
    batch, channels = x.shape[:2]
    size = out.shape[-1]
    order = params["order"]
    contrast_pos = (order == 1).to(torch.int32).argmax(dim=-1).to(torch.int32)
    flags = {name: params[name].to(torch.int8) for name in ("flip", "jitter_apply", "gray", "solarize_apply")}
    block = min(1024, triton.next_power_of_2(size * size))
    common = dict(C=channels, IS_U8=x.dtype == torch.uint8, HUE_YIQ=hue_mode == "yiq", **LAUNCH_OPTIONS)
    contrast_mean = torch.empty(batch, dtype=torch.float32, device=x.device)
    box = params["box"]
    jitter = params["jitter"].to(torch.float32)
    _contrast_mean_kernel[(batch,)](
        x, contrast_mean, box, flags["flip"], jitter, order, contrast_pos, size, *x.stride(), BLOCK=block, **common)
    mean3 = [float(m) for m in mean] * (3 // len(mean))
    std3 = [float(s) for s in std] * (3 // len(std))
    grid = (batch, triton.cdiv(size * size, block))
    _augment_view_kernel[grid](
        x, out, box, flags["flip"], jitter, flags["jitter_apply"], order, flags["gray"],
        params["solarize_threshold"].to(torch.float32), flags["solarize_apply"], contrast_mean,
        *mean3, *std3, size, *x.stride(), *out.stride(),
        SOLARIZE_NORMALIZE=solarize_normalize, BLOCK=block, **common)
    return out


def auxiliary_specs(dtype: torch.dtype, sub_dim: int = 0, layout: str = "contiguous", batch: int = 256,
                    height: int = 256, size: int = 224) -> list[CompileSpec]:
    """Both kernels as :func:`augment_view` launches them: a uint8 [batch, 3, height, height] batch in ``layout``
    ("transposed": channels-last, "strided": every other column of a wider image) into a [batch, 3, size, size]
    view of ``dtype`` (``sub_dim`` is not used)."""
    x = torch.empty(batch, 3, height, height * (2 if layout == "strided" else 1), dtype=torch.uint8)
    x = x[..., ::2] if layout == "strided" else x
    x = x.contiguous(memory_format=torch.channels_last) if layout == "transposed" else x
    out = torch.empty(batch, 3, size, size, dtype=dtype)
    box, order = torch.empty(batch, 4, dtype=torch.int64), torch.empty(batch, 4, dtype=torch.int64)
    flags, factors = torch.empty(batch, dtype=torch.int8), torch.empty(batch, 4, dtype=torch.float32)
    vector = torch.empty(batch, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(size * size))
    meta = dict(C=3, IS_U8=True, HUE_YIQ=False, BLOCK=block)
    return [
        CompileSpec("augment_contrast_mean", "launch", _contrast_mean_kernel,
                    (x, vector, box, flags, factors, order, torch.empty(batch, dtype=torch.int32), size,
                     *x.stride()), meta),
        CompileSpec("augment_view", "launch", _augment_view_kernel,
                    (x, out, box, flags, factors, flags, order, flags, vector, flags, vector, *([0.5] * 6), size,
                     *x.stride(), *out.stride()), dict(meta, SOLARIZE_NORMALIZE=True)),
    ]
