"""SupCon L_out (docs/spec.md) as fused Triton kernels: O(M) memory, deterministic backward, no atomics.

Rows are view-major (M = V·N, row r = v·N + n is features[n, v]), read in place through the strides of
features [N, V, D] (first D' = ``sub_dim`` features; ``_common.view_major_rows``); anchors are rows
0..n_anchors−1 (``contrast_mode="all"``: all rows, ``"one"``: view 0). Positives P(a) come from
``labels[N]`` compared per tile, or from the bool ``mask[N, N]`` read tile by tile (mask[a mod N, c mod N]);
self excluded. With ``normalize`` a pre-pass stores r = 1/max(‖row[:D']‖, 1e-12) (O(M·D')) and the tiles
are s_rc = (z_r·z_c)·r_r·r_c/τ on the raw rows (r = 1 without normalization).

Forward — one program per block of anchor rows walks all column tiles: S tile, self-mask, online
max and sum (→ lse), and the sum of s over the tile's positives. |P(a)| comes from the labels / mask
in O(N log N) / O(N²) bool reads, so with A⁺ = anchors having a positive and κ = τ/τ_b
    L = κ/|A⁺| · Σ_{a∈A⁺} (lse_a − possum_a/|P(a)|)          (0 when A⁺ is empty)
is a deterministic torch reduction of per-row buffers.

Backward — with v_a = 1[a ∈ A⁺] and G = ∂L/∂S = κ/|A⁺| · Ĝ,
    T_rc = Ĝ_rc + Ĝ_cr = v_r (e^{s_rc − lse_r} − P_rc/|P(r)|) + v_c (e^{s_rc − lse_c} − P_cr/|P(c)|)
from one recomputed tile (the forward's helper, operands and config) and the stored lse; P_cr is the
label comparison again, or mask[c mod N, r mod N] for a (possibly asymmetric) mask. One GEMM per tile
gives dẑ_r = Σ_c T_rc r_c z_c · κ/(|A⁺|τ); the same tile gives c_r = ⟨ẑ_r, dẑ_r⟩ = κ/|A⁺| Σ_c T_rc s_rc,
and dz_r = r_r (dẑ_r − c_r r_r z_r) (F.normalize's backward). Each program owns BLOCK_M rows × BLOCK_DO
features of dfeatures; output slice 0 stores c (Σ_r c_r / 2 = Σ G s, for dL/dτ). Non-anchor row blocks
(``"one"``) only walk the anchor columns, where the transposed term lives.
"""
from __future__ import annotations

from typing import Optional

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
    prune,
    shape_bucket,
    stacked_logits,
    view_major_rows,
)
from fastcl.ops import accumulation_dtype
from fastcl.torch_backend.supcon import positive_counts


@triton.jit
def _positive_tile(labels_ptr, stride_label, mask_ptr, stride_mask_a, stride_mask_c,
                   anchor_samples, contrast_samples, valid, HAS_MASK: tl.constexpr):
    """P[a, c] for a tile: labels equal, or mask[a, c] != 0 (loads masked by ``valid``)."""
    if HAS_MASK:
        # int64 offsets: an N×N mask passes 2³¹ bytes at N ≈ 46 000.
        flags = tl.load(mask_ptr + anchor_samples.to(tl.int64)[:, None] * stride_mask_a
                        + contrast_samples.to(tl.int64)[None, :] * stride_mask_c, mask=valid, other=0)
        same = flags != 0
    else:
        anchor_labels = tl.load(labels_ptr + anchor_samples * stride_label)
        contrast_labels = tl.load(labels_ptr + contrast_samples * stride_label)
        same = anchor_labels[:, None] == contrast_labels[None, :]
    return valid & same


@triton.autotune(configs=autotune_configs("forward"),
                 key=["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE", "HAS_MASK"], prune_configs_by=prune("forward"))
@triton.jit
def _supcon_forward_kernel(
    f_ptr, stride_n, stride_d, rest_ptr, stride_v, rest_stride_n, rest_stride_d, N,
    labels_ptr, stride_label, mask_ptr, stride_mask_0, stride_mask_1,
    inv_ptr, tau_ptr, lse_ptr, positive_sum_ptr, M, n_anchors, D, SHAPE_BUCKET,
    HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    z = (f_ptr, stride_n, stride_d, rest_ptr, stride_v, rest_stride_n, rest_stride_d, N)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < n_anchors
    row_samples = rows % N  # in range for padding rows too, so label loads need no mask
    row_scale = load_inverse_norms(inv_ptr, rows, row_mask, NORMALIZE, ACC) / tl.load(tau_ptr)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    positive_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, M, BLOCK_N):
        cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_mask = cols < M
        s = stacked_logits(z, rows, row_mask, row_scale, cols, col_mask,
                           load_inverse_norms(inv_ptr, cols, col_mask, NORMALIZE, ACC), D,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        # No row mask here: rows past the anchors are never stored, and keeping their columns avoids log(0).
        contrast = col_mask[None, :] & (cols[None, :] != rows[:, None])
        positive = _positive_tile(labels_ptr, stride_label, mask_ptr, stride_mask_0, stride_mask_1,
                                  row_samples, cols % N, contrast, HAS_MASK)
        positive_sum += tl.sum(tl.where(positive, s, 0.0), axis=1)
        running_max, running_sum = online_logsumexp(running_max, running_sum, tl.where(contrast, s, float("-inf")))
    tl.store(lse_ptr + rows, finish_logsumexp(running_max, running_sum), mask=row_mask)
    tl.store(positive_sum_ptr + rows, positive_sum, mask=row_mask)


@triton.autotune(configs=autotune_configs("backward"),
                 key=["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE", "HAS_MASK"], prune_configs_by=prune("backward"))
@triton.jit
def _supcon_backward_kernel(
    f_ptr, stride_n, stride_d, rest_ptr, stride_v, rest_stride_n, rest_stride_d, N,
    df_ptr, stride_dfn, stride_dfd, df_rest_ptr, stride_dfv, df_rest_stride_n, df_rest_stride_d, N_OUT,
    labels_ptr, stride_label, mask_ptr, stride_mask_0, stride_mask_1,
    inv_ptr, tau_ptr, lse_ptr, counts_ptr, scale_ptr, radial_scale_ptr, radial_ptr, M, n_anchors, D, SHAPE_BUCKET,
    HAS_MASK: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, PRESCALE: tl.constexpr, SCALE_OPERAND: tl.constexpr,
):
    z = (f_ptr, stride_n, stride_d, rest_ptr, stride_v, rest_stride_n, rest_stride_d, N)
    dz_out = (df_ptr, stride_dfn, stride_dfd, df_rest_ptr, stride_dfv, df_rest_stride_n, df_rest_stride_d, N_OUT)
    row_start = tl.program_id(0) * BLOCK_M
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    row_samples = rows % N
    out_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_d < D
    inv_rows = load_inverse_norms(inv_ptr, rows, row_mask, NORMALIZE, ACC)
    row_scale = inv_rows / tl.load(tau_ptr)
    row_is_anchor = rows < n_anchors
    # Rows outside A⁺ (no positive, not an anchor, padding) get lse = +inf and 1/|P| = 0: no term.
    count_rows = tl.load(counts_ptr + rows, mask=row_is_anchor, other=0)
    lse_rows = tl.where(count_rows > 0, tl.load(lse_ptr + rows, mask=row_is_anchor, other=0.0), float("inf"))
    inv_count_rows = tl.where(count_rows > 0, 1.0 / tl.maximum(count_rows, 1).to(ACC), 0.0)
    # Rows past the anchors only receive the transposed term, which lives in the anchor columns.
    n_cols = tl.where(row_start < n_anchors, M, n_anchors)
    d_hat = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    radial = tl.zeros((BLOCK_M,), dtype=ACC)
    for start in range(0, n_cols, BLOCK_N):
        cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_mask = cols < M
        col_samples = cols % N
        inv_cols = load_inverse_norms(inv_ptr, cols, col_mask, NORMALIZE, ACC)
        s = stacked_logits(z, rows, row_mask, row_scale, cols, col_mask, inv_cols, D,
                           BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, ACC)
        col_is_anchor = cols < n_anchors
        count_cols = tl.load(counts_ptr + cols, mask=col_is_anchor, other=0)
        lse_cols = tl.where(count_cols > 0, tl.load(lse_ptr + cols, mask=col_is_anchor, other=0.0), float("inf"))
        inv_count_cols = tl.where(count_cols > 0, 1.0 / tl.maximum(count_cols, 1).to(ACC), 0.0)
        contrast = row_mask[:, None] & col_mask[None, :] & (cols[None, :] != rows[:, None])
        positive = _positive_tile(labels_ptr, stride_label, mask_ptr, stride_mask_0, stride_mask_1,
                                  row_samples, col_samples, contrast, HAS_MASK)
        if HAS_MASK:
            # P_cr = mask[c, r]: the mask may be asymmetric.
            positive_t = _positive_tile(labels_ptr, stride_label, mask_ptr, stride_mask_1, stride_mask_0,
                                        row_samples, col_samples, contrast, HAS_MASK)
        else:
            positive_t = positive
        # Self and padding entries: −inf in the exponentials and 0 in t·s, so their terms are 0 (never inf·0).
        excluded = tl.where(contrast, s, float("-inf"))
        t = tl.exp(excluded - lse_rows[:, None]) - tl.where(positive, inv_count_rows[:, None], 0.0)
        t += tl.exp(excluded - lse_cols[None, :]) - tl.where(positive_t, inv_count_cols[None, :], 0.0)
        radial += tl.sum(t * tl.where(contrast, s, 0.0), axis=1)
        d_hat = accumulate_gradient_tile(d_hat, t, z, cols, col_mask, inv_cols, out_d, out_mask,
                                         PRECISION, ACC, PRESCALE, SCALE_OPERAND)
    finish_row_gradient(z, dz_out, rows, row_mask, out_d, out_mask, inv_rows, d_hat, radial,
                        scale_ptr, radial_scale_ptr, radial_ptr, NORMALIZE, ACC)


def _positive_source(labels: Optional[Tensor], mask: Optional[Tensor]) -> tuple:
    """(labels_ptr, stride, mask_ptr, stride_0, stride_1, HAS_MASK); the absent one is passed as None."""
    if mask is not None:
        flags = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        return None, 0, flags, flags.stride(0), flags.stride(1), True
    return labels, labels.stride(0), None, 0, 0, False


def supcon_forward(
    features: Tensor, labels: Optional[Tensor], mask: Optional[Tensor], tau: Tensor, base_temperature: float,
    n_anchors: int, sub_dim: int, normalize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, views, _ = features.shape
    m, acc = n * views, accumulation_dtype(features.dtype)
    rows = view_major_rows(features)
    inv = inverse_norms(rows, m, sub_dim) if normalize else torch.empty(0, dtype=acc, device=features.device)
    lse = torch.empty(n_anchors, dtype=acc, device=features.device)
    positive_sum = torch.empty(n_anchors, dtype=acc, device=features.device)
    labels_ptr, stride_label, mask_ptr, stride_mask_0, stride_mask_1, has_mask = _positive_source(labels, mask)
    grid = lambda meta: (triton.cdiv(n_anchors, meta["BLOCK_M"]),)  # noqa: E731
    # Without normalization the kernel never reads the inverse norms; it gets a valid buffer instead.
    _supcon_forward_kernel[grid](
        *rows, labels_ptr, stride_label, mask_ptr, stride_mask_0, stride_mask_1,
        inv if normalize else tau, tau, lse, positive_sum, m, n_anchors, sub_dim, shape_bucket(m),
        HAS_MASK=has_mask, NORMALIZE=normalize, PRECISION=dot_precision(features.dtype),
        ACC=accumulator(features.dtype),
    )
    counts = positive_counts(labels, mask, m)[:n_anchors].to(torch.int32)
    weighted = counts > 0
    per_anchor = torch.where(weighted, lse - positive_sum / counts.clamp(min=1).to(acc), 0.0)
    loss = (tau / base_temperature) * per_anchor.sum() / weighted.sum().clamp(min=1).to(acc)
    return loss, lse, counts, inv


@triton_op("fastcl::triton_supcon_backward", mutates_args=())
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
    inv_norms: Tensor,
) -> tuple[Tensor, Tensor]:
    """dL/dfeatures shaped like features (exactly zero beyond sub_dim) and Σ_ij G_ij s_ij; counts: the
    forward's int32 |P(a)| (no class count here)."""
    n, views, dim = features.shape
    m = n * views
    prescale = gradient_prescale(features.dtype)
    n_weighted = (counts > 0).sum().clamp(min=1).to(tau.dtype)
    grad = grad.to(tau.dtype)
    scale = (grad / (base_temperature * n_weighted * prescale)).reshape(())  # κ/τ = 1/τ_b
    radial_scale = (grad * tau / (base_temperature * n_weighted)).reshape(())  # κ/|A⁺|
    # The kernel writes the first sub_dim features; the rest of each row stays exactly zero.
    new = torch.zeros if sub_dim < dim else torch.empty
    dfeatures = new(features.shape, dtype=features.dtype, device=features.device)
    radial = torch.empty(m, dtype=tau.dtype, device=features.device)
    labels_ptr, stride_label, mask_ptr, stride_mask_0, stride_mask_1, has_mask = _positive_source(labels, mask)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(sub_dim, meta["BLOCK_DO"]))  # noqa: E731
    wrap_triton(_supcon_backward_kernel)[grid](
        *view_major_rows(features), *view_major_rows(dfeatures),
        labels_ptr, stride_label, mask_ptr, stride_mask_0, stride_mask_1,
        inv_norms if normalize else tau, tau, lse, counts, scale, radial_scale, radial, m, n_anchors, sub_dim,
        shape_bucket(m),
        HAS_MASK=has_mask, NORMALIZE=normalize, PRECISION=dot_precision(features.dtype),
        ACC=accumulator(features.dtype), PRESCALE=prescale, SCALE_OPERAND=features.dtype == torch.float16,
    )
    return dfeatures, radial.sum() / 2


def compile_specs(dtype: torch.dtype, precision: str, sub_dim: int, n: int = 2048) -> list[CompileSpec]:
    """Forward and backward with labels and with a bool mask, on contiguous features [n, 2, sub_dim]."""
    acc = accumulation_dtype(dtype)
    m = 2 * n
    features = torch.empty(n, 2, sub_dim, dtype=dtype)
    vector = lambda: torch.empty(m, dtype=acc)  # noqa: E731
    tau = torch.empty((), dtype=acc)
    specs = []
    for name, labels, mask in (("labels", torch.empty(n, dtype=torch.int64), None),
                               ("mask", None, torch.empty(n, n, dtype=torch.bool))):
        positives = _positive_source(labels, mask)[:5]
        common = dict(HAS_MASK=mask is not None, NORMALIZE=True, PRECISION=precision, ACC=accumulator(dtype))
        forward = (*view_major_rows(features), *positives, vector(), tau, vector(), vector(), m, m, sub_dim,
                   shape_bucket(m))
        backward = (*view_major_rows(features), *view_major_rows(torch.empty_like(features)), *positives,
                    vector(), tau, vector(), torch.empty(m, dtype=torch.int32), tau, tau, vector(), m, m, sub_dim,
                    shape_bucket(m))
        specs += [
            CompileSpec(f"supcon_{name}_forward", "forward", _supcon_forward_kernel.fn, forward, common),
            CompileSpec(f"supcon_{name}_backward", "backward", _supcon_backward_kernel.fn, backward,
                        dict(common, PRESCALE=gradient_prescale(dtype), SCALE_OPERAND=dtype == torch.float16)),
        ]
    return specs
