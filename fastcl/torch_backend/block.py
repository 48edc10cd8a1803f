"""The block primitive on the torch backend: the readable reference of docs/block-engine.md.

One block is A anchor rows × K key rows. Anchors are walked in chunks of ``chunk_rows(K)`` rows, so the
largest temporary is a few chunk × K tiles in the accumulation dtype; the key rows are copied once into
the accumulation dtype (this backend's working set; the fused backends read them in place).

    >>> import torch
    >>> from fastcl.contract import Layout, inverse_norms
    >>> a, k = torch.randn(3, 8), torch.randn(5, 8)
    >>> tau = torch.tensor(0.5)
    >>> lse, pos_sum, pos_weight = block_forward(a, inverse_norms(a, 8), k, inverse_norms(k, 8), tau, 8, Layout())
    >>> lse.shape, bool(pos_weight.eq(0).all())
    (torch.Size([3]), True)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl.contract import NORM_EPS, Layout, accumulation_dtype
from fastcl.torch_backend._tiles import blocks

__all__ = ["block_forward", "block_backward", "SUPPORTS_OWN_BLOCK"]

SUPPORTS_OWN_BLOCK = True  # block_backward honours Layout.own_block (one tile per chunk, d_k None)


def _unit_rows(x: Tensor, inv: Optional[Tensor], sub_dim: int) -> Tensor:
    """x[:, :sub_dim] in the accumulation dtype, times its inverse norms when given."""
    rows = x[:, :sub_dim].to(accumulation_dtype(x.dtype))
    return rows if inv is None else rows * inv[:, None]


def _positive_weights(layout: Layout, anchors: slice, keys: slice, like: Tensor) -> Optional[Tensor]:
    """P for the ``anchors`` × ``keys`` entries of the block (self entry cleared), or None when it has none."""
    device = like.device
    if layout.positives == "none":
        return None
    a_rows = torch.arange(anchors.start, anchors.stop, device=device)
    k_rows = torch.arange(keys.start, keys.stop, device=device)
    if layout.positives == "index":
        p = layout.pos_index[anchors, None] == k_rows[None, :]
    elif layout.positives == "labels":
        p = layout.a_labels[anchors, None] == layout.k_labels[None, keys]
    else:
        na, nk = layout.mask.shape
        p = layout.mask[a_rows % na][:, k_rows % nk]
    p = p.to(like.dtype)
    if layout.self_offset is not None:
        p.diagonal(offset=anchors.start + layout.self_offset - keys.start).zero_()
    return p


def _exclude_(layout: Layout, x: Tensor, p: Optional[Tensor], self_diagonal: int, value: float) -> Tensor:
    """Sets the entries left out of the denominator to ``value`` in place: the self entry (the diagonal
    ``self_diagonal`` of the tile), and the positives when ``exclude_positives``."""
    if layout.exclude_positives and p is not None:
        x.masked_fill_(p != 0, value)
    if layout.self_offset is not None:
        x.diagonal(offset=self_diagonal).fill_(value)
    return x


def _tile(layout, a_hat, k_hat, tau, start, stop):
    """Logits and positive weights of anchors start..stop against every key, and the tile's self diagonal."""
    s = (a_hat[start:stop] / tau) @ k_hat.T
    p = _positive_weights(layout, slice(start, stop), slice(0, k_hat.shape[0]), s)
    return s, p, start + (layout.self_offset or 0)


def _bias(layout: Layout, like: Tensor) -> Tensor:
    return like.new_zeros(()) if layout.bias is None else layout.bias.to(like.dtype)


def block_forward(
    a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor, sub_dim: int, layout: Layout
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-anchor statistics of one block: (lse[A], pos_sum[A], pos_weight[A]).

    Args:
        a, k: anchor rows [A, D] and key rows [K, D] (any strides, same floating dtype).
        a_inv, k_inv: inverse norms [A] / [K] in the accumulation dtype, or None (no normalization).
        tau: 0-dim temperature tensor in the accumulation dtype.
        sub_dim: the number of leading features used.
        layout: positives and exclusions of the block.

    Returns:
        softmax epilogue: log Σ exp(s) over the entries not excluded (−inf if none); sigmoid epilogue:
        Σ softplus(s + b) over them. Then Σ_c P_ac s_ac and Σ_c P_ac. All in the accumulation dtype.
    """
    a_hat, k_hat = _unit_rows(a, a_inv, sub_dim), _unit_rows(k, k_inv, sub_dim)
    n_anchors = a_hat.shape[0]
    stat, pos_sum, pos_weight = (a_hat.new_zeros(n_anchors) for _ in range(3))
    bias = _bias(layout, a_hat)
    for start, stop in blocks(n_anchors, k_hat.shape[0]):
        s, p, self_diagonal = _tile(layout, a_hat, k_hat, tau, start, stop)
        if p is not None:
            pos_sum[start:stop] = (p * s).sum(dim=1)
            pos_weight[start:stop] = p.sum(dim=1)
        if layout.epilogue == "sigmoid":
            per_pair = torch.logaddexp(s + bias, torch.zeros_like(s))  # softplus, exact for any |s + b|
            stat[start:stop] = _exclude_(layout, per_pair, p, self_diagonal, 0.0).sum(dim=1)
        else:
            stat[start:stop] = torch.logsumexp(_exclude_(layout, s, p, self_diagonal, float("-inf")), dim=1)
    return stat, pos_sum, pos_weight


def _raw_gradient(d_hat: Tensor, hat: Tensor, inv: Optional[Tensor]) -> Tensor:
    """dL/dz from dL/dẑ for ẑ = z·inv: inv·(dẑ − ẑ⟨ẑ, dẑ⟩); only inv·dẑ where the norm was clamped."""
    if inv is None:
        return d_hat
    radial = torch.where(inv < 1.0 / NORM_EPS, (hat * d_hat).sum(dim=1), 0.0)
    return (d_hat - hat * radial[:, None]) * inv[:, None]


def _gradient_tile(layout, s, p, self_diagonal, bias, finite_lse, alpha, beta) -> Tensor:
    """G of one tile from its logits: alpha·exp(s − lse) (sigmoid: alpha·σ(s + b)), 0 on excluded entries,
    minus beta·P. ``finite_lse``, ``alpha``, ``beta`` broadcast over the tile's anchor axis."""
    g = torch.sigmoid(s + bias) if layout.epilogue == "sigmoid" else torch.sub(s, finite_lse).exp_()
    _exclude_(layout, g, p, self_diagonal, 0.0).mul_(alpha)
    return g if p is None else g.sub_(beta * p)


def block_backward(
    a: Tensor,
    a_inv: Optional[Tensor],
    k: Tensor,
    k_inv: Optional[Tensor],
    tau: Tensor,
    sub_dim: int,
    layout: Layout,
    lse: Tensor,
    alpha: Tensor,
    beta: Tensor,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Gradients of one block given the global per-anchor statistics.

    With G_ac = alpha_a·exp(s_ac − lse_a) − beta_a·P_ac (sigmoid epilogue: alpha_a·σ(s_ac + b) − beta_a·P_ac;
    0 on excluded entries' first term and on the self entry), dâ = G k̂/τ and dk̂ = Gᵀ â/τ.

    ``layout.own_block`` (the keys are the anchors): one recomputed tile of anchors r against all rows c
    gives both G_rc (the anchor side) and, since s_cr = s_rc, G_cr (the key side, read with the
    statistics of row c), so each chunk owns its rows' whole gradient: 3 GEMM-units instead of 4.

    Args:
        a, a_inv, k, k_inv, tau, sub_dim, layout: as :func:`block_forward`.
        lse: [A] the anchors' merged statistic over all blocks (unused by the sigmoid epilogue).
        alpha, beta: [A] per-anchor coefficients (accumulation dtype).

    Returns:
        (d_a [A, sub_dim], d_k [K, sub_dim] or None for an own block, gs): gradients with respect to the
        raw rows' prefix in the accumulation dtype (an own block's d_a is the rows' whole gradient), and
        gs = Σ G·s (0-dim; the sigmoid epilogue returns [Σ G·s, Σ G]).
    """
    a_hat, k_hat = _unit_rows(a, a_inv, sub_dim), _unit_rows(k, k_inv, sub_dim)
    n_anchors = a_hat.shape[0]
    d_a_hat = torch.empty_like(a_hat)
    d_k_hat = None if layout.own_block else torch.zeros_like(k_hat)
    gs = a_hat.new_zeros(2 if layout.epilogue == "sigmoid" else 1)
    bias = _bias(layout, a_hat)
    # An anchor that the block leaves nothing has lse = −inf; its excluded entries must give exp(−inf) = 0.
    finite_lse = torch.where(torch.isneginf(lse), 0.0, lse)
    every = slice(0, n_anchors)
    for start, stop in blocks(n_anchors, k_hat.shape[0]):
        s, p, self_diagonal = _tile(layout, a_hat, k_hat, tau, start, stop)
        rows = slice(start, stop)
        g = _gradient_tile(
            layout, s, p, self_diagonal, bias, finite_lse[rows, None], alpha[rows, None], beta[rows, None]
        )
        if layout.epilogue == "sigmoid":
            gs[1] += g.sum()
        if layout.own_block:
            # G_cr for every row c (as anchor) and the chunk's rows r (as keys), laid out [r, c]; there the
            # self entry (c + self_offset = r) is the diagonal start − self_offset.
            p_t = _positive_weights(layout, every, rows, s)
            g += _gradient_tile(
                layout, s, None if p_t is None else p_t.T, start - (layout.self_offset or 0), bias, finite_lse[None, :],
                alpha[None, :], beta[None, :],
            )  # fmt: skip
        else:
            d_k_hat += g.T @ a_hat[rows] / tau
        d_a_hat[rows] = g @ k_hat / tau
    # Σ_ac G_ac s_ac = Σ_a ⟨â_a, (G k̂)_a⟩/τ: O(A·D') instead of a pass over the tiles; an own block's
    # d_a holds G and Gᵀ, so there every entry is counted twice.
    gs[0] = (a_hat * d_a_hat).sum() / (2 if layout.own_block else 1)
    d_a = _raw_gradient(d_a_hat, a_hat, a_inv)
    d_k = None if layout.own_block else _raw_gradient(d_k_hat, k_hat, k_inv)
    return d_a, d_k, gs if layout.epilogue == "sigmoid" else gs[0]
