"""The block primitive (docs/block-engine.md) as Triton kernels: A anchor rows × K key rows from two
tensors (any strides, first ``sub_dim`` features read in place), fused normalization through the given
inverse norms, every ``Layout.positives`` kind, ``self_offset`` and ``exclude_positives``; deterministic,
no atomics. The softmax epilogue only: ``epilogue="sigmoid"`` raises NotImplementedError.

Logits in base 2: every tile is t = (a·kᵀ)·(a_inv·log2 e/τ)·k_inv = s·log2 e — the row scale (with 1/τ and
log2 e folded in) is computed once per anchor block, so the element loop does one exp2 per element and
no division; lse and the positive sums return to natural units once per row (× ln 2).

Forward — one program per block of BLOCK_M anchors walks the key tiles: tile, positive weights P (index
compare, label compare or mask read; 0 on the self entry), Σ P·t and Σ P, then the online (max, sum) of
exp2 over the entries left in the denominator. Stores lse[A], pos_sum[A], pos_weight[A].

Backward — G_ac = alpha_a·exp(s_ac − lse_a) − beta_a·P_ac (0 on the self entry and padding; the
exponential term 0 on excluded entries), from the recomputed tile (the forward's helper and operand
order):
- anchor pass: a program owns BLOCK_M anchors × BLOCK_DO features of d_a and walks the key tiles:
  dâ += G·k̂ (k̂ = k·k_inv cast to the rows' dtype), ⟨â_a, dâ_a⟩ = Σ_c G_ac s_ac from the same tile;
- key pass: a program owns BLOCK_N keys × BLOCK_DO features of d_k and walks the anchor tiles:
  dk̂ += Gᵀ·â from the same tile q·kᵀ (the result is transposed, not the operands).
Both end with F.normalize's backward (``_common.store_row_gradient``). gs = Σ_ac G_ac s_ac is the torch
sum of the anchor pass's per-row sums (deterministic).

Example (CPU through ``TRITON_INTERPRET=1``, or CUDA tensors):
    >>> import os, torch
    >>> from fastcl._blocks import Layout
    >>> if os.environ.get("TRITON_INTERPRET") == "1":
    ...     a, k = torch.randn(5, 8), torch.randn(7, 8)
    ...     lse, pos_sum, pos_weight = block_forward(a, None, k, None, torch.tensor(0.5), 8,
    ...                                              Layout(positives="index", pos_index=torch.arange(5)))
    ...     print(lse.shape, pos_weight.tolist())
    ... else:
    ...     print(torch.Size([5]), [1.0] * 5)
    torch.Size([5]) [1.0, 1.0, 1.0, 1.0, 1.0]
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcl._blocks import Layout, accumulation_dtype
from fastcl.kernels._common import (
    PRUNE,
    CompileSpec,
    accumulator,
    autotune_configs,
    dot_precision,
    gradient_prescale,
    load_inverse_norms,
    mma,
    shape_bucket,
    similarity_tile,
    single_rows,
    store_row_gradient,
)

_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))
# Layout.positives → the kernels' POSITIVES constexpr.
_POSITIVES = {"none": 0, "index": 1, "labels": 2, "mask": 3}


@triton.jit
def _base2_tile(
    a_ptr, stride_am, stride_ad, rows, row_mask, row_scale, k_ptr, stride_km, stride_kd, cols, col_mask, col_scale, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """t = s·log2 e for anchors ``rows`` × keys ``cols``; row_scale = a_inv·log2 e/τ, col_scale = k_inv."""
    acc = similarity_tile(a_ptr, stride_am, stride_ad, rows, row_mask, k_ptr, stride_km, stride_kd, cols, col_mask,
                          D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
    return acc * row_scale[:, None] * col_scale[None, :]


@triton.jit
def _positive_weights(
    rows, row_mask, cols, col_mask, pos_rows, a_labels, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k,
    mask_rows, mask_cols, POSITIVES: tl.constexpr, ACC: tl.constexpr,
):
    """P for the tile (0 outside the valid keys); pos_rows / a_labels: the rows' index or label."""
    if POSITIVES == 1:
        p = tl.where(cols[None, :] == pos_rows[:, None], 1.0, 0.0).to(ACC)
    elif POSITIVES == 2:
        k_labels = tl.load(k_labels_ptr + cols, mask=col_mask, other=0)
        p = tl.where((a_labels[:, None] == k_labels[None, :]) & col_mask[None, :], 1.0, 0.0).to(ACC)
    elif POSITIVES == 3:
        # int64 offsets: an [N, N] mask passes 2³¹ elements at N ≈ 46 000.
        offsets = (rows % mask_rows).to(tl.int64)[:, None] * stride_mask_a \
            + (cols % mask_cols).to(tl.int64)[None, :] * stride_mask_k
        p = tl.load(mask_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0).to(ACC)
    else:
        p = tl.zeros((rows.shape[0], cols.shape[0]), dtype=ACC)
    return p


@triton.jit
def _row_positives(pos_index_ptr, a_labels_ptr, rows, row_mask, POSITIVES: tl.constexpr):
    """The rows' positive index (−1: none) and label, loaded once per anchor block (zeros when unused)."""
    if POSITIVES == 1:
        pos_rows = tl.load(pos_index_ptr + rows, mask=row_mask, other=-1)
    else:
        pos_rows = tl.zeros(rows.shape, dtype=tl.int64) - 1
    if POSITIVES == 2:
        a_labels = tl.load(a_labels_ptr + rows, mask=row_mask, other=0)
    else:
        a_labels = tl.zeros(rows.shape, dtype=tl.int64)
    return pos_rows, a_labels


@triton.jit
def _entry_masks(rows, cols, col_mask, p, self_offset, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr):
    """(p with the self entry zeroed, kept: a real, non-self entry, denominator: kept and in the sum)."""
    kept = tl.broadcast_to(col_mask[None, :], (rows.shape[0], cols.shape[0]))
    if HAS_SELF:
        not_self = cols[None, :] != rows[:, None] + self_offset
        kept = kept & not_self
        p = tl.where(not_self, p, 0.0)
    denominator = kept
    if EXCLUDE_POSITIVES:
        denominator = denominator & (p == 0.0)
    return p, kept, denominator


@triton.autotune(configs=autotune_configs("forward"),
                 key=["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE", "POSITIVES", "HAS_SELF", "EXCLUDE_POSITIVES"],
                 prune_configs_by=PRUNE)
@triton.jit
def _block_forward_kernel(
    a_ptr, stride_am, stride_ad, k_ptr, stride_km, stride_kd, a_inv_ptr, k_inv_ptr, tau_ptr,
    pos_index_ptr, a_labels_ptr, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k, mask_rows, mask_cols,
    self_offset, lse_ptr, pos_sum_ptr, pos_weight_ptr, A, K, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < A
    row_scale = load_inverse_norms(a_inv_ptr, rows, row_mask, NORMALIZE, ACC) * (_LOG2E / tl.load(tau_ptr))
    pos_rows, a_labels = _row_positives(pos_index_ptr, a_labels_ptr, rows, row_mask, POSITIVES)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    pos_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    pos_weight = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, K, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < K
        t = _base2_tile(a_ptr, stride_am, stride_ad, rows, row_mask, row_scale, k_ptr, stride_km, stride_kd, cols,
                        col_mask, load_inverse_norms(k_inv_ptr, cols, col_mask, NORMALIZE, ACC), D,
                        BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        p = _positive_weights(rows, row_mask, cols, col_mask, pos_rows, a_labels, k_labels_ptr, mask_ptr,
                              stride_mask_a, stride_mask_k, mask_rows, mask_cols, POSITIVES, ACC)
        p, kept, denominator = _entry_masks(rows, cols, col_mask, p, self_offset, HAS_SELF, EXCLUDE_POSITIVES)
        if POSITIVES != 0:
            pos_sum += tl.sum(p * t, axis=1)
            pos_weight += tl.sum(p, axis=1)
        t = tl.where(denominator, t, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(t, axis=1))
        # Rows with no entry yet keep max −inf; shift by 0 there so exp2(−inf − shift) = 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(tl.exp2(t - shift[:, None]), axis=1)
        running_max = new_max
    tl.store(lse_ptr + rows, (running_max + tl.log2(running_sum)) * _LN2, mask=row_mask)
    tl.store(pos_sum_ptr + rows, pos_sum * _LN2, mask=row_mask)
    tl.store(pos_weight_ptr + rows, pos_weight, mask=row_mask)


@triton.jit
def _gradient_tile(t, p, kept, denominator, lse2, alpha, beta):
    """G for the tile (base-2 logits t, lse2 = lse·log2 e; alpha 0 where lse = −inf)."""
    e = tl.where(denominator, tl.exp2(t - lse2[:, None]), 0.0)
    return tl.where(kept, alpha[:, None] * e - beta[:, None] * p, 0.0)


@triton.jit
def _row_coefficients(lse_ptr, alpha_ptr, beta_ptr, rows, row_mask):
    """(lse·log2 e, alpha, beta) of the rows; an anchor with lse = −inf (no entry anywhere) has no
    exponential term, so alpha = 0 and lse2 = 0 there (never exp2(+inf))."""
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    empty = lse == float("-inf")
    alpha = tl.where(empty, 0.0, tl.load(alpha_ptr + rows, mask=row_mask, other=0.0))
    beta = tl.load(beta_ptr + rows, mask=row_mask, other=0.0)
    return tl.where(empty, 0.0, lse * _LOG2E), alpha, beta


@triton.jit
def _scaled_slice(x_ptr, stride_m, stride_d, idx, mask, inv, out, out_mask, ACC: tl.constexpr):
    """x[idx, out]·inv[idx] (the normalized rows' output slice) in the rows' dtype: a GEMM operand."""
    x = tl.load(x_ptr + idx.to(tl.int64)[:, None] * stride_m + out[None, :] * stride_d,
                mask=mask[:, None] & out_mask[None, :], other=0.0)
    return (x.to(ACC) * inv[:, None]).to(x.dtype)


@triton.autotune(configs=autotune_configs("backward"),
                 key=["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE", "POSITIVES", "HAS_SELF", "EXCLUDE_POSITIVES"],
                 prune_configs_by=PRUNE)
@triton.jit
def _block_anchor_kernel(
    a_ptr, stride_am, stride_ad, k_ptr, stride_km, stride_kd, a_inv_ptr, k_inv_ptr, tau_ptr,
    pos_index_ptr, a_labels_ptr, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k, mask_rows, mask_cols,
    self_offset, lse_ptr, alpha_ptr, beta_ptr, da_ptr, radial_ptr, A, K, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, PRESCALE: tl.constexpr,
):
    """Anchor owner: d_a[rows, out] and radial[rows] = Σ_c G s = ⟨â, dâ⟩ (output slice 0 stores it)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < A
    out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out < D
    tau = tl.load(tau_ptr)
    a_inv = load_inverse_norms(a_inv_ptr, rows, row_mask, NORMALIZE, ACC)
    row_scale = a_inv * (_LOG2E / tau)
    pos_rows, a_labels = _row_positives(pos_index_ptr, a_labels_ptr, rows, row_mask, POSITIVES)
    lse2, alpha, beta = _row_coefficients(lse_ptr, alpha_ptr, beta_ptr, rows, row_mask)
    d_hat = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    radial = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, K, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < K
        k_inv = load_inverse_norms(k_inv_ptr, cols, col_mask, NORMALIZE, ACC)
        t = _base2_tile(a_ptr, stride_am, stride_ad, rows, row_mask, row_scale, k_ptr, stride_km, stride_kd, cols,
                        col_mask, k_inv, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        p = _positive_weights(rows, row_mask, cols, col_mask, pos_rows, a_labels, k_labels_ptr, mask_ptr,
                              stride_mask_a, stride_mask_k, mask_rows, mask_cols, POSITIVES, ACC)
        p, kept, denominator = _entry_masks(rows, cols, col_mask, p, self_offset, HAS_SELF, EXCLUDE_POSITIVES)
        g = _gradient_tile(t, p, kept, denominator, lse2, alpha, beta)
        radial += tl.sum(g * t, axis=1)
        k_hat = _scaled_slice(k_ptr, stride_km, stride_kd, cols, col_mask, k_inv, out, out_mask, ACC)
        d_hat = mma((g * PRESCALE).to(k_hat.dtype), k_hat, d_hat, PRECISION, ACC)
    radial *= _LN2
    if tl.program_id(1) == 0:
        tl.store(radial_ptr + rows, radial, mask=row_mask)
    store_row_gradient(single_rows(a_ptr, stride_am, stride_ad, A), single_rows(da_ptr, D, 1, A), rows, row_mask,
                       out, out_mask, a_inv, d_hat / (PRESCALE * tau), radial, NORMALIZE, ACC)


@triton.autotune(configs=autotune_configs("backward"),
                 key=["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE", "POSITIVES", "HAS_SELF", "EXCLUDE_POSITIVES"],
                 prune_configs_by=PRUNE)
@triton.jit
def _block_key_kernel(
    a_ptr, stride_am, stride_ad, k_ptr, stride_km, stride_kd, a_inv_ptr, k_inv_ptr, tau_ptr,
    pos_index_ptr, a_labels_ptr, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k, mask_rows, mask_cols,
    self_offset, lse_ptr, alpha_ptr, beta_ptr, dk_ptr, A, K, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, PRESCALE: tl.constexpr,
):
    """Key owner: d_k[cols, out] from Gᵀ·â over all anchor tiles (the anchor pass's tile, transposed)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < K
    out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out < D
    tau = tl.load(tau_ptr)
    k_inv = load_inverse_norms(k_inv_ptr, cols, col_mask, NORMALIZE, ACC)
    d_hat = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
    radial = tl.zeros((BLOCK_N,), dtype=ACC)
    for start in range(0, A, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < A
        a_inv = load_inverse_norms(a_inv_ptr, rows, row_mask, NORMALIZE, ACC)
        t = _base2_tile(a_ptr, stride_am, stride_ad, rows, row_mask, a_inv * (_LOG2E / tau), k_ptr, stride_km,
                        stride_kd, cols, col_mask, k_inv, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        pos_rows, a_labels = _row_positives(pos_index_ptr, a_labels_ptr, rows, row_mask, POSITIVES)
        p = _positive_weights(rows, row_mask, cols, col_mask, pos_rows, a_labels, k_labels_ptr, mask_ptr,
                              stride_mask_a, stride_mask_k, mask_rows, mask_cols, POSITIVES, ACC)
        p, kept, denominator = _entry_masks(rows, cols, col_mask, p, self_offset, HAS_SELF, EXCLUDE_POSITIVES)
        lse2, alpha, beta = _row_coefficients(lse_ptr, alpha_ptr, beta_ptr, rows, row_mask)
        g = tl.where(row_mask[:, None], _gradient_tile(t, p, kept, denominator, lse2, alpha, beta), 0.0)
        radial += tl.sum(g * t, axis=0)
        a_hat = _scaled_slice(a_ptr, stride_am, stride_ad, rows, row_mask, a_inv, out, out_mask, ACC)
        d_hat = mma(tl.trans(g * PRESCALE).to(a_hat.dtype), a_hat, d_hat, PRECISION, ACC)
    store_row_gradient(single_rows(k_ptr, stride_km, stride_kd, K), single_rows(dk_ptr, D, 1, K), cols, col_mask,
                       out, out_mask, k_inv, d_hat / (PRESCALE * tau), radial * _LN2, NORMALIZE, ACC)


# --- host side ------------------------------------------------------------------------------------------

def _check(a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor, sub_dim: int,
           layout: Layout) -> None:
    if a.dim() != 2 or k.dim() != 2:
        raise ValueError(f"a, k: expected 2-D [rows, D] tensors, got shapes {tuple(a.shape)} and {tuple(k.shape)}")
    if a.dtype != k.dtype:
        raise ValueError(f"k: expected the dtype of a ({a.dtype}), got {k.dtype}")
    if not 1 <= sub_dim <= min(a.shape[1], k.shape[1]):
        raise ValueError(f"sub_dim: expected 1 ≤ sub_dim ≤ {min(a.shape[1], k.shape[1])}, got {sub_dim}")
    if (a_inv is None) != (k_inv is None):
        raise ValueError("a_inv, k_inv: give both inverse norms or neither")
    if tau.dim() != 0:
        raise ValueError(f"tau: expected a 0-dim tensor, got shape {tuple(tau.shape)}")
    if layout.epilogue != "softmax":
        raise NotImplementedError(f"layout.epilogue={layout.epilogue!r}: the Triton block kernels implement the "
                                  "softmax epilogue only")


def _layout_args(layout: Layout, a: Tensor, k: Tensor, placeholder: Tensor) -> tuple[tuple, dict]:
    """(kernel arguments from pos_index to self_offset, layout constexprs). Absent tensors get a valid
    placeholder buffer the kernel never reads."""
    index = labels_a = labels_k = mask = placeholder
    stride_mask_a = stride_mask_k = 0
    mask_rows = mask_cols = 1
    if layout.positives == "index":
        index = layout.pos_index.to(device=a.device, dtype=torch.int64).contiguous()
        if index.shape != (a.shape[0],):
            raise ValueError(f"layout.pos_index: expected shape ({a.shape[0]},), got {tuple(index.shape)}")
    elif layout.positives == "labels":
        labels_a = layout.a_labels.to(device=a.device, dtype=torch.int64).contiguous()
        labels_k = layout.k_labels.to(device=a.device, dtype=torch.int64).contiguous()
        if labels_a.shape != (a.shape[0],) or labels_k.shape != (k.shape[0],):
            raise ValueError(f"layout.a_labels, layout.k_labels: expected shapes ({a.shape[0]},) and "
                             f"({k.shape[0]},), got {tuple(labels_a.shape)} and {tuple(labels_k.shape)}")
    elif layout.positives == "mask":
        mask = layout.mask
        if mask.dim() != 2 or mask.device != a.device:
            raise ValueError(f"layout.mask: expected a 2-D tensor on {a.device}, got shape {tuple(mask.shape)} "
                             f"on {mask.device}")
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        stride_mask_a, stride_mask_k = mask.stride()
        mask_rows, mask_cols = mask.shape
    has_self = layout.self_offset is not None
    args = (index, labels_a, labels_k, mask, stride_mask_a, stride_mask_k, mask_rows, mask_cols,
            layout.self_offset if has_self else 0)
    return args, dict(POSITIVES=_POSITIVES[layout.positives], HAS_SELF=has_self,
                      EXCLUDE_POSITIVES=layout.exclude_positives)


def _row_args(a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor) -> tuple:
    # Without normalization the kernels never read the inverse norms; they get a valid buffer instead.
    norms = (a_inv, k_inv) if a_inv is not None else (tau, tau)
    return (a, a.stride(0), a.stride(1), k, k.stride(0), k.stride(1), *norms, tau)


def block_forward(
    a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor, sub_dim: int, layout: Layout
) -> tuple[Tensor, Tensor, Tensor]:
    """(lse[A], pos_sum[A], pos_weight[A]) of one block, in the accumulation dtype (docs/block-engine.md).

    Args:
        a, k: [A, D] anchor rows and [K, D] key rows (same dtype, any strides; the first sub_dim features).
        a_inv, k_inv: [A] / [K] inverse norms in the accumulation dtype, or both None (no normalization).
        tau: 0-dim temperature tensor (accumulation dtype).
        sub_dim: features used (1 ≤ sub_dim ≤ D).
        layout: positives, self entry and exclusions of the block.

    Returns:
        lse (−inf for an anchor the block leaves nothing), pos_sum = Σ_c P s, pos_weight = Σ_c P.

    Raises:
        ValueError: inconsistent shapes, dtypes or layout tensors (named in the message).
        NotImplementedError: the sigmoid epilogue.
    """
    _check(a, a_inv, k, k_inv, tau, sub_dim, layout)
    n_anchors, n_keys = a.shape[0], k.shape[0]
    acc = accumulation_dtype(a.dtype)
    lse, pos_sum, pos_weight = (torch.empty(n_anchors, dtype=acc, device=a.device) for _ in range(3))
    layout_args, flags = _layout_args(layout, a, k, tau)
    _block_forward_kernel[lambda meta: (triton.cdiv(n_anchors, meta["BLOCK_M"]),)](
        *_row_args(a, a_inv, k, k_inv, tau), *layout_args, lse, pos_sum, pos_weight, n_anchors, n_keys, sub_dim,
        shape_bucket(max(n_anchors, n_keys)),
        NORMALIZE=a_inv is not None, PRECISION=dot_precision(a.dtype), ACC=accumulator(a.dtype), **flags,
    )
    return lse, pos_sum, pos_weight


def block_backward(
    a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor, sub_dim: int,
    layout: Layout, lse: Tensor, alpha: Tensor, beta: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_a [A, sub_dim], d_k [K, sub_dim], gs) of one block: gradients with respect to the RAW rows for
    G_ac = alpha_a·exp(s_ac − lse_a) − beta_a·P_ac, and gs = Σ G·s (docs/block-engine.md).

    Args:
        a, a_inv, k, k_inv, tau, sub_dim, layout: as in :func:`block_forward`.
        lse: [A] GLOBAL per-anchor log-sum-exp (accumulation dtype).
        alpha, beta: [A] per-anchor coefficients (accumulation dtype).

    Returns:
        d_a, d_k in the accumulation dtype and gs, a 0-dim tensor.

    Raises:
        ValueError / NotImplementedError: as :func:`block_forward`; lse/alpha/beta of the wrong shape.
    """
    _check(a, a_inv, k, k_inv, tau, sub_dim, layout)
    n_anchors, n_keys = a.shape[0], k.shape[0]
    for name, vector in (("lse", lse), ("alpha", alpha), ("beta", beta)):
        if vector.shape != (n_anchors,):
            raise ValueError(f"{name}: expected shape ({n_anchors},), got {tuple(vector.shape)}")
    acc = accumulation_dtype(a.dtype)
    lse, alpha, beta = (v.to(acc).contiguous() for v in (lse, alpha, beta))
    d_a = torch.empty(n_anchors, sub_dim, dtype=acc, device=a.device)
    d_k = torch.empty(n_keys, sub_dim, dtype=acc, device=a.device)
    radial = torch.empty(n_anchors, dtype=acc, device=a.device)
    layout_args, flags = _layout_args(layout, a, k, tau)
    meta = dict(NORMALIZE=a_inv is not None, PRECISION=dot_precision(a.dtype), ACC=accumulator(a.dtype),
                PRESCALE=gradient_prescale(a.dtype), **flags)
    rows, bucket = _row_args(a, a_inv, k, k_inv, tau), shape_bucket(max(n_anchors, n_keys))
    _block_anchor_kernel[lambda m: (triton.cdiv(n_anchors, m["BLOCK_M"]), triton.cdiv(sub_dim, m["BLOCK_DO"]))](
        *rows, *layout_args, lse, alpha, beta, d_a, radial, n_anchors, n_keys, sub_dim, bucket, **meta)
    _block_key_kernel[lambda m: (triton.cdiv(n_keys, m["BLOCK_N"]), triton.cdiv(sub_dim, m["BLOCK_DO"]))](
        *rows, *layout_args, lse, alpha, beta, d_k, n_anchors, n_keys, sub_dim, bucket, **meta)
    return d_a, d_k, radial.sum()


def compile_specs(dtype: torch.dtype, precision: str, sub_dim: int, n: int = 4096) -> list[CompileSpec]:
    """The three block kernels for the compile-only report: contiguous [n, sub_dim] anchors and keys,
    normalized, self entry, with labels (SupCon's gather block) and with a positive index (NT-Xent's)."""
    acc = accumulation_dtype(dtype)
    a, k = (torch.empty(n, sub_dim, dtype=dtype) for _ in range(2))
    vector = lambda: torch.empty(n, dtype=acc)  # noqa: E731
    tau = torch.empty((), dtype=acc)
    rows = (a, a.stride(0), a.stride(1), k, k.stride(0), k.stride(1), vector(), vector(), tau)
    specs = []
    for name, layout in (("index", Layout(positives="index", self_offset=0, pos_index=torch.empty(n, dtype=torch.int64))),
                         ("labels", Layout(positives="labels", self_offset=0, a_labels=torch.empty(n, dtype=torch.int64),
                                           k_labels=torch.empty(n, dtype=torch.int64)))):
        layout_args, flags = _layout_args(layout, a, k, tau)
        common = dict(NORMALIZE=True, PRECISION=precision, ACC=accumulator(dtype), **flags)
        backward = dict(common, PRESCALE=gradient_prescale(dtype))
        coefficients = (vector(), vector(), vector())
        specs += [
            CompileSpec(f"block_{name}_forward", "forward", _block_forward_kernel.fn,
                        (*rows, *layout_args, vector(), vector(), vector(), n, n, sub_dim, shape_bucket(n)), common),
            CompileSpec(f"block_{name}_anchor", "backward", _block_anchor_kernel.fn,
                        (*rows, *layout_args, *coefficients, torch.empty(n, sub_dim, dtype=acc), vector(), n, n,
                         sub_dim, shape_bucket(n)), backward),
            CompileSpec(f"block_{name}_key", "backward", _block_key_kernel.fn,
                        (*rows, *layout_args, *coefficients, torch.empty(n, sub_dim, dtype=acc), n, n, sub_dim,
                         shape_bucket(n)), backward),
        ]
    return specs
