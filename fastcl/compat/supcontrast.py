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
* a soft (non-binary) mask weights the positives: ``Σ_p m_ap log p_ap / Σ_p m_ap``, with SupContrast's
  guard (a weight sum below 1e-6 divides by 1);
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
from fastcl.compat._rowblocks import block_sum

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
        n, views = features.shape[0], features.shape[1]
        if labels is not None and mask is not None:
            raise ValueError("labels, mask: cannot define both `labels` and `mask`")
        if labels is not None:
            labels = labels.contiguous().view(-1)
            if labels.shape[0] != n:
                raise ValueError(f"labels: num of labels ({labels.shape[0]}) does not match num of features ({n})")
            # Any dtype, compared by equality as SupContrast's torch.eq: dense integer class ids.
            labels = torch.unique(labels.to(features.device), return_inverse=True)[1]
        if mask is not None:
            mask = mask.to(features.device)
            if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                return self._soft_mask_loss(features, mask)
        loss = functional.supcon(
            features, labels, mask, self.temperature, base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode, normalize=False, distributed="local",
        )
        # fastcl leaves anchors without positives out of its mean; SupContrast averages them in as 0.
        with_positive = _samples_with_positive(n, views, labels, mask)
        return loss * with_positive.sum().to(loss) / n

    def _soft_mask_loss(self, features: Tensor, mask: Tensor) -> Tensor:
        n, views = features.shape[0], features.shape[1]
        if self.contrast_mode not in ("all", "one"):
            raise ValueError(f"contrast_mode: expected one of ['all', 'one'], got {self.contrast_mode!r}")
        contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
        anchors = contrast if self.contrast_mode == "all" else features[:, 0]
        weights = mask.float()  # SupContrast's mask.float(): its weights and their sums are float32
        kappa = self.temperature / self.base_temperature

        def term(s: Tensor, rows: slice) -> Tensor:
            anchor = torch.arange(rows.start, rows.stop, device=s.device)
            w = weights[anchor % n].repeat(1, views)  # [rows, V·N], as SupContrast's mask.repeat
            w[torch.arange(w.shape[0], device=s.device), anchor] = 0.0  # the anchor itself is never a positive
            log_prob = s - torch.logsumexp(s, dim=1, keepdim=True)
            weight_sum = w.sum(dim=1)
            weighted = torch.where(w != 0, w * log_prob, 0.0).sum(dim=1)
            return -(weighted / torch.where(weight_sum < 1e-6, 1.0, weight_sum)).sum()

        total = block_sum(anchors, contrast, self.temperature, term, self_index=torch.arange(anchors.shape[0], device=anchors.device))
        return kappa * total / anchors.shape[0]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, contrast_mode={self.contrast_mode!r}, base_temperature={self.base_temperature}"


def _samples_with_positive(n: int, views: int, labels: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    """[N] bool: does sample n's anchor have a positive (the same for each of its views)."""
    if views > 1 and mask is None:
        return torch.ones(n, dtype=torch.bool)
    if mask is not None:
        off_diagonal = mask.bool() & ~torch.eye(n, dtype=torch.bool, device=mask.device)
        return off_diagonal.any(dim=1) | (mask.diagonal().bool() & (views > 1))
    if labels is None:
        return torch.zeros(n, dtype=torch.bool)  # one view, every sample its own class
    counts = torch.bincount(labels)
    return counts[labels] > 1
