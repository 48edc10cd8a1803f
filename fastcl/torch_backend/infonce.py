"""Cross-view InfoNCE (docs/spec.md) on the torch backend.

Forward: one pass over row blocks of S = Q Kᵀ/τ gives the row log-sum-exps directly and the column
log-sum-exps by an online (running max, rescaled sum) merge across blocks. Backward: one recompute per
block; dQ_I = G_I K and dK += G_Iᵀ Q_I (4 GEMM-units in all, as the FLOP model of docs/spec.md counts).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcl.torch_backend._tiles import (
    NORM_EPS,
    blocks,
    full_gradient,
    grad_dot_logits,
    logits,
    prepare_rows,
    row_logsumexp,
    rows_backward,
)


def infonce_forward(
    q: Tensor, k: Tensor, tau: Tensor, sub_dim: int, normalize: bool, symmetric: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    (qr, q_norms), (kr, k_norms) = prepare_rows(q, sub_dim, normalize), prepare_rows(k, sub_dim, normalize)
    qs = qr / tau
    n = qr.shape[0]
    lse_rows = qr.new_empty(n)
    diagonal = qr.new_empty(n)
    col_max = qr.new_full((n if symmetric else 0,), float("-inf"))
    col_sum = qr.new_zeros(col_max.shape)
    for start, stop in blocks(n, n):
        s = logits(qs[start:stop], kr)
        diagonal[start:stop] = s.diagonal(offset=start)
        if symmetric:
            new_max = torch.maximum(col_max, s.amax(dim=0))
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.sub(s, new_max).exp_().sum(dim=0)
            col_max = new_max
        lse_rows[start:stop] = row_logsumexp(s)
    loss = (lse_rows - diagonal).mean()
    lse_cols = col_max + torch.log(col_sum)
    if symmetric:
        loss = 0.5 * loss + 0.5 * (lse_cols - diagonal).mean()
    return loss, lse_rows, lse_cols, 1.0 / q_norms.clamp_min(NORM_EPS), 1.0 / k_norms.clamp_min(NORM_EPS)


def infonce_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    tau: Tensor,
    sub_dim: int,
    normalize: bool,
    symmetric: bool,
    lse_rows: Tensor,
    lse_cols: Tensor,
    inv_norms_q: Tensor,
    inv_norms_k: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    (qr, q_norms), (kr, k_norms) = prepare_rows(q, sub_dim, normalize), prepare_rows(k, sub_dim, normalize)
    qs = qr / tau
    n = qr.shape[0]
    weight = 0.5 if symmetric else 1.0
    scale = grad.to(qr.dtype) * weight / (n * tau)
    dq = torch.empty_like(qr)
    dk = torch.zeros_like(kr)
    for start, stop in blocks(n, n):
        s = logits(qs[start:stop], kr)
        g = torch.sub(s, lse_rows[start:stop, None]).exp_()
        if symmetric:
            g += s.sub_(lse_cols[None, :]).exp_()
        g.diagonal(offset=start).sub_(2.0 if symmetric else 1.0)
        g *= scale
        dq[start:stop] = g @ kr
        dk += g.T @ qr[start:stop]
    gs = grad_dot_logits([(qr, dq), (kr, dk)], 2)
    dq, dk = rows_backward(dq, qr, q_norms), rows_backward(dk, kr, k_norms)
    return full_gradient(dq, q), full_gradient(dk, k), gs
