"""Augmentation presets (values at strength s = 1) and the strength mapping.

The mapping of the one strength knob s ≥ 0 onto every op (Cosentino et al. 2022, https://arxiv.org/abs/2205.06926):

| op | at s | s = 0 | s = 1 |
|---|---|---|---|
| crop scale (lo, hi) | (lo^s, hi^s) | (1, 1) | preset |
| crop ratio (r0, r1) | (r0^s, r1^s) | (1, 1) | preset |
| flip p | p · min(s, 1) | 0 | preset |
| jitter (b, c, sat, h) | (b·s, c·s, sat·s, min(h·s, 0.5)) | 0 | preset |
| jitter / gray / blur / solarize p | min(1, p · s) | 0 | preset |
| blur σ range (σ0, σ1) | (σ0, σ0 + (σ1 − σ0)·s) | (σ0, σ0) | preset |
| solarize threshold | unchanged | | |
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Tuple

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclasses.dataclass(frozen=True)
class Policy:
    """One augmentation policy (a preset after overrides and the strength mapping).

    Attributes:
        Every field is one knob of the pipeline (crop ``scale``/``ratio``, ``flip_p``, jitter magnitudes and
        probabilities, ``gray_p``, blur and solarize settings); docs/augment.md has the table.

    Example:
        >>> resolve("simclr", 32, 1.0, {}).flip_p
        0.5
    """

    scale: Tuple[float, float]
    ratio: Tuple[float, float]
    flip_p: float
    jitter: Tuple[float, float, float, float]  # magnitudes (brightness, contrast, saturation, hue)
    jitter_p: float
    gray_p: float
    blur_p: Tuple[float, ...]  # one per view, cycled over the views
    blur_sigma: Tuple[float, float]
    blur_kernel: int
    solarize_p: Tuple[float, ...]  # one per view, cycled
    solarize_threshold: float
    hue_mode: str  # "hsv" (kornia/torchvision) or "yiq" (Foster et al.)
    random_order: bool  # per-sample random order of the jitter steps, else brightness→contrast→saturation→hue
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    normalize: bool


_COMMON: Dict[str, Any] = dict(
    ratio=(3 / 4, 4 / 3),
    flip_p=0.5,
    jitter_p=0.8,
    gray_p=0.2,
    blur_sigma=(0.1, 2.0),
    blur_kernel=None,
    solarize_p=0.0,
    solarize_threshold=0.5,
    hue_mode="hsv",
    random_order=True,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    normalize=True,
)

# Values at s = 1. "blur_p" of simclr depends on the size (0.5 at >= 64 px, off below), set in resolve().
PRESETS: Dict[str, Dict[str, Any]] = {
    "simclr": dict(_COMMON, scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5),
    "supcon": dict(_COMMON, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0),
    "byol": dict(_COMMON, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
    # Foster et al. at their s = 0.5: factors U[1 - 0.4, 1 + 0.4], hue U[-0.1, 0.1], YIQ hue, fixed order.
    "colour": dict(
        _COMMON, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0, hue_mode="yiq", random_order=False
    ),
}
SIMCLR_BLUR_MIN_SIZE = 64
OVERRIDABLE = (
    "scale",
    "ratio",
    "flip_p",
    "jitter",
    "jitter_p",
    "gray_p",
    "blur_p",
    "blur_sigma",
    "blur_kernel",
    "solarize_p",
    "solarize_threshold",
    "mean",
    "std",
    "normalize",
)


def default_blur_kernel(size: int) -> int:
    """SimCLR's kernel: 10 % of the image side, odd, at least 3, and at most the largest odd number <= size."""
    k = max(3, int(0.1 * size))
    k += 1 - k % 2
    return min(k, size - 1 + size % 2)


def _probabilities(name: str, value: Any) -> Tuple[float, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not values or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in values):
        raise ValueError(
            f"{name}: expected a probability in [0, 1] or a sequence of them (one per view), got {value!r}"
        )
    return tuple(float(p) for p in values)


def _pair(name: str, value: Any, low: float, high: float) -> Tuple[float, float]:
    if not (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value)
        and low <= value[0] <= value[1] <= high
    ):
        raise ValueError(f"{name}: expected a pair (lo, hi) with {low} <= lo <= hi <= {high}, got {value!r}")
    return float(value[0]), float(value[1])


def _channels(name: str, value: Any, positive: bool) -> Tuple[float, ...]:
    if not (
        isinstance(value, (tuple, list))
        and len(value) in (1, 3)
        and all(isinstance(v, (int, float)) and (v > 0 if positive else True) for v in value)
    ):
        kind = "positive numbers" if positive else "numbers"
        raise ValueError(f"{name}: expected a sequence of 1 or 3 {kind} (one per channel), got {value!r}")
    return tuple(float(v) for v in value)


def resolve(preset: str, size: int, strength: float, overrides: Dict[str, Any]) -> Policy:
    """The preset's values, then ``overrides``, then the strength mapping (module docstring).

    Args:
        preset: a name in ``PRESETS``.
        size: output side in pixels.
        strength: s ≥ 0.
        overrides: field name → value, applied before the strength mapping.

    Raises:
        ValueError: an unknown preset or field, naming it.

    Example:
        >>> resolve("simclr", 32, 0.0, {}).gray_p  # strength 0: no grayscale
        0.0"""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"overrides: unknown name(s) {unknown}; expected some of {list(OVERRIDABLE)}")
    base = dict(PRESETS[preset])
    if preset == "simclr" and size < SIMCLR_BLUR_MIN_SIZE:
        base["blur_p"] = 0.0
    base.update(overrides)
    s = float(strength)

    scale = _pair("scale", base["scale"], 1e-6, 1.0)
    ratio = _pair("ratio", base["ratio"], 1e-6, math.inf)
    jitter = base["jitter"]
    if not (
        isinstance(jitter, (tuple, list))
        and len(jitter) == 4
        and all(isinstance(j, (int, float)) and j >= 0 for j in jitter)
        and jitter[3] <= 0.5
    ):
        raise ValueError(
            f"jitter: expected 4 magnitudes (brightness, contrast, saturation, hue) >= 0, hue <= 0.5, got {jitter!r}"
        )
    sigma = _pair("blur_sigma", base["blur_sigma"], 1e-6, math.inf)
    kernel = base["blur_kernel"] if base["blur_kernel"] is not None else default_blur_kernel(size)
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blur_kernel: expected a positive odd int, got {kernel!r}")
    threshold = base["solarize_threshold"]
    if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise ValueError(f"solarize_threshold: expected a number in [0, 1], got {threshold!r}")
    if not isinstance(base["normalize"], bool):
        raise ValueError(f"normalize: expected a bool, got {base['normalize']!r}")
    flip_p, jitter_p, gray_p = (_probabilities(n, base[n])[0] for n in ("flip_p", "jitter_p", "gray_p"))

    def grow(p: float) -> float:
        return min(1.0, p * s)

    return Policy(
        scale=(scale[0] ** s, scale[1] ** s),
        ratio=(ratio[0] ** s, ratio[1] ** s),
        flip_p=flip_p * min(s, 1.0),
        jitter=(jitter[0] * s, jitter[1] * s, jitter[2] * s, min(jitter[3] * s, 0.5)),
        jitter_p=grow(jitter_p),
        gray_p=grow(gray_p),
        blur_p=tuple(grow(p) for p in _probabilities("blur_p", base["blur_p"])),
        blur_sigma=(sigma[0], sigma[0] + (sigma[1] - sigma[0]) * s),
        blur_kernel=kernel,
        solarize_p=tuple(grow(p) for p in _probabilities("solarize_p", base["solarize_p"])),
        solarize_threshold=float(threshold),
        hue_mode=base["hue_mode"],
        random_order=base["random_order"],
        mean=_channels("mean", base["mean"], positive=False),
        std=_channels("std", base["std"], positive=True),
        normalize=base["normalize"],
    )
