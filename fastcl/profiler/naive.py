"""The naive, materialising losses the profiler compares against: full M×M logits, as popular code does.

Each function follows the operations of the code most people run today, so that "ratio vs naive" means
"compared with what you use now":

- :func:`nt_xent` — lightly's ``NTXentLoss(memory_bank_size=0)``: four N×N einsum blocks, the self
  similarities cut out with a boolean mask, concatenated into 2N×(2N−1) logits, ``cross_entropy``.
- :func:`info_nce` — DirectCLR's ``infoNCE(z1, z2)/2 + infoNCE(z2, z1)/2``: normalize, ``q @ kᵀ / τ``,
  ``cross_entropy`` against ``arange``, once per direction.
- :func:`supcon` — SupContrast's ``SupConLoss``: view-major contrast features, full logits minus the row
  max, exp, a dense float mask for positives and one for "not self".

Inputs are L2-normalized first (lightly and DirectCLR do it inside the loss; SupContrast's model does it
in its forward), so the values equal ``fastcl.functional`` with ``normalize=True``.

    >>> import torch
    >>> from fastcl.profiler import naive
    >>> z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    >>> naive.nt_xent(z1, z2, 0.5).shape
    torch.Size([])
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["nt_xent", "info_nce", "supcon"]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR 2N-way NT-Xent computed as lightly does (2N×(2N−1) logits)."""
    n = z1.shape[0]
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    logits_11 = torch.einsum("nc,mc->nm", z1, z1) / temperature
    logits_12 = torch.einsum("nc,mc->nm", z1, z2) / temperature
    logits_21 = torch.einsum("nc,mc->nm", z2, z1) / temperature
    logits_22 = torch.einsum("nc,mc->nm", z2, z2) / temperature
    not_self = ~torch.eye(n, device=z1.device, dtype=torch.bool)
    logits_11 = logits_11[not_self].view(n, -1)
    logits_22 = logits_22[not_self].view(n, -1)
    logits = torch.cat([torch.cat([logits_12, logits_11], dim=1), torch.cat([logits_21, logits_22], dim=1)], dim=0)
    # The positive of row i sits in column i of the cross-view block, which comes first in both halves.
    targets = torch.arange(n, device=z1.device).repeat(2)
    return F.cross_entropy(logits, targets)


def _info_nce_one_direction(anchors: Tensor, others: Tensor, temperature: float) -> Tensor:
    anchors = F.normalize(anchors, dim=1)
    others = F.normalize(others, dim=1)
    logits = anchors @ others.T / temperature
    targets = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(logits, targets)


def info_nce(q: Tensor, k: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric cross-view InfoNCE as DirectCLR computes it (two N×N logit matrices)."""
    return _info_nce_one_direction(q, k, temperature) / 2 + _info_nce_one_direction(k, q, temperature) / 2


def supcon(
    features: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> Tensor:
    """SupCon L_out (``contrast_mode="all"``) as SupContrast computes it (dense NV×NV logits and masks)."""
    n, views, _ = features.shape
    features = F.normalize(features, dim=2)
    if labels is None:
        labels = torch.arange(n, device=features.device)
    labels = labels.view(-1, 1)
    same_label = torch.eq(labels, labels.T).float()
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_dot_contrast = contrast @ contrast.T / temperature
    row_max, _ = anchor_dot_contrast.max(dim=1, keepdim=True)
    logits = anchor_dot_contrast - row_max.detach()
    positives = same_label.repeat(views, views)
    rows = n * views
    not_self = torch.scatter(
        torch.ones_like(positives), 1, torch.arange(rows, device=features.device).view(-1, 1), 0
    )
    positives = positives * not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    positive_count = positives.sum(1)
    positive_count = torch.where(positive_count < 1e-6, 1, positive_count)
    mean_log_prob_pos = (positives * log_prob).sum(1) / positive_count
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()
