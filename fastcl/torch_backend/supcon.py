"""SupCon L_out (docs/spec.md) on the torch backend.

Rows are view-major (row r is sample r mod N). For anchor a with |P(a)| ≥ 1 (the set A⁺):
    ℓ_a = κ (lse_a − mean_{p∈P(a)} s_ap),  κ = τ/τ_b,  L = mean_{a∈A⁺} ℓ_a  (0 when A⁺ is empty)
    G_ac = ∂L/∂s_ac = κ/|A⁺| · (softmax_a(c) − 1[c∈P(a)]/|P(a)|)
The backward walks row blocks of all rows and, like NT-Xent's, adds the transposed term G_cr of the
anchors c from the same recomputed tile, so each block owns its rows of dZ.

With labels, the positive terms need no N² work (docs/spec.md): with per-class row sums C_y,
Σ_{p∈P(a)} s_ap = ẑ_a·(C_{y_a} − ẑ_a)/τ, and the positive part of dZ is a class-sum lookup too, so the
tiles only carry the softmax. A mask is read tile by tile.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl.contract import class_segments, class_sums
from fastcl.torch_backend._tiles import (
    NORM_EPS,
    blocks,
    full_gradient,
    grad_dot_logits,
    logits,
    mask_self,
    prepare_rows,
    row_logsumexp,
    rows_backward,
)


def _positive_tile(mask: Tensor, start: int, stop: int, m: int) -> Tensor:
    """mask[r mod N, c mod N] for rows start..stop against all m rows (self included; callers clear it)."""
    n = mask.shape[0]
    rows = torch.arange(start, stop, device=mask.device) % n
    cols = torch.arange(m, device=mask.device) % n
    return mask[rows][:, cols]


def label_classes(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(first, size) per sample: the sorted position of the first sample of its class (a class id in
    [0, N)) and the class size. Sort + searchsorted: static shapes, so torch.compile can trace it
    (``unique`` cannot)."""
    ordered = labels.sort().values
    first = torch.searchsorted(ordered, labels)
    return first, torch.searchsorted(ordered, labels, right=True) - first


def positive_counts(labels: Optional[Tensor], mask: Optional[Tensor], views: int) -> tuple[Tensor, Tensor]:
    """(|P(r)| for every row r, int32 class ids [N] (labels) or an empty tensor (mask)). |P(r)| is
    V·#{samples positive to r's sample} − [r's sample is positive to itself]; the class ids
    (:func:`label_classes`) let the backward build class sums without sorting again."""
    if labels is not None:
        classes, per_sample = label_classes(labels)
        self_positive = 1
        classes = classes.to(torch.int32)
    else:
        per_sample, self_positive = mask.sum(dim=1), mask.diagonal().long()
        classes = per_sample.new_empty(0, dtype=torch.int32)
    return (views * per_sample - self_positive).repeat(views), classes


def _anchor_weights(counts: Tensor, kappa: Tensor) -> Tensor:
    """κ/|A⁺| for anchors with a positive (counts: |P(a)| of the anchors), 0 for the others."""
    valid = (counts > 0).to(kappa.dtype)
    return valid * kappa / valid.sum().clamp(min=1)


def _view_major_rows(features: Tensor, sub_dim: int, normalize: bool) -> tuple[Tensor, Tensor]:
    n, views, _ = features.shape
    return prepare_rows(features[:, :, :sub_dim].transpose(0, 1).reshape(views * n, sub_dim), sub_dim, normalize)


def supcon_forward(
    features: Tensor,
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    tau: Tensor,
    base_temperature: float,
    n_anchors: int,
    sub_dim: int,
    normalize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    zc, norms = _view_major_rows(features, sub_dim, normalize)
    zs = zc / tau
    m = zc.shape[0]
    n, views, _ = features.shape
    counts, classes = positive_counts(labels, mask, views)
    counts = counts[:n_anchors]
    lse = zc.new_empty(n_anchors)
    if labels is not None:
        row_class = classes.long().repeat(views)
        others = class_sums(zc, class_segments(row_class, n))[row_class[:n_anchors]] - zc[:n_anchors]
        positive_sum = (zs[:n_anchors] * others).sum(dim=1)
    else:
        positive_sum = zc.new_empty(n_anchors)
    for start, stop in blocks(n_anchors, m):
        s = logits(zs[start:stop], zc)
        if mask is not None:
            positives = _positive_tile(mask, start, stop, m)
            positives.diagonal(offset=start).fill_(False)
            positive_sum[start:stop] = torch.where(positives, s, 0.0).sum(dim=1)
        lse[start:stop] = row_logsumexp(mask_self(s, start))
    weights = _anchor_weights(counts, tau / base_temperature)
    positive_mean = positive_sum / counts.clamp(min=1)
    # An anchor with no other row has lse = −inf; it has no positive either, and must add 0, not 0·(−inf).
    per_anchor = torch.where(weights > 0, weights * (lse - positive_mean), 0.0)
    return per_anchor.sum(), lse, counts.to(torch.int32), classes, 1.0 / norms.clamp_min(NORM_EPS)


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
    counts: Tensor,
    classes: Tensor,
    inv_norms: Tensor,
) -> tuple[Tensor, Tensor]:
    zc, norms = _view_major_rows(features, sub_dim, normalize)
    zs = zc / tau
    m = zc.shape[0]
    # κ/|A⁺| per row: the forward's |P(a)| for the anchors, 0 for the rows that are no anchor.
    weights = torch.cat([_anchor_weights(counts, tau / base_temperature), zc.new_zeros(m - n_anchors)])
    counts = torch.cat([counts, counts.new_zeros(m - n_anchors)])
    positive_weights = weights / counts.clamp(min=1).to(zc.dtype)  # κ/(|A⁺|·|P(r)|)
    # w·softmax = exp(s − (lse − log w)); rows that are not anchors with a positive get +inf (weight 0).
    lse_all = torch.cat([lse, lse.new_full((m - n_anchors,), float("inf"))])
    shift = torch.where(weights > 0, lse_all - weights.log(), float("inf"))
    dz = torch.empty_like(zc)
    for start, stop in blocks(m, m):
        s = mask_self(logits(zs[start:stop], zc), start)
        g = torch.sub(s, shift[start:stop, None]).exp_()
        g += s.sub_(shift[None, :]).exp_()
        if mask is not None:
            # Row term −1[c∈P(r)]/|P(r)| and transposed term −1[r∈P(c)]/|P(c)| (the mask may be asymmetric).
            positive = positive_weights[start:stop, None] * _positive_tile(mask, start, stop, m)
            positive += positive_weights[None, :] * _positive_tile(mask.T, start, stop, m)
            positive.diagonal(offset=start).zero_()
            g -= positive
        dz[start:stop] = g @ zc
    if labels is not None:
        # Σ_{c∈P(r)} (a_r + a_c) ẑ_c with a = positive_weights: class sums minus the row itself.
        n_classes = features.shape[0]
        row_class = classes.long().repeat(features.shape[1])
        segments = class_segments(row_class, n_classes)
        weighted = positive_weights[:, None] * zc
        dz -= positive_weights[:, None] * (class_sums(zc, segments)[row_class] - zc)
        dz -= class_sums(weighted, segments)[row_class] - weighted
    dz *= grad.to(zc.dtype) / tau
    gs = grad_dot_logits([(zc, dz)], 2)
    n, views, _ = features.shape
    dz = rows_backward(dz, zc, norms).reshape(views, n, -1).transpose(0, 1)
    return full_gradient(dz, features), gs
