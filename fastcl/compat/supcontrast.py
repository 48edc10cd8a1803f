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
* a mask that requires grad gets SupContrast's gradient (computed in the backward, anchor rows against
  all rows a block at a time, only when the mask asks for it: O(N²) like the mask itself), in the
  accumulation dtype where SupContrast rounds it to float32 through its ``mask.float()``;
* NaN or Inf in the features gives a NaN loss, as SupContrast, without a raise;
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
from fastcl.compat._common import class_ids
from fastcl.contract import accumulation_dtype
from fastcl.torch_backend._tiles import blocks

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
            # Any dtype, compared by equality as SupContrast's torch.eq: integer class ids (no host sync).
            labels = class_ids(labels.to(features.device))
        weights = None if mask is None else mask.to(features.device).float()  # SupContrast's float32 weights
        loss = functional.supcon(
            features,
            labels,
            None if weights is None else weights.detach(),
            self.temperature,
            base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode,
            positives_missing="zero",
            normalize=False,
            distributed="local",
            check_finite=False,
        )
        if weights is not None and weights.requires_grad:
            anchor_views = 1 if self.contrast_mode == "one" else features.shape[1]
            loss = _MaskGradient.apply(loss, weights, features.detach(), self._kappa(), anchor_views)
        return loss

    def _kappa(self) -> tuple[float, float]:
        return float(self.temperature), float(self.temperature) / float(self.base_temperature)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, contrast_mode={self.contrast_mode!r}, "
            f"base_temperature={self.base_temperature}"
        )


class _MaskGradient(torch.autograd.Function):
    """Identity on the loss whose backward also gives SupContrast's gradient of its (float32) mask."""

    @staticmethod
    def forward(ctx, loss: Tensor, weights: Tensor, features: Tensor, tau_kappa: tuple[float, float], anchor_views):
        ctx.save_for_backward(weights, features)
        ctx.tau_kappa, ctx.anchor_views = tau_kappa, anchor_views
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, features = ctx.saved_tensors
        d_weights = None
        if ctx.needs_input_grad[1]:
            d_weights = _mask_gradient(weights, features, *ctx.tau_kappa, ctx.anchor_views) * grad
            d_weights = d_weights.to(weights.dtype)
        return grad, d_weights, None, None, None


@torch.no_grad()
def _mask_gradient(weights: Tensor, features: Tensor, tau: float, kappa: float, anchor_views: int) -> Tensor:
    """dL/dmask of SupContrast's L = mean_a ℓ_a, ℓ_a = −κ Σ_c M_ac log p_ac / S_a with M the mask tiled
    over views (self entries 0), S_a = Σ_c M_ac (1 where < 1e-6, SupContrast's guard, which then also
    takes no gradient): dℓ_a/dM_ac = −κ (log p_ac − [S_a ≥ 1e-6] Σ_c' M_ac' log p_ac' / S_a) / S_a,
    summed over the view pairs that tile each mask entry. One block of anchors of one view at a time."""
    n, views = features.shape[0], features.shape[1]
    acc = accumulation_dtype(features.dtype)
    keys = features.transpose(0, 1).reshape(views * n, -1).to(acc)
    m = weights.to(acc)
    tiled = m.repeat(1, views)  # [N, V·N]: M_ac for anchor sample i = a mod N
    d_mask = torch.zeros_like(m)
    scale = -kappa / (anchor_views * n)
    for u in range(anchor_views):
        for start, stop in blocks(n, keys.shape[0]):
            own = torch.arange(start, stop, device=keys.device) + u * n  # the anchors' own key rows
            is_self = own[:, None] == torch.arange(keys.shape[0], device=keys.device)
            s = (keys[own] @ keys.T / tau).masked_fill(is_self, float("-inf"))
            log_p = (s - torch.logsumexp(s, dim=1, keepdim=True)).masked_fill(is_self, 0.0)
            w = tiled[start:stop].masked_fill(is_self, 0.0)
            total = w.sum(dim=1, keepdim=True)
            guarded = torch.where(total < 1e-6, 1.0, total)
            mean = torch.where(total < 1e-6, 0.0, (w * log_p).sum(dim=1, keepdim=True) / guarded)
            g = ((log_p - mean) / guarded).masked_fill(is_self, 0.0)
            d_mask[start:stop] += scale * g.view(stop - start, views, n).sum(dim=1)
    return d_mask
