"""Cross-view InfoNCE (docs/spec.md; DirectCLR / CLIP form) as fused Triton kernels: O(N) memory, no atomics.

Rows q, k ∈ R^{N×D} are the user's (any strides); the loss uses the first D' = ``sub_dim`` features,
read through the full row stride, never copied. With ``normalize`` an O(N·D') pre-pass stores the inverse
norms 1/max(‖x_i[:D']‖, 1e-12) and every tile is scaled by them: S = diag(inv_q) Q Kᵀ diag(inv_k) / τ.

Forward — ONE pass over the tiles of S gives both directions. The grid is G × C programs: program
(g, c) walks the row blocks of row group g against the column tiles of column split c. Per row block
it keeps the online (max, sum) of its rows in registers and writes one row partial log-sum-exp per
(c, row); per column tile it folds the tile's column log-sum-exp into its own column partial (g, col)
in global memory (read-modify-write of a slot no other program touches: deterministic, no atomics).
A small finish kernel merges the C row partials and G column partials in a fixed order and computes
the positives s_ii = q_i·k_i/τ exactly in O(N·D). G, C ≈ √(2 × SMs), so partials take (G + C)·N
floats (e.g. 33·N·4 B = 35 MB at N = 262 144 on an H100); asymmetric calls keep no column partials.

Backward — G = ∂L/∂S, N·G_ij/w = e^{s_ij − lse_i} (+ e^{s_ij − lsecol_j} if symmetric) − (1|2)·1[i = j]:
- dQ pass: a row-owner program (BLOCK_M rows × BLOCK_DO output features) walks all column tiles,
  recomputes S, forms G and accumulates G K in registers;
- dK pass: a column-owner program (BLOCK_N columns × BLOCK_DO features) walks all row blocks,
  recomputes the SAME tile q_I·k_Jᵀ (operands in the forward's order; the result is transposed, not the
  operands) and accumulates Gᵀ Q.
Both GEMMs multiply by the normalized rows (raw slice × inverse norm, cast to the input dtype); the
epilogue applies F.normalize's backward with ⟨x̂_i, dx̂_i⟩ = Σ_j G_ij s_ij, summed from the same tiles,
whose total is also the Σ G·s that ``fastcl.ops`` turns into dL/dτ.
Every pass computes S with :func:`similarity_tile` (same operands and order); the backward passes are
autotuned on their own (``_common.autotune_configs("backward")``, size bucket in the key). The inverse
norms and F.normalize's backward epilogue are ``_common``'s (q and k are one-matrix stacked-rows
descriptors there). GEMM-units (docs/spec.md's FLOP model):
1 (forward) + 2 (dQ: recompute + GEMM) + 2 (dK: recompute + GEMM) = 5 for D' ≤ BLOCK_DO; wider D'
re-walks the tiles once per BLOCK_DO slice of output features. See docs/kernels-infonce.md.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fastcl.kernels._common import (
    LAUNCH_OPTIONS,
    CompileSpec,
    accumulator,
    autotune_configs,
    dot_precision,
    example_rows,
    finish_logsumexp,
    gradient_prescale,
    interpreted,
    inverse_norms,
    load_inverse_norms,
    mma,
    online_logsumexp,
    pair_rows,
    prune,
    shape_bucket,
    similarity_tile,
    single_rows,
    store_row_gradient,
    stride_offsets,
)
from fastcl.ops import accumulation_dtype

# Programs per forward launch under the interpreter (on a GPU: about two per SM). Two row groups and two
# column splits there, so the interpreter tests exercise every partial merge.
_INTERPRETER_PROGRAMS = 4


@triton.jit
def _logits(
    q_ptr, stride_qn, stride_qd, rows, row_mask, inv_q, k_ptr, stride_kn, stride_kd, cols, col_mask, inv_k, tau, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """s = (q_rows · k_colsᵀ) · inv_q · inv_k / τ on raw rows: the one formula every pass uses."""
    s = similarity_tile(q_ptr, stride_qn, stride_qd, rows, row_mask, k_ptr, stride_kn, stride_kd, cols, col_mask,
                        D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
    return s * inv_q[:, None] * inv_k[None, :] / tau


@triton.autotune(configs=autotune_configs("forward"), key=["D", "SHAPE_BUCKET", "SYMMETRIC", "PRECISION"],
                 prune_configs_by=prune("forward"))
@triton.jit
def _infonce_forward_kernel(
    q_ptr, stride_qn, stride_qd, k_ptr, stride_kn, stride_kd, inv_q_ptr, inv_k_ptr, tau_ptr,
    row_partial_ptr, col_partial_ptr, N, D, GROUPS, SPLITS, SHAPE_BUCKET,
    SYMMETRIC: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    group = tl.program_id(0)
    split = tl.program_id(1)
    # Balanced contiguous ranges: the host picks GROUPS ≤ #row blocks and SPLITS ≤ #column tiles for
    # every config, so no range is empty and every partial slot gets written.
    row_blocks = tl.cdiv(N, BLOCK_M)
    col_tiles = tl.cdiv(N, BLOCK_N)
    first_block = group * row_blocks // GROUPS
    last_block = (group + 1) * row_blocks // GROUPS
    first_tile = split * col_tiles // SPLITS
    last_tile = (split + 1) * col_tiles // SPLITS
    tau = tl.load(tau_ptr)
    # This program's partial slots: row partial `split`, column partial `group` (int64: split × N).
    row_partials = row_partial_ptr + tl.cast(split, tl.int64) * N
    col_partials = col_partial_ptr + tl.cast(group, tl.int64) * N
    for block in range(first_block, last_block):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < N
        inv_q = load_inverse_norms(inv_q_ptr, rows, row_mask, NORMALIZE, ACC)
        running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
        running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
        for tile in range(first_tile, last_tile):
            cols = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
            col_mask = cols < N
            s = _logits(q_ptr, stride_qn, stride_qd, rows, row_mask, inv_q, k_ptr, stride_kn, stride_kd, cols, col_mask,
                        load_inverse_norms(inv_k_ptr, cols, col_mask, NORMALIZE, ACC), tau, D,
                        BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
            running_max, running_sum = online_logsumexp(
                running_max, running_sum, tl.where(col_mask[None, :], s, float("-inf")))
            if SYMMETRIC:
                # Every tile holds a valid row, so the column max is finite: no −inf − −inf.
                s = tl.where(row_mask[:, None], s, float("-inf"))
                tile_max = tl.max(s, axis=0)
                tile_lse = tile_max + tl.log(tl.sum(tl.exp(s - tile_max[None, :]), axis=0))
                slot = col_partials + cols
                # The group's first row block writes its slot; later ones fold into it (log-add-exp).
                later_visit = tl.zeros_like(cols) + block > first_block
                earlier = tl.load(slot, mask=col_mask & later_visit, other=float("-inf"))
                # log(e^a + e^b) = top + log(1 + e^(low − top)): one exp per column (e^0 = 1 exactly).
                top = tl.maximum(earlier, tile_lse)
                merged = top + tl.log(1.0 + tl.exp(tl.minimum(earlier, tile_lse) - top))
                tl.store(slot, merged, mask=col_mask)
        tl.store(row_partials + rows, finish_logsumexp(running_max, running_sum), mask=row_mask)
        if SYMMETRIC:
            # Makes this row block's column-partial stores visible to the threads that read them next.
            tl.debug_barrier()


@triton.jit
def _merge_partials(partial_ptr, count, N, rows, row_mask, ACC: tl.constexpr):
    """log Σ_p exp(partial[p, rows]) over p = 0..count-1, in that order."""
    running_max = tl.full(rows.shape, float("-inf"), dtype=ACC)
    running_sum = tl.zeros(rows.shape, dtype=ACC)
    for _ in range(0, count):
        x = tl.load(partial_ptr + rows, mask=row_mask, other=0.0)
        partial_ptr += N  # the next partial's row: a pointer step, no p × N product
        top = tl.maximum(running_max, x)
        running_sum = running_sum * tl.exp(running_max - top) + tl.exp(x - top)
        running_max = top
    return finish_logsumexp(running_max, running_sum)


@triton.jit
def _infonce_finish_kernel(
    q_ptr, stride_qn, stride_qd, k_ptr, stride_kn, stride_kd, inv_q_ptr, inv_k_ptr, tau_ptr,
    row_partial_ptr, col_partial_ptr, lse_rows_ptr, lse_cols_ptr, terms_ptr, N, D, GROUPS, SPLITS,
    SYMMETRIC: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per row i: lse_rows, lse_cols (symmetric), and the loss term lse_i − s_ii (+ lsecol_i − s_ii)."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    row_mask = rows < N
    # The positive s_ii = q_i·k_i·inv_q_i·inv_k_i / τ, elementwise in ACC: O(N·D), exact products for
    # 16-bit inputs.
    positive = tl.zeros((BLOCK,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        a = tl.load(q_ptr + rows[:, None] * stride_qn + stride_offsets(d, stride_qd)[None, :], mask=mask, other=0.0)
        b = tl.load(k_ptr + rows[:, None] * stride_kn + stride_offsets(d, stride_kd)[None, :], mask=mask, other=0.0)
        positive += tl.sum(a.to(ACC) * b.to(ACC), axis=1)
    positive = positive * load_inverse_norms(inv_q_ptr, rows, row_mask, NORMALIZE, ACC)
    positive = positive * load_inverse_norms(inv_k_ptr, rows, row_mask, NORMALIZE, ACC) / tl.load(tau_ptr)
    lse_rows = _merge_partials(row_partial_ptr, SPLITS, N, rows, row_mask, ACC)
    tl.store(lse_rows_ptr + rows, lse_rows, mask=row_mask)
    terms = lse_rows - positive
    if SYMMETRIC:
        lse_cols = _merge_partials(col_partial_ptr, GROUPS, N, rows, row_mask, ACC)
        tl.store(lse_cols_ptr + rows, lse_cols, mask=row_mask)
        terms += lse_cols - positive
    tl.store(terms_ptr + rows, terms, mask=row_mask)


@triton.jit
def _gradient_tile(s, rows, row_mask, cols, col_mask, lse_rows, lse_cols, SYMMETRIC: tl.constexpr,
                   PRESCALE: tl.constexpr):
    """N·∂L/∂S / w on one tile (times PRESCALE), zero outside the valid rows and columns."""
    g = tl.exp(s - lse_rows[:, None])
    if SYMMETRIC:
        g += tl.exp(s - lse_cols[None, :])
        g -= tl.where(rows[:, None] == cols[None, :], 2.0, 0.0)
    else:
        g -= tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    # `where`, not a product: padding entries may hold anything and must not make NaN.
    return tl.where(row_mask[:, None] & col_mask[None, :], g * PRESCALE, 0.0)


@triton.jit
def _column_lse(lse_cols_ptr, cols, col_mask, SYMMETRIC: tl.constexpr, ACC: tl.constexpr):
    """The columns' log-sum-exp for a symmetric loss; zeros (which _gradient_tile never reads) otherwise."""
    if SYMMETRIC:
        lse_cols = tl.load(lse_cols_ptr + cols, mask=col_mask, other=0.0)
    else:
        lse_cols = tl.zeros(cols.shape, dtype=ACC)
    return lse_cols


@triton.jit
def _normalized_slice(x_ptr, stride_n, stride_d, idx, mask, inv, out, out_mask, ACC: tl.constexpr):
    """x[idx, out] · inv[idx] (the normalized rows' slice) in the input dtype, as a GEMM operand."""
    x = tl.load(x_ptr + idx.to(tl.int64)[:, None] * stride_n + stride_offsets(out, stride_d)[None, :],
                mask=mask[:, None] & out_mask[None, :], other=0.0)
    return (x.to(ACC) * inv[:, None]).to(x.dtype)


@triton.autotune(configs=autotune_configs("backward"), key=["D", "SHAPE_BUCKET", "SYMMETRIC", "PRECISION"],
                 prune_configs_by=prune("backward"))
@triton.jit
def _infonce_dq_kernel(
    q_ptr, stride_qn, stride_qd, k_ptr, stride_kn, stride_kd, inv_q_ptr, inv_k_ptr, tau_ptr, scale_ptr,
    lse_rows_ptr, lse_cols_ptr, dq_ptr, stride_dn, stride_dd, radial_ptr, N, D, SHAPE_BUCKET,
    SYMMETRIC: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    PRESCALE: tl.constexpr,
):
    """Row owner: dq̂[rows, out] = scale · Σ_J G_{rows,J} k̂[J, out], then F.normalize's backward.
    The slice-0 programs also store radial[rows] = Σ_j G_ij s_ij = ⟨q̂_i, dq̂_i⟩."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < N
    out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out < D
    tau = tl.load(tau_ptr)
    inv_q = load_inverse_norms(inv_q_ptr, rows, row_mask, NORMALIZE, ACC)
    lse_rows = tl.load(lse_rows_ptr + rows, mask=row_mask, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    radial = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_mask = cols < N
        inv_k = load_inverse_norms(inv_k_ptr, cols, col_mask, NORMALIZE, ACC)
        s = _logits(q_ptr, stride_qn, stride_qd, rows, row_mask, inv_q, k_ptr, stride_kn, stride_kd, cols, col_mask,
                    inv_k, tau, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        lse_cols = _column_lse(lse_cols_ptr, cols, col_mask, SYMMETRIC, ACC)
        g = _gradient_tile(s, rows, row_mask, cols, col_mask, lse_rows, lse_cols, SYMMETRIC, PRESCALE)
        radial += tl.sum(g * s, axis=1)
        k_hat = _normalized_slice(k_ptr, stride_kn, stride_kd, cols, col_mask, inv_k, out, out_mask, ACC)
        dq = mma(g.to(k_hat.dtype), k_hat, dq, PRECISION, ACC)
    scale = tl.load(scale_ptr)
    radial *= scale * tau
    if tl.program_id(1) == 0:
        tl.store(radial_ptr + rows, radial, mask=row_mask)
    store_row_gradient(single_rows(q_ptr, stride_qn, stride_qd, N), single_rows(dq_ptr, stride_dn, stride_dd, N),
                       rows, row_mask, out, out_mask, inv_q, dq * scale, radial, NORMALIZE, ACC)


@triton.autotune(configs=autotune_configs("backward"), key=["D", "SHAPE_BUCKET", "SYMMETRIC", "PRECISION"],
                 prune_configs_by=prune("backward"))
@triton.jit
def _infonce_dk_kernel(
    q_ptr, stride_qn, stride_qd, k_ptr, stride_kn, stride_kd, inv_q_ptr, inv_k_ptr, tau_ptr, scale_ptr,
    lse_rows_ptr, lse_cols_ptr, dk_ptr, stride_dn, stride_dd, N, D, SHAPE_BUCKET,
    SYMMETRIC: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    PRESCALE: tl.constexpr,
):
    """Column owner: dk̂[cols, out] = scale · Σ_I G_{I,cols}ᵀ q̂[I, out], from the forward's tile q_I·k_colsᵀ,
    then F.normalize's backward."""
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_mask = cols < N
    out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out < D
    tau = tl.load(tau_ptr)
    inv_k = load_inverse_norms(inv_k_ptr, cols, col_mask, NORMALIZE, ACC)
    lse_cols = _column_lse(lse_cols_ptr, cols, col_mask, SYMMETRIC, ACC)
    dk = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
    radial = tl.zeros((BLOCK_N,), dtype=ACC)
    for start in range(0, N, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < N
        inv_q = load_inverse_norms(inv_q_ptr, rows, row_mask, NORMALIZE, ACC)
        s = _logits(q_ptr, stride_qn, stride_qd, rows, row_mask, inv_q, k_ptr, stride_kn, stride_kd, cols, col_mask,
                    inv_k, tau, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        lse_rows = tl.load(lse_rows_ptr + rows, mask=row_mask, other=0.0)
        g = _gradient_tile(s, rows, row_mask, cols, col_mask, lse_rows, lse_cols, SYMMETRIC, PRESCALE)
        radial += tl.sum(g * s, axis=0)
        q_hat = _normalized_slice(q_ptr, stride_qn, stride_qd, rows, row_mask, inv_q, out, out_mask, ACC)
        dk = mma(tl.trans(g).to(q_hat.dtype), q_hat, dk, PRECISION, ACC)
    scale = tl.load(scale_ptr)
    store_row_gradient(single_rows(k_ptr, stride_kn, stride_kd, N), single_rows(dk_ptr, stride_dn, stride_dd, N),
                       cols, col_mask, out, out_mask, inv_k, dk * scale, radial * (scale * tau), NORMALIZE, ACC)


# --- host side ------------------------------------------------------------------------------------------

def _programs_per_launch(device: torch.device) -> int:
    if interpreted() or device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def forward_grid(n: int, symmetric: bool, device: torch.device) -> tuple[int, int]:
    """(row groups G, column splits C) of the forward launch.

    Both are bounded by the tile counts of the LARGEST forward config, so every config that autotuning
    may pick has at least one row block per group and one column tile per split. Symmetric calls keep
    (G + C)·N partial floats, smallest at G ≈ C ≈ √programs; asymmetric calls keep only C·N.

    Example:
        >>> groups, splits = forward_grid(4096, True, torch.device("cpu"))
        >>> groups >= 1 and splits >= 1 and groups * splits >= 4
        True
    """
    configs = autotune_configs("forward")
    row_blocks = triton.cdiv(n, max(c.kwargs["BLOCK_M"] for c in configs))
    col_tiles = triton.cdiv(n, max(c.kwargs["BLOCK_N"] for c in configs))
    programs = _programs_per_launch(device)
    groups = min(row_blocks, math.isqrt(programs - 1) + 1 if symmetric else programs)
    splits = min(col_tiles, triton.cdiv(programs, groups))
    return groups, splits


def infonce_forward(
    q: Tensor, k: Tensor, tau: Tensor, sub_dim: int, normalize: bool, symmetric: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, d = q.shape[0], sub_dim
    acc_dtype = accumulation_dtype(q.dtype)
    acc, precision = accumulator(q.dtype), dot_precision(q.dtype)
    # Each input is a stacked-rows descriptor of one matrix (m = N): pair_rows(x, x).
    inv_q, inv_k = (
        inverse_norms(pair_rows(x, x), n, d) if normalize else torch.empty(0, dtype=acc_dtype, device=x.device)
        for x in (q, k)
    )
    # Without normalization the kernels never read the inverse norms; they get a valid buffer instead.
    norms = (inv_q, inv_k) if normalize else (tau, tau)
    groups, splits = forward_grid(n, symmetric, q.device)
    row_partial = torch.empty((splits, n), dtype=acc_dtype, device=q.device)
    # Asymmetric calls never touch the column arguments; they get a valid buffer rather than an empty one.
    col_partial = torch.empty((groups, n), dtype=acc_dtype, device=q.device) if symmetric else row_partial
    rows = (q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), *norms, tau)
    _infonce_forward_kernel[(groups, splits)](
        *rows, row_partial, col_partial, n, d, groups, splits, shape_bucket(n),
        SYMMETRIC=symmetric, NORMALIZE=normalize, PRECISION=precision, ACC=acc,
    )

    lse_rows = torch.empty(n, dtype=acc_dtype, device=q.device)
    lse_cols = torch.empty(n if symmetric else 0, dtype=acc_dtype, device=q.device)
    terms = torch.empty(n, dtype=acc_dtype, device=q.device)
    block = 16 if interpreted() else 128
    _infonce_finish_kernel[(triton.cdiv(n, block),)](
        *rows, row_partial, col_partial, lse_rows, lse_cols if symmetric else lse_rows, terms, n, d, groups, splits,
        SYMMETRIC=symmetric, NORMALIZE=normalize, BLOCK=block, BLOCK_D=max(16, min(64, triton.next_power_of_2(d))),
        ACC=acc, **LAUNCH_OPTIONS,
    )
    loss = terms.mean() * (0.5 if symmetric else 1.0)
    return loss, lse_rows, lse_cols, inv_q, inv_k


@triton_op("fastcl::triton_infonce_backward", mutates_args=())
def infonce_backward(
    grad: Tensor, q: Tensor, k: Tensor, tau: Tensor, sub_dim: int, normalize: bool, symmetric: bool,
    lse_rows: Tensor, lse_cols: Tensor, inv_norms_q: Tensor, inv_norms_k: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dq, dL/dk) shaped like q, k (exactly zero beyond sub_dim) and Σ_ij G_ij s_ij (for dL/dτ)."""
    n, d = q.shape[0], sub_dim
    prescale = gradient_prescale(q.dtype)
    scale = (grad.to(tau.dtype) * (0.5 if symmetric else 1.0) / (n * tau * prescale)).reshape(())
    # The kernels write the first sub_dim features; the rest of the row stays exactly zero.
    new = torch.zeros if d < q.shape[1] else torch.empty
    dq, dk = new(q.shape, dtype=q.dtype, device=q.device), new(k.shape, dtype=k.dtype, device=k.device)
    radial = torch.empty(n, dtype=tau.dtype, device=q.device)
    common = dict(SYMMETRIC=symmetric, NORMALIZE=normalize, PRECISION=dot_precision(q.dtype), ACC=accumulator(q.dtype),
                  PRESCALE=prescale)
    operands = (q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1),
                *((inv_norms_q, inv_norms_k) if normalize else (tau, tau)), tau, scale, lse_rows,
                lse_cols if symmetric else lse_rows)
    wrap_triton(_infonce_dq_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DO"]))](
        *operands, dq, dq.stride(0), dq.stride(1), radial, n, d, shape_bucket(n), **common)
    wrap_triton(_infonce_dk_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_DO"]))](
        *operands, dk, dk.stride(0), dk.stride(1), n, d, shape_bucket(n), **common)
    return dq, dk, radial.sum()



def auxiliary_specs(dtype: torch.dtype, sub_dim: int, n: int = 4096, layout: str = "contiguous") -> list[CompileSpec]:
    """The forward's finish kernel (symmetric) on [n, sub_dim] q and k in ``layout``."""
    acc_dtype = accumulation_dtype(dtype)
    q, k = (example_rows((n, sub_dim), dtype, layout) for _ in range(2))
    vector = lambda: torch.empty(n, dtype=acc_dtype)  # noqa: E731
    partials = torch.empty(16, n, dtype=acc_dtype)
    args = (q, *q.stride(), k, *k.stride(), vector(), vector(), torch.empty((), dtype=acc_dtype), partials, partials,
            vector(), vector(), vector(), n, sub_dim, 16, 16)
    meta = dict(SYMMETRIC=True, NORMALIZE=True, BLOCK=128, BLOCK_D=max(16, min(64, triton.next_power_of_2(sub_dim))),
                ACC=accumulator(dtype))
    return [CompileSpec("infonce_finish", "launch", _infonce_finish_kernel, args, meta)]


def compile_specs(dtype: torch.dtype, precision: str, sub_dim: int, n: int = 4096,
                  layout: str = "contiguous") -> list[CompileSpec]:
    """Symmetric and one-directional forward, dQ and dK, on [n, sub_dim] q and k in ``layout`` (normalized)."""
    acc_dtype = accumulation_dtype(dtype)
    q, k = (example_rows((n, sub_dim), dtype, layout) for _ in range(2))
    vector = lambda: torch.empty(n, dtype=acc_dtype)  # noqa: E731
    tau = torch.empty((), dtype=acc_dtype)
    operands = (q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), vector(), vector(), tau)
    grad = torch.empty(n, sub_dim, dtype=dtype)  # dq and dk: allocated contiguous by the op
    specs = []
    for symmetric in (True, False):
        name = "infonce" if symmetric else "infonce_onedir"
        common = dict(SYMMETRIC=symmetric, NORMALIZE=True, PRECISION=precision, ACC=accumulator(dtype))
        partials = torch.empty(16, n, dtype=acc_dtype)
        specs.append(CompileSpec(f"{name}_forward", "forward", _infonce_forward_kernel.fn,
                                 (*operands, partials, partials, n, sub_dim, 16, 16, shape_bucket(n)), common))
        backward = dict(common, PRESCALE=gradient_prescale(dtype))
        lse = (tau, vector(), vector())
        specs += [
            CompileSpec(f"{name}_dq", "backward", _infonce_dq_kernel.fn,
                        (*operands, *lse, grad, *grad.stride(), vector(), n, sub_dim,
                         shape_bucket(n)), backward),
            CompileSpec(f"{name}_dk", "backward", _infonce_dk_kernel.fn,
                        (*operands, *lse, grad, *grad.stride(), n, sub_dim,
                         shape_bucket(n)), backward),
        ]
    return specs
