"""NT-Xent (docs/spec.md) as fused Triton kernels: O(M) memory, deterministic backward, no atomics.

Rows are Z = [z1; z2] (M = 2N), pos(i) = (i + N) mod M, read in place: row i < N from z1, else z2 row
i − N, each through its own strides, first D' = ``sub_dim`` features only (see ``_common.pair_rows``).
With ``normalize`` a pre-pass stores r_i = 1/max(‖z_i[:D']‖, 1e-12) (O(M·D'), ``_common.inverse_norms``);
the tiles use the raw rows, s_ij = (z_i·z_j)·r_i·r_j/τ (r = 1 without normalization).

Forward — one program per block of BLOCK_M anchor rows walks all column tiles: S tile, self-mask,
online running max and sum, and picks s_{i,pos(i)} from the tile that holds it. It stores lse[M] and
the positive logits; the loss is the torch mean of ``lse − positive`` (deterministic).

Backward — with G = ∂L/∂S (symmetric positions, M·G_ij = softmax_i(j) − 1[j = pos(i)]),
    T_ij = M·(G_ij + G_ji) = e^{s_ij − lse_i} + e^{s_ij − lse_j} − 2·1[j = pos(i)]
    dẑ_i = Σ_j T_ij r_j z_j / (M τ),   c_i = ⟨ẑ_i, dẑ_i⟩ = Σ_j T_ij s_ij / M,   dz_i = r_i (dẑ_i − c_i r_i z_i)
All from ONE recomputed tile (the forward's helper, operands and precision; the backward's own autotuned
tile config, so the last bits of s may differ from the forward's) and the stored
lse of the rows and columns; one GEMM multiplies T (columns scaled by r_j) by the raw z_J. Each program
owns BLOCK_M rows × BLOCK_DO output features of dz1/dz2 and writes them once; programs of output slice
0 also store c (Σ_i c_i / 2 = Σ_ij G_ij s_ij is what dL/dτ needs). For D' ≤ BLOCK_DO that is 3 GEMM-units
in total (forward, recompute, dZ); wider D' re-walks the tiles once per BLOCK_DO slice.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fastcl.kernels._common import (
    CompileSpec,
    accumulate_gradient_tile,
    accumulator,
    autotune_configs,
    dot_precision,
    finish_logsumexp,
    finish_row_gradient,
    gradient_prescale,
    inverse_norms,
    load_inverse_norms,
    online_logsumexp,
    pair_rows,
    prune,
    shape_bucket,
    stacked_logits,
)
from fastcl.ops import accumulation_dtype


@triton.autotune(configs=autotune_configs("forward"), key=["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE"],
                 prune_configs_by=prune("forward"))
@triton.jit
def _ntxent_forward_kernel(
    z1_ptr, stride_1m, stride_1d, z2_ptr, stride_2b, stride_2m, stride_2d, N,
    inv_ptr, tau_ptr, lse_ptr, positive_ptr, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    z = (z1_ptr, stride_1m, stride_1d, z2_ptr, stride_2b, stride_2m, stride_2d, N)
    M = 2 * N
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    partner = (rows + N) % M
    row_scale = load_inverse_norms(inv_ptr, rows, row_mask, NORMALIZE, ACC) / tl.load(tau_ptr)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    positive = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, M, BLOCK_N):
        cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_mask = cols < M
        s = stacked_logits(z, rows, row_mask, row_scale, cols, col_mask,
                           load_inverse_norms(inv_ptr, cols, col_mask, NORMALIZE, ACC), D,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        positive += tl.sum(tl.where(cols[None, :] == partner[:, None], s, 0.0), axis=1)
        s = tl.where(col_mask[None, :] & (cols[None, :] != rows[:, None]), s, float("-inf"))
        running_max, running_sum = online_logsumexp(running_max, running_sum, s)
    tl.store(lse_ptr + rows, finish_logsumexp(running_max, running_sum), mask=row_mask)
    tl.store(positive_ptr + rows, positive, mask=row_mask)


@triton.autotune(configs=autotune_configs("backward"), key=["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE"],
                 prune_configs_by=prune("backward"))
@triton.jit
def _ntxent_backward_kernel(
    z1_ptr, stride_1m, stride_1d, z2_ptr, stride_2b, stride_2m, stride_2d, N,
    dz1_ptr, stride_d1m, stride_d1d, dz2_ptr, stride_d2b, stride_d2m, stride_d2d, N_OUT,
    inv_ptr, tau_ptr, lse_ptr, scale_ptr, radial_scale_ptr, radial_ptr, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, PRESCALE: tl.constexpr,
    SCALE_OPERAND: tl.constexpr,
):
    z = (z1_ptr, stride_1m, stride_1d, z2_ptr, stride_2b, stride_2m, stride_2d, N)
    dz_out = (dz1_ptr, stride_d1m, stride_d1d, dz2_ptr, stride_d2b, stride_d2m, stride_d2d, N_OUT)
    M = 2 * N
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    partner = (rows + N) % M
    out_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_d < D
    tau = tl.load(tau_ptr)
    inv_rows = load_inverse_norms(inv_ptr, rows, row_mask, NORMALIZE, ACC)
    row_scale = inv_rows / tau
    lse_rows = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    d_hat = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    radial = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, M, BLOCK_N):
        cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_mask = cols < M
        inv_cols = load_inverse_norms(inv_ptr, cols, col_mask, NORMALIZE, ACC)
        s = stacked_logits(z, rows, row_mask, row_scale, cols, col_mask, inv_cols, D,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        lse_cols = tl.load(lse_ptr + cols, mask=col_mask, other=0.0)
        # Self and padding entries: −inf in the exponentials and 0 in t·s, so their terms are 0 (never inf·0).
        contrast = row_mask[:, None] & col_mask[None, :] & (cols[None, :] != rows[:, None])
        excluded = tl.where(contrast, s, float("-inf"))
        t = tl.exp(excluded - lse_rows[:, None]) + tl.exp(excluded - lse_cols[None, :])
        t -= tl.where(contrast & (cols[None, :] == partner[:, None]), 2.0, 0.0)
        radial += tl.sum(t * tl.where(contrast, s, 0.0), axis=1)
        d_hat = accumulate_gradient_tile(d_hat, t, z, cols, col_mask, inv_cols, out_d, out_mask,
                                         PRECISION, ACC, PRESCALE, SCALE_OPERAND)
    finish_row_gradient(z, dz_out, rows, row_mask, out_d, out_mask, inv_rows, d_hat, radial,
                        scale_ptr, radial_scale_ptr, radial_ptr, NORMALIZE, ACC)


def ntxent_forward(z1: Tensor, z2: Tensor, tau: Tensor, sub_dim: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    m, acc = 2 * z1.shape[0], accumulation_dtype(z1.dtype)
    rows = pair_rows(z1, z2)
    inv = inverse_norms(rows, m, sub_dim) if normalize else torch.empty(0, dtype=acc, device=z1.device)
    lse = torch.empty(m, dtype=acc, device=z1.device)
    positive = torch.empty(m, dtype=acc, device=z1.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    # Without normalization the kernel never reads the inverse norms; it gets a valid buffer instead.
    _ntxent_forward_kernel[grid](
        *rows, inv if normalize else tau, tau, lse, positive, sub_dim, shape_bucket(m),
        NORMALIZE=normalize, PRECISION=dot_precision(z1.dtype), ACC=accumulator(z1.dtype),
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
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(sub_dim, meta["BLOCK_DO"]))  # noqa: E731
    wrap_triton(_ntxent_backward_kernel)[grid](
        *pair_rows(z1, z2), *pair_rows(dz1, dz2), inv_norms if normalize else tau, tau, lse, scale,
        radial_scale, radial, sub_dim, shape_bucket(m),
        NORMALIZE=normalize, PRECISION=dot_precision(z1.dtype), ACC=accumulator(z1.dtype), PRESCALE=prescale,
        SCALE_OPERAND=z1.dtype == torch.float16,
    )
    return dz1, dz2, radial.sum() / 2


def compile_specs(dtype: torch.dtype, precision: str, sub_dim: int, n: int = 2048) -> list[CompileSpec]:
    """The forward and backward kernels as launched on contiguous [n, sub_dim] rows (normalized)."""
    acc = accumulation_dtype(dtype)
    z1, z2 = (torch.empty(n, sub_dim, dtype=dtype) for _ in range(2))
    vector = lambda: torch.empty(2 * n, dtype=acc)  # noqa: E731
    tau = torch.empty((), dtype=acc)
    common = dict(NORMALIZE=True, PRECISION=precision, ACC=accumulator(dtype))
    forward = (*pair_rows(z1, z2), vector(), tau, vector(), vector(), sub_dim, shape_bucket(2 * n))
    backward = (*pair_rows(z1, z2), *pair_rows(torch.empty_like(z1), torch.empty_like(z2)), vector(), tau, vector(),
                tau, tau, vector(), sub_dim, shape_bucket(2 * n))
    return [
        CompileSpec("ntxent_forward", "forward", _ntxent_forward_kernel.fn, forward, common),
        CompileSpec("ntxent_backward", "backward", _ntxent_backward_kernel.fn, backward,
                    dict(common, PRESCALE=gradient_prescale(dtype), SCALE_OPERAND=dtype == torch.float16)),
    ]
