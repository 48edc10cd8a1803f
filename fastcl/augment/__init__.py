"""GPU multi-view augmentation for contrastive learning (docs/augment.md).

``MultiViewAugment`` samples per-sample, per-view ``AugmentParams`` from a ``torch.Generator`` and renders
the views with kornia (reference) or a fused Triton kernel; ``colour`` is Foster et al.'s differentiable
colour distortion for the gradient penalty.
"""
from fastcl.augment.colour import colour, sample_colour_factors
from fastcl.augment.params import AugmentParams, sample_params
from fastcl.augment.pipeline import MultiViewAugment
from fastcl.augment.presets import PRESETS, Policy, resolve

__all__ = ["MultiViewAugment", "AugmentParams", "colour", "sample_colour_factors", "sample_params", "PRESETS",
           "Policy", "resolve"]
