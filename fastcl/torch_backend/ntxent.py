"""NT-Xent (SPEC §1) on the torch backend.

Rows are Z = [z1; z2] (M = 2N), pos(i) = (i + N) mod M. The backward uses the symmetry of S: with
G = ∂L/∂S, dZ_I = Σ_j (G_Ij + G_jI) Z_j / τ, and G_jI needs only the recomputed tile and lse_j, so each
row block costs one recompute and one GEMM, and owns its rows of dZ.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcl.torch_backend._tiles import blocks, logits, mask_self, row_logsumexp, upcast


def _positives(start: int, stop: int, m: int, device) -> Tensor:
    return (torch.arange(start, stop, device=device) + m // 2) % m


def ntxent_forward(z: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    zc = upcast(z)
    zs = zc / tau
    m = zc.shape[0]
    lse = zc.new_empty(m)
    positive = zc.new_empty(m)
    for start, stop in blocks(m, m):
        s = mask_self(logits(zs[start:stop], zc), start)
        positive[start:stop] = s.gather(1, _positives(start, stop, m, z.device)[:, None]).squeeze(1)
        lse[start:stop] = row_logsumexp(s)
    return (lse - positive).mean(), lse


def ntxent_backward(grad: Tensor, z: Tensor, tau: Tensor, lse: Tensor) -> Tensor:
    zc = upcast(z)
    zs = zc / tau
    m = zc.shape[0]
    dz = torch.empty_like(zc)
    scale = grad.to(zc.dtype) / (m * tau)
    for start, stop in blocks(m, m):
        s = mask_self(logits(zs[start:stop], zc), start)
        # G_Ij + G_jI = (softmax over row I + softmax over row j, read at (I, j) − 2·[j = pos(I)]) / M
        g = torch.sub(s, lse[start:stop, None]).exp_()
        g += s.sub_(lse[None, :]).exp_()
        rows = torch.arange(stop - start, device=z.device)
        g[rows, _positives(start, stop, m, z.device)] -= 2.0
        dz[start:stop] = (g @ zc) * scale
    return dz.to(z.dtype)
