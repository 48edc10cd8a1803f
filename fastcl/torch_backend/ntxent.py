"""NT-Xent (docs/spec.md) on the torch backend.

Rows are Z = [z1; z2] (M = 2N), pos(i) = (i + N) mod M. The backward uses the symmetry of S: with
G = ∂L/∂S, dZ_I = Σ_j (G_Ij + G_jI) Z_j / τ, and G_jI needs only the recomputed tile and lse_j, so each
row block costs one recompute and one GEMM, and owns its rows of dZ.
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
    mask_self,
    prepare_rows,
    row_logsumexp,
    rows_backward,
)


def _positives(start: int, stop: int, m: int, device) -> Tensor:
    return (torch.arange(start, stop, device=device) + m // 2) % m


def _rows(z1: Tensor, z2: Tensor, sub_dim: int, normalize: bool) -> tuple[Tensor, Tensor]:
    return prepare_rows(torch.cat([z1[:, :sub_dim], z2[:, :sub_dim]]), sub_dim, normalize)


def ntxent_forward(z1: Tensor, z2: Tensor, tau: Tensor, sub_dim: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    z, norms = _rows(z1, z2, sub_dim, normalize)
    zs = z / tau
    m = z.shape[0]
    lse = z.new_empty(m)
    positive = z.new_empty(m)
    for start, stop in blocks(m, m):
        s = mask_self(logits(zs[start:stop], z), start)
        positive[start:stop] = s.gather(1, _positives(start, stop, m, z.device)[:, None]).squeeze(1)
        lse[start:stop] = row_logsumexp(s)
    return (lse - positive).mean(), lse, 1.0 / norms.clamp_min(NORM_EPS)


def ntxent_backward(
    grad: Tensor, z1: Tensor, z2: Tensor, tau: Tensor, sub_dim: int, normalize: bool, lse: Tensor, inv_norms: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    z, norms = _rows(z1, z2, sub_dim, normalize)
    zs = z / tau
    m = z.shape[0]
    dz = torch.empty_like(z)
    scale = grad.to(z.dtype) / (m * tau)
    for start, stop in blocks(m, m):
        s = mask_self(logits(zs[start:stop], z), start)
        # M·(G_Ij + G_jI) = softmax of row I at j + softmax of row j at I − 2·[j = pos(I)]
        g = torch.sub(s, lse[start:stop, None]).exp_()
        g += s.sub_(lse[None, :]).exp_()
        # Row I's positive is column I ± n: two diagonals of the tile (strided views, not an index_put_,
        # which PyTorch lists as nondeterministic on CUDA).
        n = m // 2
        g.diagonal(offset=start + n).sub_(2.0)
        g.diagonal(offset=start - n).sub_(2.0)
        dz[start:stop] = (g @ z) * scale
    gs = grad_dot_logits([(z, dz)], 2)
    dz = rows_backward(dz, z, norms)
    n = z1.shape[0]
    return full_gradient(dz[:n], z1), full_gradient(dz[n:], z2), gs
