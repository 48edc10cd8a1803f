"""NT-Xent (docs/spec.md) as fused Triton kernels on the block loop (kernels/block.py): O(M) memory,
deterministic backward, no atomics.

Rows are Z = [z1; z2] (M = 2N), pos(i) = (i + N) mod M. Each launch takes the anchors of one view, read
in place through their own strides (first D' = ``sub_dim`` features): the same view's rows are keys with
a self entry at the same index, the other view's rows are keys whose row at the same index is the
positive. Two launches per pass (view 1, view 2), no stacked-row pointer selects. With ``normalize`` a
pre-pass stores r_i = 1/max(‖z_i[:D']‖, 1e-12) (O(M·D'), ``_common.inverse_norms``).

Logits in base 2 as in the block loop: u = (z_i·z_j)·r_j per element; the row scale c_i = r_i·log2 e/τ
enters each exp2's FFMA, so t = u·c_i = s·log2 e is never a separate multiply.

Forward — one program per block of BLOCK_M anchors folds the own view's key tiles (self entry in the few
masked tiles) and the other view's (``block._fold_keys``: steady tiles without masks, pointers moved by
one scalar offset per tile), then s_{i,pos(i)} as one row dot outside the loop. Stores lse[M] and the
positive logits; the loss is the torch mean of ``lse − positive`` (deterministic).

Backward — with G = ∂L/∂S (symmetric positions, M·G_ij = softmax_i(j) − 1[j = pos(i)]),
    T_ij = M·(G_ij + G_ji) = 2^{t_ij − L_i} + 2^{t_ij − L_j} − 2·1[j = pos(i)]   (L = lse·log2 e)
    dẑ_i = Σ_j T_ij r_j z_j / (M τ),   c_i = ⟨ẑ_i, dẑ_i⟩ = Σ_j T_ij s_ij / M,   dz_i = r_i (dẑ_i − c_i r_i z_i)
from ONE recomputed tile per (anchor block, key tile): both exponentials come from the same u, so one
GEMM-unit of recompute and one of dZ cover the whole symmetric gradient. The partner's −2 is a gather
after the loop (its logit a row dot), not a compare per element. Each program owns BLOCK_M rows ×
BLOCK_DO output features of its view's gradient and writes them once; programs of output slice 0 also
store c (Σ_i c_i / 2 = Σ_ij G_ij s_ij is what dL/dτ needs). Wider D' re-walks the tiles once per slice.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fastcl.kernels._common import (
    CompileSpec,
    accumulator,
    autotune_configs,
    dot_precision,
    example_rows,
    finish_row_gradient,
    gradient_prescale,
    inverse_norms,
    load_inverse_norms,
    pair_rows,
    prune,
    shape_bucket,
    single_rows,
    stride_offsets,
)
from fastcl.kernels.block import (
    _EVEN_FEATURES,
    _LN2,
    _LOG2E,
    _fold_keys,
    _index_positive,
    _load_slice,
    _symmetric_keys,
)
from fastcl.ops import accumulation_dtype

_KEY = ["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE"]


@triton.autotune(configs=autotune_configs("block_forward"), key=_KEY, prune_configs_by=prune("block_forward"))
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _ntxent_forward_kernel(
    a_ptr, stride_am, stride_ad, b_ptr, stride_bm, stride_bd, inv_ptr, own_start, other_start, tau_ptr,
    lse_ptr, positive_ptr, N, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Anchors a[rows] (stacked rows own_start + rows); keys: a itself (self entry), then b (the positive)."""
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    a_inv_ptr = inv_ptr + own_start
    b_inv_ptr = inv_ptr + other_start
    row_scale = load_inverse_norms(a_inv_ptr, rows, row_mask, NORMALIZE, ACC) * (_LOG2E / tl.load(tau_ptr))
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + stride_offsets(tl.arange(0, BLOCK_D), stride_ad)[None, :]
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    unused = tl.zeros((BLOCK_M,), dtype=ACC)  # the fold's positive sums: NT-Xent's positive is a row dot
    no_labels = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for view in tl.static_range(2):
        if view == 0:
            k_ptr, stride_km, k_inv_ptr = a_ptr, stride_am, a_inv_ptr
        else:
            k_ptr, stride_km, k_inv_ptr = b_ptr, stride_bm, b_inv_ptr
        # The feature stride is passed, not assigned: an assignment turns a specialized unit stride into a
        # tensor (``_common.stride_offsets`` would then widen contiguous offsets).
        running_max, running_sum, unused, unused = _fold_keys(
            running_max, running_sum, unused, unused, first_row, a_ptrs, k_ptr, stride_km,
            stride_ad if view == 0 else stride_bd, k_inv_ptr,
            rows, row_mask, row_scale, no_labels, no_labels, tau_ptr, tau_ptr, 0, 0, 1, 1, 0, 0.0, N, D, stride_ad,
            NORMALIZE, 0, view == 0, False, False, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION, ACC)
    positive, _ = _index_positive(a_ptr, stride_am, stride_ad, b_ptr, stride_bm, stride_bd, b_inv_ptr, rows,
                                  row_mask, row_scale, rows, 0, D, NORMALIZE, False, BLOCK_M, BLOCK_D, ACC)
    tl.store(lse_ptr + own_start + rows, (running_max * row_scale + tl.log2(running_sum)) * _LN2, mask=row_mask)
    tl.store(positive_ptr + own_start + rows, positive * _LN2, mask=row_mask)


@triton.autotune(configs=autotune_configs("symmetric_backward"), key=_KEY, prune_configs_by=prune("symmetric_backward"))
@_EVEN_FEATURES
@triton.jit
def _ntxent_backward_kernel(
    a_ptr, stride_am, stride_ad, b_ptr, stride_bm, stride_bd, da_ptr, stride_dam, stride_dad,
    inv_ptr, own_start, other_start, tau_ptr, lse2_ptr, scale_ptr, radial_scale_ptr, radial_ptr, N, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DO: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, PRESCALE: tl.constexpr, SCALE_OPERAND: tl.constexpr,
):
    """dz of the anchors a[rows] (stacked rows own_start + rows), features ``out``, into da; lse2 = lse·log2 e."""
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out < D
    a_inv_ptr = inv_ptr + own_start
    b_inv_ptr = inv_ptr + other_start
    inv_rows = load_inverse_norms(a_inv_ptr, rows, row_mask, NORMALIZE, ACC)
    row_scale = inv_rows * (_LOG2E / tl.load(tau_ptr))
    lse2_rows = tl.load(lse2_ptr + own_start + rows, mask=row_mask, other=0.0)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + stride_offsets(tl.arange(0, BLOCK_D), stride_ad)[None, :]
    d_hat = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    radial = tl.zeros((BLOCK_M,), dtype=ACC)
    for view in tl.static_range(2):
        if view == 0:  # the own view: self entries at the same index
            k_ptr, stride_km, k_start, self_offset = a_ptr, stride_am, own_start, 0
        else:  # the other view: no self entry (an offset of N is out of range)
            k_ptr, stride_km, k_start, self_offset = b_ptr, stride_bm, other_start, N
        d_hat, radial = _symmetric_keys(  # the feature stride passed, not assigned (see the forward)
            d_hat, radial, first_row, a_ptrs, k_ptr, stride_km, stride_ad if view == 0 else stride_bd,
            inv_ptr + k_start, lse2_ptr + k_start,
            tau_ptr, rows, row_mask, row_scale, lse2_rows, row_scale, tau_ptr, 0, 0, self_offset, N, D, stride_ad,
            out, out_mask, NORMALIZE, 0, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, EVEN_DO, PRECISION, ACC, PRESCALE,
            SCALE_OPERAND)
    # The partner's −2: ẑ_pos(i) gathered once, its logit a row dot (both outside the element loop).
    positive, _ = _index_positive(a_ptr, stride_am, stride_ad, b_ptr, stride_bm, stride_bd, b_inv_ptr, rows,
                                  row_mask, row_scale, rows, 0, D, NORMALIZE, False, BLOCK_M, BLOCK_D, ACC)
    partner = _load_slice(b_ptr + rows.to(tl.int64)[:, None] * stride_bm + stride_offsets(out, stride_bd)[None, :],
                          row_mask, out_mask, True, EVEN_DO).to(ACC)
    partner *= load_inverse_norms(b_inv_ptr, rows, row_mask, NORMALIZE, ACC)[:, None]
    d_hat -= (2.0 * PRESCALE) * partner
    radial = (radial * row_scale - 2.0 * positive) * _LN2
    finish_row_gradient(single_rows(a_ptr, stride_am, stride_ad, N), single_rows(da_ptr, stride_dam, stride_dad, N),
                        rows, row_mask, out, out_mask, inv_rows, d_hat, radial, scale_ptr, radial_scale_ptr,
                        radial_ptr + own_start, NORMALIZE, ACC)


def _views(z1: Tensor, z2: Tensor):
    """(anchors, other view, own stacked start, other stacked start) for the two launches of a pass."""
    n = z1.shape[0]
    return ((z1, z2, 0, n), (z2, z1, n, 0))


def _strided(x: Tensor) -> tuple:
    return x, x.stride(0), x.stride(1)


def ntxent_forward(z1: Tensor, z2: Tensor, tau: Tensor, sub_dim: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    n, acc = z1.shape[0], accumulation_dtype(z1.dtype)
    m = 2 * n
    inv = inverse_norms(pair_rows(z1, z2), m, sub_dim) if normalize else torch.empty(0, dtype=acc, device=z1.device)
    lse = torch.empty(m, dtype=acc, device=z1.device)
    positive = torch.empty(m, dtype=acc, device=z1.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
    for a, b, own, other in _views(z1, z2):
        # Without normalization the kernel never reads the inverse norms; it gets a valid buffer instead.
        _ntxent_forward_kernel[grid](
            *_strided(a), *_strided(b), inv if normalize else tau, own, other, tau, lse, positive, n, sub_dim,
            shape_bucket(m), NORMALIZE=normalize, PRECISION=dot_precision(z1.dtype), ACC=accumulator(z1.dtype),
        )
    return (lse - positive).mean(), lse, inv


@triton_op("fastcl::triton_ntxent_backward", mutates_args=())
def ntxent_backward(
    grad: Tensor, z1: Tensor, z2: Tensor, tau: Tensor, sub_dim: int, normalize: bool, lse: Tensor, inv_norms: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dz1, dL/dz2) shaped like the inputs (exactly zero beyond sub_dim) and Σ_ij G_ij s_ij."""
    n = z1.shape[0]
    m = 2 * n
    prescale = gradient_prescale(z1.dtype)
    grad = grad.to(tau.dtype)
    scale = (grad / (m * tau * prescale)).reshape(())
    radial_scale = (grad / m).reshape(())
    # The kernel writes the first sub_dim features; the rest of each row stays exactly zero.
    new = torch.zeros if sub_dim < z1.shape[1] else torch.empty
    dz1 = new(z1.shape, dtype=z1.dtype, device=z1.device)
    dz2 = new(z2.shape, dtype=z2.dtype, device=z2.device)
    radial = torch.empty(m, dtype=tau.dtype, device=z1.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(sub_dim, meta["BLOCK_DO"]))  # noqa: E731
    lse2 = lse * math.log2(math.e)
    for (a, b, own, other), da in zip(_views(z1, z2), (dz1, dz2)):
        wrap_triton(_ntxent_backward_kernel)[grid](
            *_strided(a), *_strided(b), *_strided(da), inv_norms if normalize else tau, own, other, tau, lse2, scale,
            radial_scale, radial, n, sub_dim, shape_bucket(m),
            NORMALIZE=normalize, PRECISION=dot_precision(z1.dtype), ACC=accumulator(z1.dtype), PRESCALE=prescale,
            SCALE_OPERAND=z1.dtype == torch.float16,
        )
    return dz1, dz2, radial.sum() / 2


def compile_specs(dtype: torch.dtype, precision: str, sub_dim: int, n: int = 2048,
                  layout: str = "contiguous") -> list[CompileSpec]:
    """The forward and backward kernels as launched on [n, sub_dim] rows in ``layout`` (normalized; view 1)."""
    acc = accumulation_dtype(dtype)
    z1, z2 = (example_rows((n, sub_dim), dtype, layout) for _ in range(2))
    vector = lambda: torch.empty(2 * n, dtype=acc)  # noqa: E731
    tau = torch.empty((), dtype=acc)
    common = dict(NORMALIZE=True, PRECISION=precision, ACC=accumulator(dtype))
    forward = (*_strided(z1), *_strided(z2), vector(), 0, n, tau, vector(), vector(), n, sub_dim, shape_bucket(2 * n))
    gradient = torch.empty(z1.shape, dtype=dtype)  # allocated contiguous by the op
    backward = (*_strided(z1), *_strided(z2), *_strided(gradient), vector(), 0, n, tau, vector(), tau, tau, vector(), n,
                sub_dim, shape_bucket(2 * n))
    return [
        CompileSpec("ntxent_forward", "block_forward", _ntxent_forward_kernel.fn, forward, common),
        CompileSpec("ntxent_backward", "symmetric_backward", _ntxent_backward_kernel.fn, backward,
                    dict(common, PRESCALE=gradient_prescale(dtype), SCALE_OPERAND=dtype == torch.float16)),
    ]
