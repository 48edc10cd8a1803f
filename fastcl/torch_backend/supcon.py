"""SupCon L_out (SPEC §3) on the torch backend.

Rows are view-major (row r is sample r mod N). For anchor a with |P(a)| ≥ 1 (the set A⁺):
    ℓ_a = κ (lse_a − mean_{p∈P(a)} s_ap),  κ = τ/τ_b,  L = mean_{a∈A⁺} ℓ_a  (0 when A⁺ is empty)
    G_ac = ∂L/∂s_ac = κ/|A⁺| · (softmax_a(c) − 1[c∈P(a)]/|P(a)|)
The backward walks row blocks of all rows and, like NT-Xent's, adds the transposed term G_cr of the
anchors c from the same recomputed tile, so each block owns its rows of dZ.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl.torch_backend._tiles import (
    blocks, full_gradient, grad_dot_logits, logits, mask_self, prepare_rows, row_logsumexp, rows_backward,
)


def _positive_tile(labels: Optional[Tensor], mask: Optional[Tensor], start: int, stop: int, m: int) -> Tensor:
    """P for rows start..stop against all m rows (self included; callers mask it)."""
    n = labels.shape[0] if labels is not None else mask.shape[0]
    device = labels.device if labels is not None else mask.device
    rows = torch.arange(start, stop, device=device) % n
    cols = torch.arange(m, device=device) % n
    if labels is not None:
        return labels[rows][:, None] == labels[cols][None, :]
    return mask[rows][:, cols]


def positive_counts(labels: Optional[Tensor], mask: Optional[Tensor], m: int) -> Tensor:
    """|P(r)| for every row r: V·#{samples positive to r's sample} − [r's sample is positive to itself]."""
    if labels is not None:
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        per_sample, self_positive = counts[inverse], torch.ones_like(inverse)
    else:
        per_sample, self_positive = mask.sum(dim=1), mask.diagonal().long()
    n = per_sample.shape[0]
    views = m // n
    return (views * per_sample - self_positive).repeat(views)


def _anchor_weights(counts: Tensor, n_anchors: int, kappa: Tensor) -> Tensor:
    """κ/|A⁺| for anchors with a positive, 0 for the others and for non-anchor rows."""
    valid = torch.zeros_like(counts, dtype=kappa.dtype)
    valid[:n_anchors] = (counts[:n_anchors] > 0).to(kappa.dtype)
    return valid * kappa / valid.sum().clamp(min=1)


def _view_major_rows(features: Tensor, sub_dim: int, normalize: bool) -> tuple[Tensor, Tensor]:
    n, views, _ = features.shape
    return prepare_rows(features.transpose(0, 1).reshape(views * n, -1), sub_dim, normalize)


def supcon_forward(
    features: Tensor, labels: Optional[Tensor], mask: Optional[Tensor], tau: Tensor, base_temperature: float,
    n_anchors: int, sub_dim: int, normalize: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    zc, norms = _view_major_rows(features, sub_dim, normalize)
    zs = zc / tau
    m = zc.shape[0]
    counts = positive_counts(labels, mask, m)
    lse = zc.new_empty(n_anchors)
    positive_mean = zc.new_zeros(n_anchors)
    for start, stop in blocks(n_anchors, m):
        s = logits(zs[start:stop], zc)
        positives = _positive_tile(labels, mask, start, stop, m)
        positives.diagonal(offset=start).fill_(False)
        positive_mean[start:stop] = torch.where(positives, s, 0.0).sum(dim=1) / counts[start:stop].clamp(min=1)
        lse[start:stop] = row_logsumexp(mask_self(s, start))
    weights = _anchor_weights(counts, n_anchors, tau / base_temperature)[:n_anchors]
    # An anchor with no other row has lse = −inf; it has no positive either, and must add 0, not 0·(−inf).
    per_anchor = torch.where(weights > 0, weights * (lse - positive_mean), 0.0)
    return per_anchor.sum(), lse, 1.0 / norms.clamp_min(1e-12)


def supcon_backward(
    grad: Tensor,
    features: Tensor,
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    tau: Tensor,
    base_temperature: float,
    n_anchors: int,
    sub_dim: int,
    normalize: bool,
    lse: Tensor,
    inv_norms: Tensor,
) -> tuple[Tensor, Tensor]:
    zc, norms = _view_major_rows(features, sub_dim, normalize)
    zs = zc / tau
    m = zc.shape[0]
    counts = positive_counts(labels, mask, m)
    weights = _anchor_weights(counts, n_anchors, tau / base_temperature)
    inv_counts = 1.0 / counts.clamp(min=1).to(zc.dtype)
    # Non-anchor columns get lse = +inf (softmax 0) and weight 0.
    lse_all = torch.cat([lse, lse.new_full((m - n_anchors,), float("inf"))])
    # The transposed term needs P(c) ∋ r, i.e. the positive tile of the columns against the rows.
    transposed_mask = mask.T if mask is not None else None
    dz = torch.empty_like(zc)
    scale = grad.to(zc.dtype) / tau
    for start, stop in blocks(m, m):
        s = mask_self(logits(zs[start:stop], zc), start)
        positives = _positive_tile(labels, mask, start, stop, m).to(zc.dtype)
        positives_t = positives if mask is None else _positive_tile(None, transposed_mask, start, stop, m).to(zc.dtype)
        rows = slice(start, stop)
        g = weights[rows, None] * (torch.sub(s, lse_all[rows, None]).exp_() - positives * inv_counts[rows, None])
        g += weights[None, :] * (s.sub_(lse_all[None, :]).exp_() - positives_t * inv_counts[None, :])
        g.diagonal(offset=start).zero_()
        dz[start:stop] = (g @ zc) * scale
    gs = grad_dot_logits([(zc, dz)], 2)
    n, views, _ = features.shape
    dz = rows_backward(dz, zc, norms).reshape(views, n, -1).transpose(0, 1)
    return full_gradient(dz, features), gs
