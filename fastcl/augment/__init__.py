"""GPU multi-view augmentation for contrastive learning (docs/augment.md).

``MultiViewAugment`` samples per-sample, per-view ``AugmentParams`` from a ``torch.Generator`` and renders
the views with kornia (reference) or a fused Triton kernel; ``colour`` is Foster et al.'s differentiable
colour distortion for the gradient penalty.
"""

from fastcl._extras import require

require("kornia", "augment", "fastcl.augment")

from fastcl.augment.colour import colour, sample_colour_factors  # noqa: E402
from fastcl.augment.params import AugmentParams, sample_params  # noqa: E402
from fastcl.augment.pipeline import MultiViewAugment  # noqa: E402
from fastcl.augment.presets import PRESETS, Policy, resolve  # noqa: E402

__all__ = [
    "MultiViewAugment",
    "AugmentParams",
    "colour",
    "sample_colour_factors",
    "sample_params",
    "PRESETS",
    "Policy",
    "resolve",
]
