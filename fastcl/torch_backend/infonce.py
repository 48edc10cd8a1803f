"""Cross-view InfoNCE (SPEC §2) on the torch backend.

Forward: one pass over row blocks of S = Q Kᵀ/τ gives the row log-sum-exps directly and the column
log-sum-exps by an online (running max, rescaled sum) merge across blocks. Backward: one recompute per
block; dQ_I = G_I K and dK += G_Iᵀ Q_I (4 GEMM-units in all, as SPEC §6 counts).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl.torch_backend._tiles import blocks, logits, row_logsumexp, upcast


def infonce_forward(q: Tensor, k: Tensor, tau: Tensor, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    qc, kc = upcast(q), upcast(k)
    qs = qc / tau
    n = qc.shape[0]
    lse_rows = qc.new_empty(n)
    diagonal = qc.new_empty(n)
    col_max = qc.new_full((n if symmetric else 0,), float("-inf"))
    col_sum = qc.new_zeros(col_max.shape)
    for start, stop in blocks(n, n):
        s = logits(qs[start:stop], kc)
        diagonal[start:stop] = s.diagonal(offset=start)
        if symmetric:
            new_max = torch.maximum(col_max, s.amax(dim=0))
            col_sum = col_sum * torch.exp(col_max - new_max) + torch.sub(s, new_max).exp_().sum(dim=0)
            col_max = new_max
        lse_rows[start:stop] = row_logsumexp(s)
    loss = (lse_rows - diagonal).mean()
    if not symmetric:
        return loss, lse_rows, col_max
    lse_cols = col_max + torch.log(col_sum)
    return 0.5 * loss + 0.5 * (lse_cols - diagonal).mean(), lse_rows, lse_cols


def infonce_backward(
    grad: Tensor, q: Tensor, k: Tensor, tau: Tensor, symmetric: bool, lse_rows: Tensor, lse_cols: Tensor
) -> tuple[Tensor, Tensor]:
    qc, kc = upcast(q), upcast(k)
    qs = qc / tau
    n = qc.shape[0]
    weight = 0.5 if symmetric else 1.0
    scale = grad.to(qc.dtype) * weight / (n * tau)
    dq = torch.empty_like(qc)
    dk = torch.zeros_like(kc)
    for start, stop in blocks(n, n):
        s = logits(qs[start:stop], kc)
        g = torch.sub(s, lse_rows[start:stop, None]).exp_()
        if symmetric:
            g += s.sub_(lse_cols[None, :]).exp_()
        g.diagonal(offset=start).sub_(2.0 if symmetric else 1.0)
        g *= scale
        dq[start:stop] = g @ kc
        dk += g.T @ qc[start:stop]
    return dq.to(q.dtype), dk.to(k.dtype)
