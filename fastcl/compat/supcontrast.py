"""SupContrast (github.com/HobbitLong/SupContrast, ``losses.py``): change only the import line.

    from losses import SupConLoss                      # before
    from fastcl.compat.supcontrast import SupConLoss   # after

Same constructor ``SupConLoss(temperature=0.07, contrast_mode='all', base_temperature=0.07)`` (also
positionally), same ``forward(features, labels=None, mask=None)`` and the same values, including
SupContrast's conventions where fastcl's core :class:`fastcl.SupConLoss` differs:

* features are used as given (SupContrast's model normalizes them; the loss does not);
* ``[bsz, n_views, ...]`` features with more than 3 dims are flattened to ``[bsz, n_views, -1]``;
* labels may be ``[bsz]`` or ``[bsz, 1]``, of any dtype (compared by equality);
* ``labels``/``mask`` may live on another device than the features (moved, as SupContrast does);
* an anchor without positives adds a 0 to the mean over all anchors (SupContrast's current master);
* a soft (non-binary) mask weights the positives: ``Σ_p m_ap log p_ap / Σ_p m_ap``, the weights
  rounded to float32 as SupContrast's ``mask.float()`` (their sum is then accumulated in float32 or
  wider, not in float32 as SupContrast does; an anchor whose weights sum to 0 counts 0);
* per-rank under DDP (SupContrast never gathers).

One deliberate difference: SupContrast subtracts a row maximum that includes the anchor's own logit
(‖z‖²/τ) before ``exp``, so in float32 at small τ (0.01 with normalized rows) every other term
underflows to 0 and the loss is NaN or Inf. Here the log-softmax is computed without that underflow:
the value is finite and equals SupContrast's exact (float64) value.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastcl import functional

__all__ = ["SupConLoss"]


class SupConLoss(nn.Module):
    """SupContrast's ``SupConLoss`` on fastcl's kernels (Khosla et al. 2020, https://arxiv.org/abs/2004.11362).

    ``ℓ_a = −(τ/τ_b) · Σ_p m_ap (s_ap − log Σ_{c≠a} exp s_ac) / Σ_p m_ap`` with ``s = z_a · z_c / τ`` on
    the rows as given; the loss is the mean over all anchors, those without positives counting 0.

    Args:
        temperature: τ > 0.
        contrast_mode: ``'all'`` (every view is an anchor) or ``'one'`` (view 0 only).
        base_temperature: τ_b > 0.

    Shape:
        features: ``[bsz, n_views, ...]``; labels: ``[bsz]`` or ``[bsz, 1]``; mask: ``[bsz, bsz]``,
        may be asymmetric and non-binary. Output: ``[]``.

    Returns:
        The loss, 0-dim float32 (float64 for float64 features).

    Raises:
        ValueError: features with fewer than 3 dims, both labels and mask, a label count other than
            bsz, an unknown ``contrast_mode`` (fastcl's message names the argument).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> features = F.normalize(torch.randn(8, 2, 16), dim=2)
        >>> labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
        >>> loss = SupConLoss(0.1, 'all', 0.07)(features, labels)
        >>> loss.shape
        torch.Size([])
        >>> lone = SupConLoss()(F.normalize(torch.randn(4, 1, 16), dim=2), torch.tensor([0, 1, 1, 2]))
        >>> bool(torch.isfinite(lone))      # anchors 0 and 3 have no positive: they add 0 to the mean
        True
    """

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07):
        super().__init__()
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature

    def forward(self, features: Tensor, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        if features.dim() < 3:
            raise ValueError(
                f"features: needs to be [bsz, n_views, ...] (at least 3 dimensions), got shape {tuple(features.shape)}"
            )
        if features.dim() > 3:
            features = features.reshape(features.shape[0], features.shape[1], -1)
        n = features.shape[0]
        if labels is not None and mask is not None:
            raise ValueError("labels, mask: cannot define both `labels` and `mask`")
        if labels is not None:
            labels = labels.contiguous().view(-1)
            if labels.shape[0] != n:
                raise ValueError(f"labels: num of labels ({labels.shape[0]}) does not match num of features ({n})")
            # Any dtype, compared by equality as SupContrast's torch.eq: dense integer class ids.
            labels = torch.unique(labels.to(features.device), return_inverse=True)[1]
        if mask is not None:
            mask = mask.to(features.device).float()  # SupContrast's mask.float(): float32 weights
        return functional.supcon(
            features,
            labels,
            mask,
            self.temperature,
            base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode,
            positives_missing="zero",
            normalize=False,
            distributed="local",
            check_finite=False,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, contrast_mode={self.contrast_mode!r}, "
            f"base_temperature={self.base_temperature}"
        )
