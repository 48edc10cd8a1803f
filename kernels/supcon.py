"""SupCon L_out (docs/spec.md) as fused Triton kernels on the block loop (kernels/block.py): O(M) memory,
deterministic backward, no atomics.

Rows are view-major (M = V·N, row r = v·N + n is features[n, v]); each view is an [N, D] matrix read in
place through the strides of features [N, V, D] (first D' = ``sub_dim`` features). Anchors are the views
0..anchor_views−1 (``contrast_mode="all"``: every view, ``"one"``: view 0). A launch's program owns
BLOCK_M rows of one view (grid axis: the view) and walks the key views in turn: the own view holds the
self entries (the few masked tiles), the others none (a self offset of N, out of range). With ``normalize``
a pre-pass stores r = 1/max(‖row[:D']‖, 1e-12) (O(M·D')); logits are base 2 as in the block loop.

Positives — labels: no compare in the element loop. With per-class sums of the unit rows C_y (torch,
O(M·D'), a class id per sample from one sort: ``torch_backend.supcon.label_classes``),
Σ_{p∈P(a)} s_ap = ẑ_a·(C_{y_a} − ẑ_a)/τ and |P(a)| = V·|y_a| − 1. A bool mask [N, N]: a weight read per
element (mask[a mod N, c mod N]), small tiles (not a tuned path).

Forward — per anchor block the online (max, sum) of exp2 over every key view (``block._fold_keys``),
storing lse and, for a mask, Σ_{c∈P} s and |P|. With A⁺ = anchors having a positive and κ = τ/τ_b,
    L = κ/|A⁺| · Σ_{a∈A⁺} (lse_a − possum_a/|P(a)|)          (0 when A⁺ is empty)
is a deterministic torch reduction of per-row buffers.

Backward — with w_r = 1/|P(r)| for r ∈ A⁺ (else 0) and G = ∂L/∂S = κ/|A⁺| · Ĝ,
    T_rc = Ĝ_rc + Ĝ_cr = [r∈A⁺] e^{s_rc − lse_r} + [c∈A⁺] e^{s_rc − lse_c} − (w_r P_rc + w_c P_cr)
from one recomputed tile per (row block, key tile) (``block._symmetric_keys``; L = +inf for rows outside
A⁺ switches their exponential off). dẑ_r = Σ_c T_rc ẑ_c · κ/(|A⁺|τ), c_r = ⟨ẑ_r, dẑ_r⟩, dz_r =
r_r (dẑ_r − c_r r_r z_r) (F.normalize's backward). Labels: the positive part is a class-sum lookup after
the loop, Σ_{c∈P(r)} (w_r + w_c) ẑ_c = w_y (C_y + C^A_y) − 2w_r ẑ_r for an anchor row of class y (C^A: the
sums over the anchor views; w_y = 1/|P| of class y's anchors), w_y C^A_y for a row of a non-anchor view;
its part of c_r is a torch row dot. Rows of a non-anchor view only walk the anchor views' columns, where
their transposed terms live. Each program owns BLOCK_M rows × BLOCK_DO features of dfeatures; output
slice 0 stores c (Σ_r c_r / 2 = Σ G s, for dL/dτ).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fastcl.contract import class_segments, class_sums
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
    prune,
    shape_bucket,
    single_rows,
    stride_offsets,
    view_major_rows,
)
from fastcl.kernels.block import (
    _EVEN_FEATURES,
    _LN2,
    _LOG2E,
    _POSITIVES,
    _fold_keys,
    _load_slice,
    _row_chunks,
    _symmetric_keys,
)
from fastcl.ops import accumulation_dtype
from fastcl.torch_backend.supcon import positive_counts

_KEY = ["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE", "POSITIVES"]


@triton.autotune(configs=autotune_configs("block_forward"), key=_KEY, prune_configs_by=prune("block_forward"))
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _supcon_forward_kernel(
    f_ptr, stride_n, stride_v, stride_d, inv_ptr, tau_ptr, mask_ptr, stride_mask_0, stride_mask_1,
    lse_ptr, pos_sum_ptr, pos_weight_ptr, N, V, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Anchors: rows of view program_id(1). POSITIVES: 3 (mask, summed in the loop) or 0 (labels: the
    positive sums come from class sums on the host)."""
    view = tl.program_id(1)
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    a_ptr = f_ptr + tl.cast(view, tl.int64) * stride_v
    row_start = tl.cast(view, tl.int64) * N  # the view's first stacked row (int64 offsets: view × N)
    row_scale = load_inverse_norms(inv_ptr + row_start, rows, row_mask, NORMALIZE, ACC) * (_LOG2E / tl.load(tau_ptr))
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_n + stride_offsets(tl.arange(0, BLOCK_D), stride_d)[None, :]
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    pos_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    pos_weight = tl.zeros((BLOCK_M,), dtype=ACC)
    unused = tl.zeros((BLOCK_M,), dtype=tl.int32)  # index positives and labels: not read
    for key_view in range(0, V):
        # The own view holds the self entries; elsewhere an offset of N puts them out of range.
        self_offset = tl.where(key_view == view, 0, N)
        k_ptr = f_ptr + tl.cast(key_view, tl.int64) * stride_v
        running_max, running_sum, pos_sum, pos_weight = _fold_keys(
            running_max, running_sum, pos_sum, pos_weight, first_row, a_ptrs, k_ptr, stride_n, stride_d,
            inv_ptr + tl.cast(key_view, tl.int64) * N, rows, row_mask, row_scale, unused, unused, tau_ptr, mask_ptr,
            stride_mask_0, stride_mask_1, N, N, self_offset, 0.0, N, D, stride_d, NORMALIZE, POSITIVES, True, False,
            False, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION, ACC)
    tl.store(lse_ptr + row_start + rows, (running_max * row_scale + tl.log2(running_sum)) * _LN2, mask=row_mask)
    if POSITIVES == 3:
        tl.store(pos_sum_ptr + row_start + rows, pos_sum * _LN2, mask=row_mask)
        tl.store(pos_weight_ptr + row_start + rows, pos_weight, mask=row_mask)


@triton.autotune(configs=autotune_configs("symmetric_backward"), key=_KEY, prune_configs_by=prune("symmetric_backward"))
@_EVEN_FEATURES
@triton.jit
def _supcon_backward_kernel(
    f_ptr, stride_n, stride_v, stride_d, df_ptr, stride_dfn, stride_dfv, stride_dfd, inv_ptr, tau_ptr,
    mask_ptr, stride_mask_0, stride_mask_1, lse2_ptr, weight_ptr, class_ptr, class_sums_ptr, positive_radial_ptr,
    scale_ptr, radial_scale_ptr, radial_ptr, N, V, anchor_views, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DO: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, PRESCALE: tl.constexpr, SCALE_OPERAND: tl.constexpr,
):
    """dfeatures of rows ``rows`` of view program_id(2), features ``out``. lse2 [M]: lse·log2 e for rows in
    A⁺, +inf elsewhere; weight [M]: w_r. Labels (POSITIVES == 0): class [N] (a class id per sample),
    class_sums [anchor-view rows / other rows, N, D'] (C + C^A and C^A by class id), positive_radial [M]
    (the positive part of Σ_c T_rc s_rc, negated)."""
    view = tl.program_id(2)
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out < D
    row_start = tl.cast(view, tl.int64) * N  # the view's first stacked row (int64 offsets: view × N)
    a_ptr = f_ptr + tl.cast(view, tl.int64) * stride_v
    inv_rows = load_inverse_norms(inv_ptr + row_start, rows, row_mask, NORMALIZE, ACC)
    row_scale = inv_rows * (_LOG2E / tl.load(tau_ptr))
    lse2_rows = tl.load(lse2_ptr + row_start + rows, mask=row_mask, other=float("inf"))
    w_rows = tl.load(weight_ptr + row_start + rows, mask=row_mask, other=0.0)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_n + stride_offsets(tl.arange(0, BLOCK_D), stride_d)[None, :]
    d_hat = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    radial = tl.zeros((BLOCK_M,), dtype=ACC)
    # Rows of a view without anchors only have transposed terms, which live in the anchor views' columns.
    key_views = tl.where(view < anchor_views, V, anchor_views)
    k_start = 0  # the key view's first stacked row: a running sum (no key_view × N product, one register)
    for key_view in range(0, key_views):
        d_hat, radial = _symmetric_keys(
            d_hat, radial, first_row, a_ptrs, f_ptr + tl.cast(key_view, tl.int64) * stride_v, stride_n, stride_d,
            inv_ptr + k_start, lse2_ptr + k_start, weight_ptr + k_start, rows, row_mask, row_scale, lse2_rows,
            w_rows, mask_ptr, stride_mask_0, stride_mask_1, tl.where(key_view == view, 0, N), N, D, stride_d, out,
            out_mask, NORMALIZE, POSITIVES, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, EVEN_DO, PRECISION, ACC, PRESCALE,
            SCALE_OPERAND)
        k_start += N
    radial = radial * row_scale * _LN2
    if POSITIVES != 3:
        # −Σ_{c∈P(r)} (w_r + w_c) ẑ_c: one class-sum row per anchor (w_y from the sample's view-0 row).
        slot = tl.load(class_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        slot += tl.where(view < anchor_views, 0, N)
        sums = _load_slice(class_sums_ptr + slot[:, None] * D + out[None, :], row_mask, out_mask, True, EVEN_DO)
        own = _load_slice(a_ptr + rows.to(tl.int64)[:, None] * stride_n + stride_offsets(out, stride_d)[None, :],
                          row_mask, out_mask, True, EVEN_DO).to(ACC) * inv_rows[:, None]
        w_class = tl.load(weight_ptr + rows, mask=row_mask, other=0.0)
        d_hat -= PRESCALE * (w_class[:, None] * sums - (2.0 * w_rows)[:, None] * own)
        radial -= tl.load(positive_radial_ptr + row_start + rows, mask=row_mask, other=0.0)
    finish_row_gradient(single_rows(a_ptr, stride_n, stride_d, N),
                        single_rows(df_ptr + tl.cast(view, tl.int64) * stride_dfv, stride_dfn, stride_dfd, N), rows,
                        row_mask, out, out_mask, inv_rows, d_hat, radial, scale_ptr, radial_scale_ptr,
                        radial_ptr + row_start, NORMALIZE, ACC)


def _positive_source(mask: Optional[Tensor], placeholder: Tensor) -> tuple:
    """(mask_ptr, stride_0, stride_1, POSITIVES): a mask's bytes, or a placeholder the kernels never read."""
    if mask is None:
        return placeholder, 0, 0, _POSITIVES["none"]
    flags = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return flags, flags.stride(0), flags.stride(1), _POSITIVES["mask"]


def _unit_views(features: Tensor, inv: Optional[Tensor], start: int, stop: int, sub_dim: int) -> Tensor:
    """ẑ of samples start..stop in every view: [stop − start, V, sub_dim] in the accumulation dtype."""
    n, views, _ = features.shape
    rows = features[start:stop, :, :sub_dim].to(accumulation_dtype(features.dtype))
    return rows if inv is None else rows * inv.view(views, n)[:, start:stop].T[:, :, None]


def _chunks(features: Tensor, sub_dim: int):
    return _row_chunks(features.shape[0], features.shape[1] * sub_dim)


def _unit_class_sums(features: Tensor, inv: Optional[Tensor], classes: Tensor, sub_dim: int,
                     view_counts: tuple[int, ...]) -> list[Tensor]:
    """One [N, sub_dim] tensor per entry v of ``view_counts``: row y holds Σ ẑ over the samples of class id y
    in views 0..v−1 (0 for unused ids). One pass over the features for all of them."""
    n = features.shape[0]
    per_sample = [torch.empty(n, sub_dim, dtype=accumulation_dtype(features.dtype), device=features.device)
                  for _ in view_counts]
    for start, stop in _chunks(features, sub_dim):
        unit = _unit_views(features, inv, start, stop, sub_dim)
        for total, views in zip(per_sample, view_counts):
            total[start:stop] = unit[:, :views].sum(1)
    # Ordered class sums (fastcl.contract.class_sums): deterministic, no atomics.
    segments = class_segments(classes, n)
    return [class_sums(total, segments) for total in per_sample]


def supcon_forward(
    features: Tensor, labels: Optional[Tensor], mask: Optional[Tensor], tau: Tensor, base_temperature: float,
    n_anchors: int, sub_dim: int, normalize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, views, _ = features.shape
    anchor_views, acc = n_anchors // n, accumulation_dtype(features.dtype)
    inv = inverse_norms(view_major_rows(features), n * views, sub_dim) if normalize else None
    lse = torch.empty(n_anchors, dtype=acc, device=features.device)
    mask_ptr, stride_mask_0, stride_mask_1, positives = _positive_source(mask, tau)
    pos_sum, pos_weight = (torch.empty(n_anchors if mask is not None else 1, dtype=acc, device=features.device)
                           for _ in range(2))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), anchor_views)  # noqa: E731
    # Without normalization the kernel never reads the inverse norms; it gets a valid buffer instead.
    _supcon_forward_kernel[grid](
        features, *features.stride(), inv if normalize else tau, tau, mask_ptr, stride_mask_0, stride_mask_1,
        lse, pos_sum, pos_weight, n, views, sub_dim, shape_bucket(n * views),
        NORMALIZE=normalize, POSITIVES=positives, PRECISION=dot_precision(features.dtype),
        ACC=accumulator(features.dtype),
    )
    if mask is None:
        # Σ_{p∈P(a)} s_ap = ẑ_a·(C_{y_a} − ẑ_a)/τ from per-class sums; |P(a)| = V·|y_a| − 1.
        counts, classes = positive_counts(labels, None, views)
        counts, class_ids = counts[:n_anchors].to(torch.int32), classes.long()
        (sums,) = _unit_class_sums(features, inv, class_ids, sub_dim, (views,))
        pos_sum = torch.empty(anchor_views, n, dtype=acc, device=features.device)
        for start, stop in _chunks(features, sub_dim):
            unit = _unit_views(features, inv, start, stop, sub_dim)[:, :anchor_views]
            pos_sum[:, start:stop] = ((sums[class_ids[start:stop], None] - unit) * unit).sum(-1).T / tau
        pos_sum = pos_sum.reshape(-1)
    else:
        counts, classes = pos_weight.to(torch.int32), torch.empty(0, dtype=torch.int32, device=features.device)
    weighted = counts > 0
    per_anchor = torch.where(weighted, lse - pos_sum / counts.clamp(min=1).to(acc), 0.0)
    loss = (tau / base_temperature) * per_anchor.sum() / weighted.sum().clamp(min=1).to(acc)
    return loss, lse, counts, classes, inv if normalize else torch.empty(0, dtype=acc, device=features.device)


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
    classes: Tensor,
    inv_norms: Tensor,
) -> tuple[Tensor, Tensor]:
    """dL/dfeatures shaped like features (exactly zero beyond sub_dim) and Σ_ij G_ij s_ij; counts and
    classes: the forward's int32 |P(a)| and class ids (no count or sort here)."""
    n, views, dim = features.shape
    m, anchor_views = n * views, n_anchors // n
    acc = tau.dtype
    prescale = gradient_prescale(features.dtype)
    weighted = counts > 0
    n_weighted = weighted.sum().clamp(min=1).to(acc)
    grad = grad.to(acc)
    scale = (grad / (base_temperature * n_weighted * prescale)).reshape(())  # κ/τ = 1/τ_b
    radial_scale = (grad * tau / (base_temperature * n_weighted)).reshape(())  # κ/|A⁺|
    rest = lambda value: torch.full((m - n_anchors,), value, dtype=acc, device=features.device)  # noqa: E731
    weight = torch.cat([torch.where(weighted, 1.0 / counts.clamp(min=1).to(acc), 0.0), rest(0.0)])
    lse2 = torch.cat([torch.where(weighted, lse * math.log2(math.e), float("inf")), rest(float("inf"))])
    # The kernel writes the first sub_dim features; the rest of each row stays exactly zero.
    new = torch.zeros if sub_dim < dim else torch.empty
    dfeatures = new(features.shape, dtype=features.dtype, device=features.device)
    radial = torch.empty(m, dtype=acc, device=features.device)
    mask_ptr, stride_mask_0, stride_mask_1, positives = _positive_source(mask, tau)
    class_sums = positive_radial = tau
    if mask is None:
        inv = inv_norms if normalize else None
        class_ids = classes.long()
        if anchor_views == views:
            (sums,) = _unit_class_sums(features, inv, class_ids, sub_dim, (views,))
            class_sums = (2.0 * sums)[None]  # C + C^A with C^A = C
        else:
            sums, anchor_sums = _unit_class_sums(features, inv, class_ids, sub_dim, (views, anchor_views))
            # By class id: C + C^A for the anchor views' rows, C^A for the others'.
            class_sums = torch.stack([sums + anchor_sums, anchor_sums])
        kind = (torch.arange(views, device=features.device) >= anchor_views).long()
        positive_radial = torch.empty(views, n, dtype=acc, device=features.device)
        for start, stop in _chunks(features, sub_dim):
            unit = _unit_views(features, inv, start, stop, sub_dim)
            by_view = class_sums[:, class_ids[start:stop]][kind].transpose(0, 1)  # [rows, V, sub_dim]
            w_rows = weight.view(views, n)[:, start:stop].T[:, :, None]
            positive = weight[start:stop, None, None] * by_view - 2.0 * w_rows * unit
            positive_radial[:, start:stop] = (unit * positive).sum(-1).T / tau
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(sub_dim, meta["BLOCK_DO"]), views)  # noqa: E731
    wrap_triton(_supcon_backward_kernel)[grid](
        features, *features.stride(), dfeatures, *dfeatures.stride(), inv_norms if normalize else tau, tau,
        mask_ptr, stride_mask_0, stride_mask_1, lse2, weight, classes if mask is None else tau, class_sums,
        positive_radial, scale, radial_scale, radial, n, views, anchor_views, sub_dim, shape_bucket(m),
        NORMALIZE=normalize, POSITIVES=positives, PRECISION=dot_precision(features.dtype),
        ACC=accumulator(features.dtype), PRESCALE=prescale, SCALE_OPERAND=features.dtype == torch.float16,
    )
    return dfeatures, radial.sum() / 2


def compile_specs(dtype: torch.dtype, precision: str, sub_dim: int, n: int = 2048,
                  layout: str = "contiguous") -> list[CompileSpec]:
    """Forward and backward with labels and with a bool mask, on features [n, 2, sub_dim] in ``layout``."""
    acc = accumulation_dtype(dtype)
    m = 2 * n
    features = example_rows((n, 2, sub_dim), dtype, layout)
    vector = lambda: torch.empty(m, dtype=acc)  # noqa: E731
    tau = torch.empty((), dtype=acc)
    specs = []
    for name, mask in (("labels", None), ("mask", torch.empty(n, n, dtype=torch.bool))):
        mask_ptr, stride_mask_0, stride_mask_1, positives = _positive_source(mask, tau)
        common = dict(NORMALIZE=True, POSITIVES=positives, PRECISION=precision, ACC=accumulator(dtype))
        forward = (features, *features.stride(), vector(), tau, mask_ptr, stride_mask_0, stride_mask_1, vector(),
                   vector(), vector(), n, 2, sub_dim, shape_bucket(m))
        gradient = torch.empty(features.shape, dtype=dtype)  # allocated contiguous by the op
        backward = (features, *features.stride(), gradient, *gradient.stride(), vector(), tau,
                    mask_ptr, stride_mask_0, stride_mask_1, vector(), vector(), torch.empty(n, dtype=torch.int32),
                    torch.empty(1, n, sub_dim, dtype=acc), vector(), tau, tau, vector(), n, 2, 2, sub_dim,
                    shape_bucket(m))
        specs += [
            CompileSpec(f"supcon_{name}_forward", "block_forward", _supcon_forward_kernel.fn, forward, common),
            CompileSpec(f"supcon_{name}_backward", "symmetric_backward", _supcon_backward_kernel.fn, backward,
                        dict(common, PRESCALE=gradient_prescale(dtype), SCALE_OPERAND=dtype == torch.float16)),
        ]
    return specs
