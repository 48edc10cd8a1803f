"""The block primitive (docs/block-engine.md) as Triton kernels: A anchor rows × K key rows from two
tensors (any strides, first ``sub_dim`` features read in place), fused normalization through the given
inverse norms, every ``Layout.positives`` kind, ``self_offset`` and ``exclude_positives``; deterministic,
no atomics. Both epilogues: softmax (log-sum-exp) and SigLIP's sigmoid (SIGMOID constexpr: Σ softplus(s + b)
forward, G = alpha·σ(s + b) − beta·P backward, gs = [Σ G·s, Σ G]).

Logits in base 2: every tile is t = (a·kᵀ)·(a_inv·log2 e/τ)·k_inv = s·log2 e — the row scale (with 1/τ and
log2 e folded in) is computed once per anchor block, so the element loop does one exp2 per element and
no division; lse and the positive sums return to natural units once per row (× ln 2).

Element loops without masks: the key tiles of a program are split into the steady ones (no padding, no
self entry: unmasked loads when D' is a multiple of BLOCK_D, no compares) and the few masked ones (the
tiles holding the anchors' own rows when ``self_offset`` is set, and the tail tile), which run the same
fold with masks. Pointers are built once for tile 0 and moved by one scalar offset per tile.

Forward — one program per block of BLOCK_M anchors walks the key tiles: the online (max, sum) of exp2
over the entries left in the denominator; mask positives are a weight read per element; index positives
are not in the loop at all: s_{a,pos(a)} is one row dot per anchor after it; nor are label positives:
Σ_{c: y_c = y_a} s_ac = â·(Σ_{c: y_c = y_a} k̂_c)/τ from per-class sums of the key rows (torch, O(K·D'),
``_label_positives``) — only when the denominator must drop the positives too (EXCLUDE_POSITIVES) does
the loop compare labels (int32) per element. Stores lse[A], pos_sum[A], pos_weight[A].

Backward — G_ac = alpha_a·exp(s_ac − lse_a) − beta_a·P_ac (0 on the self entry and padding; the
exponential term 0 on excluded entries), from the recomputed tile:
- anchor pass: a program owns BLOCK_M anchors × BLOCK_DO features and walks the key tiles:
  dâ += G·k̂ (k̂'s inverse norms folded into G's columns; k̂ itself as the fp16 operand). Index positives
  add −beta_a·k̂_pos(a) after the loop (a gather);
- key pass: a program owns BLOCK_N keys × BLOCK_DO features and walks the anchor tiles: dk̂ += Gᵀ·â from
  the same tile a·kᵀ (the result is transposed, not the operands); index positives are a compare here.
- own blocks (``Layout.own_block``: the keys are the anchors): the anchor pass alone (OWN constexpr), with
  G_ac + G_ca from the same tile — the columns' lse/alpha/beta, P_ca as the columns' positive index
  compared with the rows, the same label compare, or the mask read transposed — so d_a is the rows' whole
  gradient: forward, recompute and dZ, 3 GEMM-units instead of 4 (``_key_side``);
- a row epilogue per side (O(rows·D')): radial = ⟨x̂, dx̂⟩ = Σ G·s (so no per-element Σ G·s in the
  loops), F.normalize's backward in place (``_common.store_row_gradient``); gs = Σ_a radial_a (a torch
  sum: deterministic).

Example (CPU through ``TRITON_INTERPRET=1``, or CUDA tensors):
    >>> import os, torch
    >>> from fastcl.contract import Layout
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

import inspect
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcl.contract import Layout, PositiveKind, accumulation_dtype, class_segments, class_sums
from fastcl.kernels._common import (
    LAUNCH_OPTIONS,
    CompileSpec,
    accumulator,
    autotune_configs,
    dot_precision,
    example_rows,
    gradient_prescale,
    interpreted,
    load_inverse_norms,
    mma,
    prune,
    shape_bucket,
    single_rows,
    store_row_gradient,
    stride_offsets,
)

# Autotuning of the two backward passes (keyed like the forward, the anchor pass also on OWN) and their
# even-width flags.
_BACKWARD_KEY = ["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE", "POSITIVES", "HAS_SELF", "EXCLUDE_POSITIVES", "SIGMOID"]
_ANCHOR_TUNING = triton.autotune(configs=autotune_configs("block_backward"), prune_configs_by=prune("block_backward"),
                                 key=_BACKWARD_KEY + ["OWN"])
_BACKWARD_TUNING = triton.autotune(configs=autotune_configs("block_backward"), prune_configs_by=prune("block_backward"),
                                   key=_BACKWARD_KEY)
_EVEN_FEATURES = triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
                                    "EVEN_DO": lambda args: args["D"] % args["BLOCK_DO"] == 0})
_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))
SUPPORTS_OWN_BLOCK = True  # block_backward honours Layout.own_block (fastcl.dispatch.supports_own_block)
# The kernels' POSITIVES constexpr: Layout.positives as fastcl.contract.PositiveKind, named in the kernels.
_INDEX = tl.constexpr(int(PositiveKind.INDEX))
_LABELS = tl.constexpr(int(PositiveKind.LABELS))
_MASK = tl.constexpr(int(PositiveKind.MASK))
# The tile walk (_tile_schedule): two unmasked phases, then the masked one.
_PHASES = tl.constexpr(3)
_MASKED_PHASE = tl.constexpr(2)


@triton.jit
def _positive_weights(
    rows, row_mask, cols, col_mask, pos_rows, a_labels, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k,
    mask_rows, mask_cols, POSITIVES: tl.constexpr, ACC: tl.constexpr, TRANSPOSED: tl.constexpr = False,
):
    """P for the tile (0 outside the valid keys); pos_rows / a_labels: the rows' index or label.
    TRANSPOSED (mask positives): P_ca = mask[c mod Na, a mod Nk] in the same [rows, cols] orientation."""
    if POSITIVES == _INDEX:
        p = tl.where(cols[None, :] == pos_rows[:, None], 1.0, 0.0).to(ACC)
    elif POSITIVES == _LABELS:
        k_labels = tl.load(k_labels_ptr + cols, mask=col_mask, other=0)
        p = tl.where((a_labels[:, None] == k_labels[None, :]) & col_mask[None, :], 1.0, 0.0).to(ACC)
    elif POSITIVES == _MASK:
        # int64 offsets: an [N, N] mask passes 2³¹ elements at N ≈ 46 000.
        if TRANSPOSED:
            offsets = (cols % mask_rows).to(tl.int64)[None, :] * stride_mask_a \
                + (rows % mask_cols).to(tl.int64)[:, None] * stride_mask_k
        else:
            offsets = (rows % mask_rows).to(tl.int64)[:, None] * stride_mask_a \
                + (cols % mask_cols).to(tl.int64)[None, :] * stride_mask_k
        p = tl.load(mask_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0).to(ACC)
    else:
        p = tl.zeros((rows.shape[0], cols.shape[0]), dtype=ACC)
    return p


@triton.jit
def _row_positives(pos_index_ptr, a_labels_ptr, rows, row_mask, POSITIVES: tl.constexpr):
    """The rows' positive index (−1: none) and label, loaded once per anchor block (zeros when unused)."""
    if POSITIVES == _INDEX:
        pos_rows = tl.load(pos_index_ptr + rows, mask=row_mask, other=-1)
    else:
        pos_rows = tl.zeros(rows.shape, dtype=tl.int64) - 1
    if POSITIVES == _LABELS:
        a_labels = tl.load(a_labels_ptr + rows, mask=row_mask, other=0)
    else:
        a_labels = tl.zeros(rows.shape, dtype=tl.int32)
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


@triton.jit
def _similarity_chunks(
    a_ptrs, b_ptrs, row_mask, col_mask, D, stride_ad, stride_kd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """A[rows]·K[cols]ᵀ over D in BLOCK_D chunks from precomputed chunk-0 pointers. Loads are masked only
    where needed: rows when MASK_ROWS, columns when MASK_COLS, features unless EVEN_D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            d_mask = tl.full((BLOCK_D,), 1, tl.int1)
        else:
            d_mask = (d0 + offs_d) < D
        if MASK_ROWS:
            a = tl.load(a_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=d_mask[None, :], other=0.0)
        if MASK_COLS:
            b = tl.load(b_ptrs, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=d_mask[None, :], other=0.0)
        acc = mma(a, tl.trans(b), acc, PRECISION, ACC)
        a_ptrs += stride_offsets(BLOCK_D, stride_ad)
        b_ptrs += stride_offsets(BLOCK_D, stride_kd)
    return acc


@triton.jit
def _key_tile_logits(
    start, a_ptrs, b_ptrs0, k_inv_ptr, row_mask, row_scale, K, D, stride_ad, stride_km, stride_kd,
    NORMALIZE: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    SCALE_ROWS: tl.constexpr = True,
):
    """(cols, col_mask, t, k_inv) of key tile ``start`` for a fixed anchor block: base-2 logits
    t = (a·kᵀ)·row_scale·k_inv; without SCALE_ROWS t/row_scale (the forward folds the row scale into
    its exp2's FFMA). Tile-0 pointers plus one scalar offset: no per-element index math; MASKED: the
    tile may hold padding keys (unmasked tiles get a constant-true mask)."""
    cols = start + tl.arange(0, BLOCK_N)
    if MASKED:
        col_mask = cols < K
    else:
        col_mask = tl.full((BLOCK_N,), 1, tl.int1)
    b_ptrs = b_ptrs0 + tl.cast(start, tl.int64) * stride_km
    acc = _similarity_chunks(a_ptrs, b_ptrs, row_mask, col_mask, D, stride_ad, stride_kd, BLOCK_M, BLOCK_N,
                             BLOCK_D, EVEN_D, True, MASKED, PRECISION, ACC)
    if NORMALIZE:
        if MASKED:
            k_inv = tl.load(k_inv_ptr + cols, mask=col_mask, other=1.0)
        else:
            k_inv = tl.load(k_inv_ptr + cols)
        t = acc * k_inv[None, :]
    else:
        k_inv = tl.full((BLOCK_N,), 1.0, ACC)
        t = acc
    if SCALE_ROWS:
        t = t * row_scale[:, None]
    return cols, col_mask, t, k_inv


# tl.math.fdiv's approx= (div.approx.f32) is newer than triton 3.6, the oldest triton fastcl supports; there
# a plain fdiv lowers to div.full.f32, also 2 ulp without the IEEE slow path (both read off sm90 PTX).
_FDIV_HAS_APPROX = tl.constexpr("approx" in inspect.signature(tl.math.fdiv).parameters)


@triton.jit
def _divide(x, y, ACC: tl.constexpr):
    """x / y for a denominator in [1, 2]: the fast (2-ulp) float32 division, no IEEE slow path (whose
    call frame ptxas reports as spill stores); float64 divides exactly."""
    if ACC == tl.float32:
        if _FDIV_HAS_APPROX:
            return tl.math.fdiv(x, y, approx=True)
        else:
            return tl.math.fdiv(x, y)
    else:
        return x / y


@triton.jit
def _softplus2(u, ACC: tl.constexpr):
    """log2(1 + 2^u) = softplus(u·ln 2)·log2 e, safe for any u (−inf → 0): max(u, 0) + log2(1 + y) with
    y = 2^−|u| ≤ 1. log1p through w = 1 + y: log2(w) plus the rounding of w, (y − (w − 1))·log2 e / w
    (exactly y·log2 e where w rounds to 1)."""
    y = tl.exp2(-tl.abs(u))
    w = 1.0 + y
    return tl.maximum(u, 0.0) + tl.log2(w) + _divide((y - (w - 1.0)) * _LOG2E, w, ACC)


@triton.jit
def _fold_tile(
    stats, start, a_ptrs, b_ptrs0, stride_km, stride_kd, k_inv_ptr, anchors, row_scale, entries, stride_mask_a,
    stride_mask_k, bias2, K, D, stride_ad,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    SIGMOID: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Folds key tile ``start`` into the anchors' running statistics. MASKED: the tile may hold padding
    columns or self entries; unmasked tiles (the steady state) skip every mask. SIGMOID: running_sum
    accumulates Σ log2(1 + 2^(t + b·log2 e)) (excluded entries are t = −inf → 0); running_max is unused.
    The tile holds u = t/row_scale (row_scale > 0 keeps the order, so the running max is kept in u); the
    row scale enters the exp2 argument's FFMA and the row sums once per tile. ``stats``: (running_max,
    running_sum, pos_sum, pos_weight); ``anchors``, ``entries``: see :func:`_fold_keys`."""
    running_max, running_sum, pos_sum, pos_weight = stats
    rows, row_mask, pos_rows, a_labels = anchors
    k_labels_ptr, mask_ptr, mask_rows, mask_cols, self_offset = entries
    cols, col_mask, t, k_inv = _key_tile_logits(
        start, a_ptrs, b_ptrs0, k_inv_ptr, row_mask, row_scale, K, D, stride_ad, stride_km, stride_kd, NORMALIZE,
        MASKED, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION, ACC, False)
    if POSITIVES == _LABELS:
        # Labels: a compare per element, no weight tile (keeps registers down).
        if MASKED:
            k_labels = tl.load(k_labels_ptr + cols, mask=col_mask, other=0)
        else:
            k_labels = tl.load(k_labels_ptr + cols)
        same = a_labels[:, None] == k_labels[None, :]
        if MASKED:
            kept = col_mask[None, :]
            if HAS_SELF:
                kept = kept & (cols[None, :] != rows[:, None] + self_offset)
            same = same & kept
        pos_sum += tl.sum(tl.where(same, t, 0.0), axis=1) * row_scale
        pos_weight += tl.sum(same.to(ACC), axis=1)
        if MASKED:
            t = tl.where(kept, t, float("-inf"))
        if EXCLUDE_POSITIVES:
            t = tl.where(same, float("-inf"), t)
    elif POSITIVES == _MASK or (POSITIVES == _INDEX and EXCLUDE_POSITIVES):
        p = _positive_weights(rows, row_mask, cols, col_mask, pos_rows, a_labels, k_labels_ptr, mask_ptr,
                              stride_mask_a, stride_mask_k, mask_rows, mask_cols, POSITIVES, ACC)
        if MASKED:
            p, kept, denominator = _entry_masks(rows, cols, col_mask, p, self_offset, HAS_SELF, EXCLUDE_POSITIVES)
        elif EXCLUDE_POSITIVES:
            denominator = p == 0.0
        if POSITIVES == _MASK:  # index positives are summed outside the loop
            pos_sum += tl.sum(p * t, axis=1) * row_scale
            pos_weight += tl.sum(p, axis=1)
        if MASKED or EXCLUDE_POSITIVES:
            t = tl.where(denominator, t, float("-inf"))
    elif MASKED:  # no positives in this block: nothing for EXCLUDE_POSITIVES to leave out
        p, kept, denominator = _entry_masks(rows, cols, col_mask, t, self_offset, HAS_SELF, False)
        t = tl.where(denominator, t, float("-inf"))
    if SIGMOID:
        new_max = running_max
        running_sum += tl.sum(_softplus2(t * row_scale[:, None] + bias2, ACC), axis=1)
    else:
        new_max = tl.maximum(running_max, tl.max(t, axis=1))
        # Rows with no entry yet keep max −inf; shift by 0 there so exp2(−inf − shift) = 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max * row_scale)
        running_sum = running_sum * tl.exp2(running_max * row_scale - shift) \
            + tl.sum(tl.exp2(t * row_scale[:, None] - shift[:, None]), axis=1)
    return new_max, running_sum, pos_sum, pos_weight


@triton.jit
def _tile_schedule(first, extent, offset, n, block, HAS_SELF: tl.constexpr):
    """The order every program walks the other side's n rows in tiles of ``block`` — the one tile walk of
    this file, in :data:`_PHASES` phases (:func:`_phase_steps`, :func:`_phase_tile`): the steady tiles
    [0, self_lo), then [self_hi, full) (no padding, no self entry: unmasked), then masked: [self_lo,
    self_hi), the tiles holding indices first + offset .. first + extent − 1 + offset where the program's
    self entries lie (empty without HAS_SELF), and the tail tile when n is no multiple of ``block``.
    Returns (full, self_lo, self_hi); the tail is counted when the masked phase starts (:func:`_phase_steps`)."""
    full = n // block
    self_lo = full
    self_hi = full
    if HAS_SELF:
        self_lo = tl.minimum(tl.maximum((first + offset) // block, 0), full)
        self_hi = tl.minimum(tl.maximum(tl.cdiv(first + extent + offset, block), self_lo), full)
    return full, self_lo, self_hi


@triton.jit
def _phase_steps(phase: tl.constexpr, schedule, n, BLOCK: tl.constexpr):
    """(lo, hi): the loop range of a walk phase over n rows in tiles of BLOCK (see :func:`_tile_schedule`)."""
    full, self_lo, self_hi = schedule
    if phase == 0:
        lo, hi = 0, self_lo
    elif phase == 1:
        lo, hi = self_hi, full
    else:
        lo, hi = 0, self_hi - self_lo + tl.cdiv(n, BLOCK) - full
    return lo, hi


@triton.jit
def _phase_tile(phase: tl.constexpr, step, schedule):
    """The tile index of loop step ``step`` of a walk phase (the masked phase: self tiles, then the tail)."""
    full, self_lo, self_hi = schedule
    tile = step
    if phase == _MASKED_PHASE:
        tile = tl.where(self_lo + step < self_hi, self_lo + step, full)
    return tile


@triton.jit
def _fold_keys(
    running_max, running_sum, pos_sum, pos_weight, first_row, a_ptrs, k_ptr, stride_km, stride_kd, k_inv_ptr,
    rows, row_mask, row_scale, pos_rows, a_labels, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k,
    mask_rows, mask_cols, self_offset, bias2, K, D, stride_ad,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Folds all K key rows at ``k_ptr`` into the anchor block's running statistics (:func:`_fold_tile`, in
    the order of :func:`_tile_schedule`: the tiles holding the anchors' own rows and the tail tile through the
    masked fold, the rest through the unmasked one). Inside, the values travel in small tuples: ``stats``,
    ``anchors`` = (rows, row_mask, pos_rows, a_labels) and ``entries`` = (k_labels_ptr, mask_ptr, mask_rows,
    mask_cols, self_offset); strides stay separate arguments (a unit stride is a compile-time constant only
    as an argument of its own)."""
    stats = (running_max, running_sum, pos_sum, pos_weight)
    anchors = (rows, row_mask, pos_rows, a_labels)
    entries = (k_labels_ptr, mask_ptr, mask_rows, mask_cols, self_offset)
    tile_cols = tl.arange(0, BLOCK_N).to(tl.int64)
    b_ptrs0 = k_ptr + tile_cols[:, None] * stride_km + stride_offsets(tl.arange(0, BLOCK_D), stride_kd)[None, :]
    schedule = _tile_schedule(first_row, BLOCK_M, self_offset, K, BLOCK_N, HAS_SELF)
    for phase in tl.static_range(_PHASES):
        lo, hi = _phase_steps(phase, schedule, K, BLOCK_N)
        for step in range(lo, hi):
            stats = _fold_tile(
                stats, _phase_tile(phase, step, schedule) * BLOCK_N, a_ptrs, b_ptrs0, stride_km, stride_kd, k_inv_ptr,
                anchors, row_scale, entries, stride_mask_a, stride_mask_k, bias2, K, D, stride_ad, NORMALIZE,
                POSITIVES, HAS_SELF, EXCLUDE_POSITIVES, SIGMOID, phase == _MASKED_PHASE, BLOCK_M, BLOCK_N, BLOCK_D,
                EVEN_D, PRECISION, ACC)
    return stats


@triton.jit
def _index_positive(
    a_ptr, stride_am, stride_ad, k_ptr, stride_km, stride_kd, k_inv_ptr, rows, row_mask, row_scale, pos_rows,
    self_offset, D, NORMALIZE: tl.constexpr, HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """(t_{a,pos(a)}, 1) per anchor with a positive in the block, else (0, 0): an O(BLOCK_M·D) row dot
    outside the element loop (products exact in ACC for 16-bit rows)."""
    valid = row_mask & (pos_rows >= 0)
    if HAS_SELF:
        valid = valid & (pos_rows != rows + self_offset)
    pos = tl.where(valid, pos_rows, 0)
    dot = tl.zeros((BLOCK_M,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = valid[:, None] & (d < D)[None, :]
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_am + stride_offsets(d, stride_ad)[None, :], mask=mask,
                    other=0.0)
        k = tl.load(k_ptr + pos.to(tl.int64)[:, None] * stride_km + stride_offsets(d, stride_kd)[None, :], mask=mask,
                    other=0.0)
        dot += tl.sum(a.to(ACC) * k.to(ACC), axis=1)
    if NORMALIZE:
        dot *= tl.load(k_inv_ptr + pos, mask=valid, other=1.0)
    return tl.where(valid, dot * row_scale, 0.0), tl.where(valid, 1.0, 0.0).to(ACC)


@triton.autotune(configs=autotune_configs("block_forward"),
                 key=["D", "SHAPE_BUCKET", "PRECISION", "NORMALIZE", "POSITIVES", "HAS_SELF", "EXCLUDE_POSITIVES",
                      "SIGMOID"],
                 prune_configs_by=prune("block_forward"))
@triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
@triton.jit
def _block_forward_kernel(
    a_ptr, stride_am, stride_ad, k_ptr, stride_km, stride_kd, a_inv_ptr, k_inv_ptr, tau_ptr,
    pos_index_ptr, a_labels_ptr, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k, mask_rows, mask_cols,
    self_offset, bias_ptr, lse_ptr, pos_sum_ptr, pos_weight_ptr, A, K, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < A
    row_scale = load_inverse_norms(a_inv_ptr, rows, row_mask, NORMALIZE, ACC) * (_LOG2E / tl.load(tau_ptr))
    pos_rows, a_labels = _row_positives(pos_index_ptr, a_labels_ptr, rows, row_mask, POSITIVES)
    bias2 = tl.load(bias_ptr).to(ACC) * _LOG2E  # sigmoid: b in base 2 (a placeholder otherwise, unused)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + stride_offsets(tl.arange(0, BLOCK_D), stride_ad)[None, :]
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    pos_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    pos_weight = tl.zeros((BLOCK_M,), dtype=ACC)
    running_max, running_sum, pos_sum, pos_weight = _fold_keys(
        running_max, running_sum, pos_sum, pos_weight, first_row, a_ptrs, k_ptr, stride_km, stride_kd, k_inv_ptr,
        rows, row_mask, row_scale, pos_rows, a_labels, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k,
        mask_rows, mask_cols, self_offset, bias2, K, D, stride_ad, NORMALIZE, POSITIVES, HAS_SELF, EXCLUDE_POSITIVES,
        SIGMOID, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION, ACC)
    if POSITIVES == _INDEX:
        pos_sum, pos_weight = _index_positive(a_ptr, stride_am, stride_ad, k_ptr, stride_km, stride_kd, k_inv_ptr,
                                              rows, row_mask, row_scale, pos_rows, self_offset, D, NORMALIZE,
                                              HAS_SELF, BLOCK_M, BLOCK_D, ACC)
    if SIGMOID:
        tl.store(lse_ptr + rows, running_sum * _LN2, mask=row_mask)
    else:
        tl.store(lse_ptr + rows, (running_max * row_scale + tl.log2(running_sum)) * _LN2, mask=row_mask)
    tl.store(pos_sum_ptr + rows, pos_sum * _LN2, mask=row_mask)
    tl.store(pos_weight_ptr + rows, pos_weight, mask=row_mask)


@triton.jit
def _row_coefficients(lse_ptr, alpha_ptr, beta_ptr, bias_ptr, rows, row_mask, PRESCALE: tl.constexpr,
                      SIGMOID: tl.constexpr):
    """(lse2, alpha·PRESCALE, beta·PRESCALE) of the rows. Softmax: lse2 = lse·log2 e; an anchor with
    lse = −inf (no entry anywhere) has no exponential term, so alpha = 0 and lse2 = 0 there (never
    exp2(+inf)). Sigmoid: lse is not read; lse2 = −b·log2 e, so (s + b)·log2 e = t − lse2."""
    beta = tl.load(beta_ptr + rows, mask=row_mask, other=0.0)
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    if SIGMOID:
        lse2 = tl.zeros(rows.shape, dtype=alpha.dtype) - tl.load(bias_ptr).to(alpha.dtype) * _LOG2E
    else:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        empty = lse == float("-inf")
        alpha = tl.where(empty, 0.0, alpha)
        lse2 = tl.where(empty, 0.0, lse * _LOG2E)
    return lse2, alpha * PRESCALE, beta * PRESCALE


@triton.jit
def _gradient_tile(
    t, anchors, cols, col_mask, coefficients, entries, stride_mask_a, stride_mask_k, key_rows,
    POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr, INDEX_IN_LOOP: tl.constexpr,
    MASKED: tl.constexpr, ACC: tl.constexpr, SIGMOID: tl.constexpr, OWN: tl.constexpr = False,
):
    """G·PRESCALE for a tile of base-2 logits t. MASKED: padding and self entries are zeroed; unmasked
    tiles have none. Index positives enter only when INDEX_IN_LOOP (the key pass) or for the DCL
    exclusion; the anchor pass adds −beta·k̂_pos outside the loop. SIGMOID: e = σ(s + b) (lse2 = −b·log2 e).
    OWN (an own block): G_ac + G_ca, the key side from the columns' coefficients ``key_rows`` = (lse2,
    alpha, beta, positive index) of the same rows (t is symmetric: s_ac = s_ca) — see :func:`_key_side`.
    ``anchors``, ``entries``: as :func:`_fold_keys`; ``coefficients``: the rows' (lse2, alpha, beta)."""
    rows, row_mask, pos_rows, a_labels = anchors
    k_labels_ptr, mask_ptr, mask_rows, mask_cols, self_offset = entries
    lse2, alpha, beta = coefficients
    if SIGMOID:
        u = t - lse2[:, None]  # (s + b)·log2 e
        y = tl.exp2(-tl.abs(u))  # ≤ 1: σ = 1/(1 + y) for u ≥ 0, y/(1 + y) below, no overflow
        e = _divide(tl.where(u >= 0.0, 1.0, y), 1.0 + y, ACC)
    else:
        e = tl.exp2(t - lse2[:, None])
    if OWN:
        g_key = _key_side(t, e, anchors, cols, col_mask, entries, stride_mask_a, stride_mask_k, key_rows, POSITIVES,
                          EXCLUDE_POSITIVES, MASKED, ACC, SIGMOID)
    if POSITIVES == _LABELS:
        if MASKED:
            k_labels = tl.load(k_labels_ptr + cols, mask=col_mask, other=0)
        else:
            k_labels = tl.load(k_labels_ptr + cols)
        same = a_labels[:, None] == k_labels[None, :]
        if EXCLUDE_POSITIVES:
            e = tl.where(same, 0.0, e)
        g = alpha[:, None] * e - tl.where(same, beta[:, None], 0.0)
    elif POSITIVES == _MASK:
        p = _positive_weights(rows, row_mask, cols, col_mask, pos_rows, a_labels, k_labels_ptr, mask_ptr,
                              stride_mask_a, stride_mask_k, mask_rows, mask_cols, POSITIVES, ACC)
        if EXCLUDE_POSITIVES:
            e = tl.where(p == 0.0, e, 0.0)
        g = alpha[:, None] * e - beta[:, None] * p
    elif POSITIVES == _INDEX and (INDEX_IN_LOOP or EXCLUDE_POSITIVES):
        same = cols[None, :] == pos_rows[:, None]
        if EXCLUDE_POSITIVES:
            e = tl.where(same, 0.0, e)
        if INDEX_IN_LOOP:
            g = alpha[:, None] * e - tl.where(same, beta[:, None], 0.0)
        else:
            g = alpha[:, None] * e
    else:
        g = alpha[:, None] * e
    if OWN:
        g += g_key
    if MASKED:
        kept = row_mask[:, None] & col_mask[None, :]
        if HAS_SELF:
            kept = kept & (cols[None, :] != rows[:, None] + self_offset)
        g = tl.where(kept, g, 0.0)
    return g


@triton.jit
def _key_side(
    t, e_rows, anchors, cols, col_mask, entries, stride_mask_a, stride_mask_k, key_rows,
    POSITIVES: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr, MASKED: tl.constexpr, ACC: tl.constexpr,
    SIGMOID: tl.constexpr,
):
    """G_ca·PRESCALE of an own block in the [rows, cols] orientation: alpha_c·exp(s_ac − lse_c) −
    beta_c·P_ca from the same tile t (the sigmoid's σ(s + b) is the rows' ``e_rows`` itself). P_ca: the
    columns' positive index compared with the rows, the same label compare (both sides are the rows'
    labels), the mask read transposed (it may be asymmetric). Padding and the self entry: the caller's."""
    rows, row_mask, _, a_labels = anchors
    k_labels_ptr, mask_ptr, mask_rows, mask_cols, _ = entries
    lse2, alpha, beta, pos_cols = key_rows
    if SIGMOID:
        e = e_rows
    else:
        e = tl.exp2(t - lse2[None, :])
    if POSITIVES == _INDEX:
        same = rows[:, None] == pos_cols[None, :]
        if EXCLUDE_POSITIVES:
            e = tl.where(same, 0.0, e)
        g = alpha[None, :] * e - tl.where(same, beta[None, :], 0.0)
    elif POSITIVES == _LABELS:
        if MASKED:
            k_labels = tl.load(k_labels_ptr + cols, mask=col_mask, other=0)
        else:
            k_labels = tl.load(k_labels_ptr + cols)
        same = a_labels[:, None] == k_labels[None, :]
        if EXCLUDE_POSITIVES:
            e = tl.where(same, 0.0, e)
        g = alpha[None, :] * e - tl.where(same, beta[None, :], 0.0)
    elif POSITIVES == _MASK:
        p = _positive_weights(rows, row_mask, cols, col_mask, rows, a_labels, k_labels_ptr, mask_ptr, stride_mask_a,
                              stride_mask_k, mask_rows, mask_cols, POSITIVES, ACC, True)
        if EXCLUDE_POSITIVES:
            e = tl.where(p == 0.0, e, 0.0)
        g = alpha[None, :] * e - beta[None, :] * p
    else:
        g = alpha[None, :] * e
    return g


@triton.jit
def _anchor_tile(
    d_hat, g_sum, start, a_ptrs, b_ptrs0, slice_ptrs0, stride_km, stride_kd, k_inv_ptr, anchors, row_scale,
    coefficients, entries, stride_mask_a, stride_mask_k, K, D, stride_ad, out_mask, coefficient_ptrs,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    SIGMOID: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DO: tl.constexpr, SCALE_OPERAND: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, PRESCALE: tl.constexpr, OWN: tl.constexpr,
):
    """d_hat += G[rows, tile]·k̂[tile, out] (times PRESCALE) for key tile ``start``; SIGMOID: g_sum += Σ_c G
    (times PRESCALE; Σ G is the sigmoid epilogue's dL/db). OWN: G + Gᵀ (the keys are the rows;
    ``coefficient_ptrs`` = (lse, alpha, beta, bias, positive index) pointers give the columns' terms)."""
    rows, row_mask, pos_rows, a_labels = anchors
    cols, col_mask, t, k_inv = _key_tile_logits(
        start, a_ptrs, b_ptrs0, k_inv_ptr, row_mask, row_scale, K, D, stride_ad, stride_km, stride_kd, NORMALIZE,
        MASKED, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION, ACC)
    lse2, alpha, beta = coefficients
    key_rows = (lse2, alpha, beta, pos_rows)  # unread unless OWN
    if OWN:
        lse_ptr, alpha_ptr, beta_ptr, bias_ptr, pos_index_ptr = coefficient_ptrs
        lse2_cols, alpha_cols, beta_cols = _row_coefficients(lse_ptr, alpha_ptr, beta_ptr, bias_ptr, cols, col_mask,
                                                             PRESCALE, SIGMOID)
        pos_cols = pos_rows  # read only for index positives
        if POSITIVES == _INDEX:
            pos_cols = tl.load(pos_index_ptr + cols, mask=col_mask, other=-1)
        key_rows = (lse2_cols, alpha_cols, beta_cols, pos_cols)
    g = _gradient_tile(t, anchors, cols, col_mask, coefficients, entries, stride_mask_a, stride_mask_k, key_rows,
                       POSITIVES, HAS_SELF, EXCLUDE_POSITIVES, False, MASKED, ACC, SIGMOID, OWN)
    if SIGMOID:
        g_sum += tl.sum(g, axis=1)
    k_slice = _load_slice(slice_ptrs0 + tl.cast(start, tl.int64) * stride_km, col_mask, out_mask, MASKED, EVEN_DO)
    if NORMALIZE:
        if SCALE_OPERAND:  # float16: k̂ = k·r (|k̂| ≤ 1) as the operand, so G·r·PRESCALE cannot overflow
            k_slice = (k_slice.to(ACC) * k_inv[:, None]).to(k_slice.dtype)
        else:
            g = g * k_inv[None, :]
    return mma(g.to(k_slice.dtype), k_slice, d_hat, PRECISION, ACC), g_sum


@triton.jit
def _load_slice(ptrs, idx_mask, out_mask, MASK_IDX: tl.constexpr, EVEN_DO: tl.constexpr):
    """A [rows, out] slice through precomputed pointers (masked only where it can leave the tensor)."""
    if MASK_IDX:
        x = tl.load(ptrs, mask=idx_mask[:, None] & out_mask[None, :], other=0.0)
    elif EVEN_DO:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=out_mask[None, :], other=0.0)
    return x


@_ANCHOR_TUNING
@_EVEN_FEATURES
@triton.jit
def _block_anchor_kernel(
    a_ptr, stride_am, stride_ad, k_ptr, stride_km, stride_kd, a_inv_ptr, k_inv_ptr, tau_ptr,
    pos_index_ptr, a_labels_ptr, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k, mask_rows, mask_cols,
    self_offset, bias_ptr, lse_ptr, alpha_ptr, beta_ptr, da_ptr, gsum_ptr, A, K, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DO: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    PRESCALE: tl.constexpr, SCALE_OPERAND: tl.constexpr, OWN: tl.constexpr,
):
    """Anchor owner: dâ[rows, out] = Σ_c G k̂_c / τ into d_a (the normalization backward is the row
    epilogue's, which needs the whole row); SIGMOID: the programs of the first feature slice also store
    Σ_c G per anchor into gsum. OWN (an own block, keys = anchors): G + Gᵀ from the same tile, so d_a is
    the rows' whole gradient (no key pass) and gsum holds Σ_c (G + Gᵀ)."""
    first_row = tl.program_id(0) * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < A
    out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out < D
    tau = tl.load(tau_ptr)
    row_scale = load_inverse_norms(a_inv_ptr, rows, row_mask, NORMALIZE, ACC) * (_LOG2E / tau)
    pos_rows, a_labels = _row_positives(pos_index_ptr, a_labels_ptr, rows, row_mask, POSITIVES)
    lse2, alpha, beta = _row_coefficients(lse_ptr, alpha_ptr, beta_ptr, bias_ptr, rows, row_mask, PRESCALE, SIGMOID)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + stride_offsets(tl.arange(0, BLOCK_D), stride_ad)[None, :]
    tile_cols = tl.arange(0, BLOCK_N).to(tl.int64)
    b_ptrs0 = k_ptr + tile_cols[:, None] * stride_km + stride_offsets(tl.arange(0, BLOCK_D), stride_kd)[None, :]
    slice_ptrs0 = k_ptr + tile_cols[:, None] * stride_km + stride_offsets(out, stride_kd)[None, :]
    d_hat = tl.zeros((BLOCK_M, BLOCK_DO), dtype=ACC)
    g_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    coefficient_ptrs = (lse_ptr, alpha_ptr, beta_ptr, bias_ptr, pos_index_ptr)
    anchors = (rows, row_mask, pos_rows, a_labels)
    coefficients = (lse2, alpha, beta)
    entries = (k_labels_ptr, mask_ptr, mask_rows, mask_cols, self_offset)
    schedule = _tile_schedule(first_row, BLOCK_M, self_offset, K, BLOCK_N, HAS_SELF)
    for phase in tl.static_range(_PHASES):
        lo, hi = _phase_steps(phase, schedule, K, BLOCK_N)
        for step in range(lo, hi):
            d_hat, g_sum = _anchor_tile(
                d_hat, g_sum, _phase_tile(phase, step, schedule) * BLOCK_N, a_ptrs, b_ptrs0, slice_ptrs0, stride_km,
                stride_kd, k_inv_ptr, anchors, row_scale, coefficients, entries, stride_mask_a, stride_mask_k, K, D,
                stride_ad, out_mask, coefficient_ptrs, NORMALIZE, POSITIVES, HAS_SELF, EXCLUDE_POSITIVES, SIGMOID,
                phase == _MASKED_PHASE, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, EVEN_DO, SCALE_OPERAND, PRECISION, ACC,
                PRESCALE, OWN)
    if POSITIVES == _INDEX:
        # −beta_a·k̂_pos(a): a gather of the positives' rows, outside the loop.
        valid = row_mask & (pos_rows >= 0)
        if HAS_SELF:
            valid = valid & (pos_rows != rows + self_offset)
        pos = tl.where(valid, pos_rows, 0)
        k_pos = _load_slice(k_ptr + pos.to(tl.int64)[:, None] * stride_km + stride_offsets(out, stride_kd)[None, :],
                            valid, out_mask, True, EVEN_DO).to(ACC)
        if NORMALIZE:
            k_pos = k_pos * tl.load(k_inv_ptr + pos, mask=valid, other=1.0)[:, None]
        d_hat -= tl.where(valid, beta, 0.0)[:, None] * k_pos
        if SIGMOID:
            g_sum -= tl.where(valid, beta, 0.0)
    if SIGMOID:
        if tl.program_id(1) == 0:
            tl.store(gsum_ptr + rows, g_sum / PRESCALE, mask=row_mask)
    tl.store(da_ptr + rows.to(tl.int64)[:, None] * D + out[None, :], d_hat / (PRESCALE * tau),
             mask=row_mask[:, None] & out_mask[None, :])


@triton.jit
def _key_tile(
    d_hat, start, cols, col_mask, b_ptrs, a_ptrs0, slice_ptrs0, stride_am, stride_ad, a_inv_ptr, k_inv, col_scale_tau,
    pos_index_ptr, a_labels_ptr, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k, mask_rows, mask_cols,
    self_offset, bias_ptr, lse_ptr, alpha_ptr, beta_ptr, A, D, stride_kd, out, out_mask,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    SIGMOID: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DO: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    PRESCALE: tl.constexpr, SCALE_OPERAND: tl.constexpr,
):
    """d_hat += G[tile, cols]ᵀ·â[tile, out] (times PRESCALE) for anchor tile ``start``."""
    rows = start + tl.arange(0, BLOCK_M)
    if MASKED:
        row_mask = rows < A
    else:
        row_mask = tl.full((BLOCK_M,), 1, tl.int1)
    # Tile-0 pointers plus one scalar offset per tile: no per-element index math in the loop.
    a_ptrs = a_ptrs0 + tl.cast(start, tl.int64) * stride_am
    acc = _similarity_chunks(a_ptrs, b_ptrs, row_mask, col_mask, D, stride_ad, stride_kd, BLOCK_M, BLOCK_N,
                             BLOCK_D, EVEN_D, MASKED, True, PRECISION, ACC)
    a_inv = load_inverse_norms(a_inv_ptr, rows, row_mask, NORMALIZE, ACC)
    t = acc * (a_inv * _LOG2E)[:, None] * col_scale_tau[None, :]
    pos_rows, a_labels = _row_positives(pos_index_ptr, a_labels_ptr, rows, row_mask, POSITIVES)
    lse2, alpha, beta = _row_coefficients(lse_ptr, alpha_ptr, beta_ptr, bias_ptr, rows, row_mask, PRESCALE, SIGMOID)
    g = _gradient_tile(t, (rows, row_mask, pos_rows, a_labels), cols, col_mask, (lse2, alpha, beta),
                       (k_labels_ptr, mask_ptr, mask_rows, mask_cols, self_offset), stride_mask_a, stride_mask_k, None,
                       POSITIVES, HAS_SELF, EXCLUDE_POSITIVES, True, MASKED, ACC, SIGMOID)
    a_slice = _load_slice(slice_ptrs0 + tl.cast(start, tl.int64) * stride_am, row_mask, out_mask, MASKED, EVEN_DO)
    if NORMALIZE:
        if SCALE_OPERAND:  # float16: â = a·r as the operand (see _anchor_tile)
            a_slice = (a_slice.to(ACC) * a_inv[:, None]).to(a_slice.dtype)
        else:
            g = g * a_inv[:, None]
    return mma(tl.trans(g).to(a_slice.dtype), a_slice, d_hat, PRECISION, ACC)


@_BACKWARD_TUNING
@_EVEN_FEATURES
@triton.jit
def _block_key_kernel(
    a_ptr, stride_am, stride_ad, k_ptr, stride_km, stride_kd, a_inv_ptr, k_inv_ptr, tau_ptr,
    pos_index_ptr, a_labels_ptr, k_labels_ptr, mask_ptr, stride_mask_a, stride_mask_k, mask_rows, mask_cols,
    self_offset, bias_ptr, lse_ptr, alpha_ptr, beta_ptr, dk_ptr, A, K, D, SHAPE_BUCKET,
    NORMALIZE: tl.constexpr, POSITIVES: tl.constexpr, HAS_SELF: tl.constexpr, EXCLUDE_POSITIVES: tl.constexpr,
    SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_DO: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    PRESCALE: tl.constexpr, SCALE_OPERAND: tl.constexpr,
):
    """Key owner: dk̂[cols, out] = Σ_a G_ac â_a / τ over all anchor tiles (the anchor pass's tile a·kᵀ,
    transposed) into d_k; the normalization backward is the row epilogue's."""
    first_col = tl.program_id(0) * BLOCK_N
    cols = first_col + tl.arange(0, BLOCK_N)
    col_mask = cols < K
    out = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out < D
    tau = tl.load(tau_ptr)
    k_inv = load_inverse_norms(k_inv_ptr, cols, col_mask, NORMALIZE, ACC)
    col_scale_tau = k_inv / tau
    b_ptrs = k_ptr + cols.to(tl.int64)[:, None] * stride_km + stride_offsets(tl.arange(0, BLOCK_D), stride_kd)[None, :]
    tile_rows = tl.arange(0, BLOCK_M).to(tl.int64)
    a_ptrs0 = a_ptr + tile_rows[:, None] * stride_am + stride_offsets(tl.arange(0, BLOCK_D), stride_ad)[None, :]
    slice_ptrs0 = a_ptr + tile_rows[:, None] * stride_am + stride_offsets(out, stride_ad)[None, :]
    d_hat = tl.zeros((BLOCK_N, BLOCK_DO), dtype=ACC)
    # Padding keys (the last key block) only feed their own rows of d_hat, which are never stored: no
    # anchor tile needs a key mask. Masked tiles: the anchors' self entries and the last anchor tile.
    # Anchor a is key a + self_offset: the anchors first_col − self_offset ... hold this block's self entries.
    schedule = _tile_schedule(first_col, BLOCK_N, -self_offset, A, BLOCK_M, HAS_SELF)
    for phase in tl.static_range(_PHASES):
        lo, hi = _phase_steps(phase, schedule, A, BLOCK_M)
        for step in range(lo, hi):
            d_hat = _key_tile(
                d_hat, _phase_tile(phase, step, schedule) * BLOCK_M, cols, col_mask, b_ptrs, a_ptrs0, slice_ptrs0,
                stride_am, stride_ad, a_inv_ptr, k_inv, col_scale_tau, pos_index_ptr, a_labels_ptr, k_labels_ptr,
                mask_ptr, stride_mask_a, stride_mask_k, mask_rows, mask_cols, self_offset, bias_ptr, lse_ptr,
                alpha_ptr, beta_ptr, A, D, stride_kd, out, out_mask, NORMALIZE, POSITIVES, HAS_SELF,
                EXCLUDE_POSITIVES, SIGMOID, phase == _MASKED_PHASE, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, EVEN_DO,
                PRECISION, ACC, PRESCALE, SCALE_OPERAND)
    tl.store(dk_ptr + cols.to(tl.int64)[:, None] * D + out[None, :], d_hat / (PRESCALE * tau),
             mask=col_mask[:, None] & out_mask[None, :])


@triton.jit
def _normalization_backward_kernel(
    x_ptr, stride_m, stride_d, inv_ptr, grad_ptr, radial_ptr, n, D,
    NORMALIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Row epilogue, in place on grad [n, D] (= dx̂): radial = ⟨x̂, dx̂⟩ = Σ_c G s (stored), then
    F.normalize's backward (``_common.store_row_gradient``); without normalization only radial = ⟨x, dx⟩."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < n
    inv = load_inverse_norms(inv_ptr, rows, row_mask, NORMALIZE, ACC)
    grad = single_rows(grad_ptr, D, 1, n)
    x = single_rows(x_ptr, stride_m, stride_d, n)
    radial = tl.zeros((BLOCK,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        rows_x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_m + stride_offsets(d, stride_d)[None, :],
                         mask=mask, other=0.0)
        d_hat = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=mask, other=0.0)
        radial += tl.sum(rows_x.to(ACC) * d_hat, axis=1)
    radial *= inv
    tl.store(radial_ptr + rows, radial, mask=row_mask)
    if NORMALIZE:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = d < D
            d_hat = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
                            mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            store_row_gradient(x, grad, rows, row_mask, d, d_mask, inv, d_hat, radial, NORMALIZE, ACC)


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
    if layout.own_block:
        if a.shape != k.shape:
            raise ValueError(f"layout.own_block: the keys are the anchors, expected k of shape {tuple(a.shape)}, "
                             f"got {tuple(k.shape)}")
        if layout.self_offset not in (None, 0):
            raise ValueError(f"layout.self_offset: an own block's self entry is the diagonal (0 or None), got "
                             f"{layout.self_offset}")


def _int32_labels(labels: Tensor, device: torch.device) -> Tensor:
    """Labels as int32 (half the registers of int64 in the element loop). Class ids must fit in int32:
    checked on the host for CPU tensors, asynchronously on the device (no sync) for CUDA ones; meta tensors
    (the compile report's launches) carry no values to check."""
    labels = labels.to(device=device)
    if labels.numel():
        fits = (labels.min() >= -2**31) & (labels.max() < 2**31)
        if labels.device.type == "cuda":
            torch._assert_async(fits, "layout labels: class ids must fit in int32")
        elif labels.device.type == "cpu" and not bool(fits):
            raise ValueError("layout.a_labels / layout.k_labels: class ids must fit in int32")
    return labels.to(torch.int32).contiguous()


def _check_label_shapes(layout: Layout, a: Tensor, k: Tensor) -> None:
    if layout.a_labels.shape != (a.shape[0],) or layout.k_labels.shape != (k.shape[0],):
        raise ValueError(f"layout.a_labels, layout.k_labels: expected shapes ({a.shape[0]},) and "
                         f"({k.shape[0]},), got {tuple(layout.a_labels.shape)} and {tuple(layout.k_labels.shape)}")


def _forward_layout(layout: Layout) -> Layout:
    """The layout the forward kernel sees: label positives leave the element loop (their sums come from
    :func:`_label_positives`) unless the denominator must drop them too (EXCLUDE_POSITIVES: then each
    entry needs its compare anyway); the self entry and the epilogue stay."""
    if layout.positives != "labels" or layout.exclude_positives:
        return layout
    return Layout(self_offset=layout.self_offset, epilogue=layout.epilogue, bias=layout.bias)


def _layout_args(layout: Layout, a: Tensor, k: Tensor, placeholder: Tensor) -> tuple[dict, dict]:
    """(the layout's kernel arguments by name, from pos_index_ptr to bias_ptr; its constexprs). Absent tensors
    get a valid placeholder buffer the kernel never reads; the sigmoid epilogue's bias is a 0-dim
    accumulation-dtype tensor (0 when None)."""
    index = labels_a = labels_k = mask = placeholder
    stride_mask_a = stride_mask_k = 0
    mask_rows = mask_cols = 1
    if layout.positives == "index":
        index = layout.pos_index.to(device=a.device, dtype=torch.int64).contiguous()
        if index.shape != (a.shape[0],):
            raise ValueError(f"layout.pos_index: expected shape ({a.shape[0]},), got {tuple(index.shape)}")
    elif layout.positives == "labels":
        _check_label_shapes(layout, a, k)
        labels_a, labels_k = (_int32_labels(x, a.device) for x in (layout.a_labels, layout.k_labels))
    elif layout.positives == "mask":
        mask = layout.mask
        if mask.dim() != 2 or mask.device != a.device:
            raise ValueError(f"layout.mask: expected a 2-D tensor on {a.device}, got shape {tuple(mask.shape)} "
                             f"on {mask.device}")
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        stride_mask_a, stride_mask_k = mask.stride()
        mask_rows, mask_cols = mask.shape
    sigmoid = layout.epilogue == "sigmoid"
    bias = placeholder
    if sigmoid:
        acc = accumulation_dtype(a.dtype)
        bias = (torch.zeros((), dtype=acc, device=a.device) if layout.bias is None
                else layout.bias.to(device=a.device, dtype=acc).reshape(()).contiguous())
    has_self = layout.self_offset is not None
    args = dict(pos_index_ptr=index, a_labels_ptr=labels_a, k_labels_ptr=labels_k, mask_ptr=mask,
                stride_mask_a=stride_mask_a, stride_mask_k=stride_mask_k, mask_rows=mask_rows, mask_cols=mask_cols,
                self_offset=layout.self_offset if has_self else 0, bias_ptr=bias)
    return args, dict(POSITIVES=int(PositiveKind.of(layout)), HAS_SELF=has_self,
                      EXCLUDE_POSITIVES=layout.exclude_positives, SIGMOID=sigmoid)


def _row_args(a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor) -> dict:
    """The rows' kernel arguments by name (a_ptr to tau_ptr)."""
    # Without normalization the kernels never read the inverse norms; they get a valid buffer instead.
    a_norms, k_norms = (a_inv, k_inv) if a_inv is not None else (tau, tau)
    return dict(a_ptr=a, stride_am=a.stride(0), stride_ad=a.stride(1), k_ptr=k, stride_km=k.stride(0),
                stride_kd=k.stride(1), a_inv_ptr=a_norms, k_inv_ptr=k_norms, tau_ptr=tau)


def _positional(kernel, arguments: dict) -> tuple:
    """A launch's named arguments in ``kernel``'s order (a compile spec's argument tuple)."""
    return tuple(arguments[name] for name in kernel.arg_names if name in arguments)


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
        lse (softmax: −inf for an anchor the block leaves nothing; sigmoid: Σ softplus(s + b) over the
        entries not excluded), pos_sum = Σ_c P s, pos_weight = Σ_c P.

    Raises:
        ValueError: inconsistent shapes, dtypes or layout tensors (named in the message).
    """
    _check(a, a_inv, k, k_inv, tau, sub_dim, layout)
    n_anchors, n_keys = a.shape[0], k.shape[0]
    acc = accumulation_dtype(a.dtype)
    lse, pos_sum, pos_weight = (torch.empty(n_anchors, dtype=acc, device=a.device) for _ in range(3))
    kernel_layout = _forward_layout(layout)
    class_sums = kernel_layout is not layout
    if class_sums:
        _check_label_shapes(layout, a, k)
    layout_args, flags = _layout_args(kernel_layout, a, k, tau)
    _block_forward_kernel[lambda meta: (triton.cdiv(n_anchors, meta["BLOCK_M"]),)](
        **_row_args(a, a_inv, k, k_inv, tau), **layout_args, lse_ptr=lse, pos_sum_ptr=pos_sum,
        pos_weight_ptr=pos_weight, A=n_anchors, K=n_keys, D=sub_dim, SHAPE_BUCKET=shape_bucket(max(n_anchors, n_keys)),
        NORMALIZE=a_inv is not None, PRECISION=dot_precision(a.dtype), ACC=accumulator(a.dtype), **flags,
    )
    if class_sums:
        pos_sum, pos_weight = _label_positives(a, a_inv, k, k_inv, tau, sub_dim, layout)
    return lse, pos_sum, pos_weight


def _row_chunks(n: int, sub_dim: int):
    """Row spans whose [rows, sub_dim] accumulation-dtype temporaries stay near 16 MB."""
    step = max(1, (1 << 22) // sub_dim)
    return ((start, min(start + step, n)) for start in range(0, n, step))


def _unit_rows(x: Tensor, inv: Optional[Tensor], index, sub_dim: int, acc) -> Tensor:
    """x̂[index, :sub_dim] in the accumulation dtype (index: a slice or an index tensor)."""
    rows = x[index, :sub_dim].to(acc)
    return rows if inv is None else rows * inv[index, None]


def _label_positives(a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor,
                     sub_dim: int, layout: Layout) -> tuple[Tensor, Tensor]:
    """(pos_sum, pos_weight) of label positives outside the element loop. Σ_{c: y_c = y_a} s_ac =
    â·(Σ_{c: y_c = y_a} k̂_c)/τ: one sum of the key rows per class (O(K·D')), one dot per anchor, minus
    the anchor's own entry when it is one of the keys. A class is named by the sorted position of its
    first key (one sort, searchsorted for the anchors): static shapes and no host sync, at the price of a
    few [K, D'] buffers (rows of absent positions stay 0)."""
    acc = accumulation_dtype(a.dtype)
    a_labels, k_labels = (x.to(device=a.device, dtype=torch.int64) for x in (layout.a_labels, layout.k_labels))
    if k.shape[0] == 0:
        zeros = torch.zeros(a.shape[0], dtype=acc, device=a.device)
        return zeros, zeros.clone()
    ordered = k_labels.sort().values
    k_class = torch.searchsorted(ordered, k_labels)
    # Ordered class sums (fastcl.contract.class_sums): deterministic, no atomics.
    sums = class_sums(_unit_rows(k, k_inv, slice(None), sub_dim, acc), class_segments(k_class, k.shape[0]))
    slot = torch.searchsorted(ordered, a_labels)
    counts = (torch.searchsorted(ordered, a_labels, right=True) - slot).to(acc)
    found = counts > 0
    slot = slot.clamp(max=k.shape[0] - 1)
    own = torch.arange(a.shape[0], device=a.device) + (layout.self_offset or 0)
    has_own = (own >= 0) & (own < k.shape[0]) if layout.self_offset is not None else torch.zeros_like(found)
    own = torch.where(has_own, own, 0)
    has_own &= found & (k_labels[own] == a_labels)
    dots = torch.empty(a.shape[0], dtype=acc, device=a.device)
    for start, stop in _row_chunks(a.shape[0], sub_dim):
        unit = _unit_rows(a, a_inv, slice(start, stop), sub_dim, acc)
        partner = sums[slot[start:stop]]
        if layout.self_offset is not None:  # the anchor's own key row leaves its class sum
            index = own[start:stop]
            partner = partner - has_own[start:stop, None] * _unit_rows(k, k_inv, index, sub_dim, acc)
        dots[start:stop] = (unit * partner).sum(dim=1)
    pos_sum = torch.where(found, dots / tau, 0.0)
    pos_weight = counts - has_own.to(acc)
    return pos_sum, pos_weight


def block_backward(
    a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor, sub_dim: int,
    layout: Layout, lse: Tensor, alpha: Tensor, beta: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_a [A, sub_dim], d_k [K, sub_dim], gs) of one block: gradients with respect to the RAW rows for
    G_ac = alpha_a·exp(s_ac − lse_a) − beta_a·P_ac (sigmoid: alpha_a·σ(s_ac + b) − beta_a·P_ac), and gs
    (docs/block-engine.md).

    Args:
        a, a_inv, k, k_inv, tau, sub_dim, layout: as in :func:`block_forward`.
        lse: [A] GLOBAL per-anchor log-sum-exp (accumulation dtype; unused by the sigmoid epilogue).
        alpha, beta: [A] per-anchor coefficients (accumulation dtype).

    Returns:
        d_a, d_k in the accumulation dtype and gs: Σ G·s, a 0-dim tensor (sigmoid: [Σ G·s, Σ G], shape [2]).
        ``layout.own_block``: d_a is the rows' whole gradient (G k̂/τ + Gᵀ â/τ, one pass: G_ac and G_ca from
        the same recomputed tile) and d_k is None.

    Raises:
        ValueError: as :func:`block_forward`; lse/alpha/beta of the wrong shape.
    """
    _check(a, a_inv, k, k_inv, tau, sub_dim, layout)
    n_anchors, n_keys = a.shape[0], k.shape[0]
    for name, vector in (("lse", lse), ("alpha", alpha), ("beta", beta)):
        if vector.shape != (n_anchors,):
            raise ValueError(f"{name}: expected shape ({n_anchors},), got {tuple(vector.shape)}")
    acc = accumulation_dtype(a.dtype)
    lse, alpha, beta = (v.to(acc).contiguous() for v in (lse, alpha, beta))
    d_a = torch.empty(n_anchors, sub_dim, dtype=acc, device=a.device)
    layout_args, flags = _layout_args(layout, a, k, tau)
    # Σ_c G per anchor (sigmoid only; the softmax kernels never touch it).
    g_sum = torch.empty(n_anchors if flags["SIGMOID"] else 1, dtype=acc, device=a.device)
    meta = dict(NORMALIZE=a_inv is not None, PRECISION=dot_precision(a.dtype), ACC=accumulator(a.dtype),
                PRESCALE=gradient_prescale(a.dtype), SCALE_OPERAND=a.dtype == torch.float16, **flags)
    # The arguments both passes share, by name.
    shared = dict(_row_args(a, a_inv, k, k_inv, tau), **layout_args, lse_ptr=lse, alpha_ptr=alpha, beta_ptr=beta,
                  A=n_anchors, K=n_keys, D=sub_dim, SHAPE_BUCKET=shape_bucket(max(n_anchors, n_keys)), **meta)
    _block_anchor_kernel[lambda m: (triton.cdiv(n_anchors, m["BLOCK_M"]), triton.cdiv(sub_dim, m["BLOCK_DO"]))](
        **shared, da_ptr=d_a, gsum_ptr=g_sum, OWN=layout.own_block)
    radial = _normalization_backward(a, a_inv, d_a, tau)
    if layout.own_block:
        # Σ_r ⟨ẑ_r, dẑ_r⟩ and Σ_r Σ_c (G + Gᵀ)_rc count every entry twice.
        g_sums = torch.stack([radial.sum(), g_sum.sum()]) if flags["SIGMOID"] else radial.sum()
        return d_a, None, g_sums / 2
    d_k = torch.empty(n_keys, sub_dim, dtype=acc, device=a.device)
    _block_key_kernel[lambda m: (triton.cdiv(n_keys, m["BLOCK_N"]), triton.cdiv(sub_dim, m["BLOCK_DO"]))](
        **shared, dk_ptr=d_k)
    _normalization_backward(k, k_inv, d_k, tau)
    if flags["SIGMOID"]:
        return d_a, d_k, torch.stack([radial.sum(), g_sum.sum()])
    return d_a, d_k, radial.sum()


def _normalization_backward(x: Tensor, inv: Optional[Tensor], grad: Tensor, tau: Tensor) -> Tensor:
    """In place on grad (= dx̂ [n, sub_dim]): F.normalize's backward; returns ⟨x̂, dx̂⟩ per row (Σ_c G s)."""
    n, sub_dim = grad.shape
    radial = torch.empty(n, dtype=grad.dtype, device=grad.device)
    block = 16 if interpreted() else 64
    _normalization_backward_kernel[(triton.cdiv(n, block),)](
        x, x.stride(0), x.stride(1), inv if inv is not None else tau, grad, radial, n, sub_dim,
        NORMALIZE=inv is not None, BLOCK=block, BLOCK_D=max(16, min(64, triton.next_power_of_2(sub_dim))),
        ACC=accumulator(x.dtype), **LAUNCH_OPTIONS,
    )
    return radial


def auxiliary_specs(dtype: torch.dtype, sub_dim: int, n: int = 4096, layout: str = "contiguous") -> list[CompileSpec]:
    """The row epilogue (``_normalization_backward``) on [n, sub_dim] rows in ``layout``."""
    acc = accumulation_dtype(dtype)
    x = example_rows((n, sub_dim), dtype, layout)
    vector = torch.empty(n, dtype=acc)
    meta = dict(NORMALIZE=True, BLOCK=64, BLOCK_D=max(16, min(64, triton.next_power_of_2(sub_dim))),
                ACC=accumulator(dtype))
    args = (x, *x.stride(), vector, torch.empty(n, sub_dim, dtype=acc), vector, n, sub_dim)
    return [CompileSpec("block_normalization_backward", "launch", _normalization_backward_kernel, args, meta)]


def compile_specs(dtype: torch.dtype, precision: str, sub_dim: int, n: int = 4096,
                  layout: str = "contiguous") -> list[CompileSpec]:
    """The three block kernels for the compile-only report: [n, sub_dim] anchors and keys in ``layout``,
    normalized, self entry, with labels or a bool sample mask (SupCon's blocks) and with a positive index
    (NT-Xent's); and SigLIP's sigmoid epilogue (images × texts, index positives, no self entry). Own blocks
    (``Layout.own_block``: the local losses' one-pass symmetric backward) compile only the anchor kernel,
    as ``block_own_<kind>_backward``; their forward is the regular one."""
    acc = accumulation_dtype(dtype)
    a, k = (example_rows((n, sub_dim), dtype, layout) for _ in range(2))
    vector = lambda: torch.empty(n, dtype=acc)  # noqa: E731
    tau = torch.empty((), dtype=acc)
    rows = dict(_row_args(a, vector(), k, vector(), tau), K=n, A=n, D=sub_dim, SHAPE_BUCKET=shape_bucket(n))
    specs = []
    ids = torch.zeros(n, dtype=torch.int64)
    for name, layout in (("index", Layout(positives="index", self_offset=0, pos_index=ids)),
                         ("labels", Layout(positives="labels", self_offset=0, a_labels=ids, k_labels=ids)),
                         ("mask", Layout(positives="mask", self_offset=0, mask=torch.empty(n, n, dtype=torch.bool))),
                         ("sigmoid", Layout(positives="index", pos_index=ids, epilogue="sigmoid", bias=tau)),
                         # The compat layer's layouts: lightly's DCL under labels, open_clip's per-rank SigLIP.
                         ("labels_exclude", Layout(positives="labels", self_offset=0, a_labels=ids, k_labels=ids,
                                                   exclude_positives=True)),
                         ("sigmoid_labels", Layout(positives="labels", a_labels=ids, k_labels=ids,
                                                   epilogue="sigmoid", bias=tau)),
                         # Own blocks: local NT-Xent (index), SupCon (labels, mask), DCL, SigLIP on one tensor.
                         ("own_index", Layout(positives="index", self_offset=0, pos_index=ids, own_block=True)),
                         ("own_labels", Layout(positives="labels", self_offset=0, a_labels=ids, k_labels=ids,
                                               own_block=True)),
                         ("own_mask", Layout(positives="mask", self_offset=0, mask=torch.empty(n, n, dtype=torch.bool),
                                             own_block=True)),
                         ("own_index_exclude", Layout(positives="index", self_offset=0, pos_index=ids,
                                                      exclude_positives=True, own_block=True)),
                         ("own_sigmoid", Layout(positives="index", self_offset=0, pos_index=ids, epilogue="sigmoid",
                                                bias=tau, own_block=True))):
        layout_args, flags = _layout_args(layout, a, k, tau)
        common = dict(NORMALIZE=True, PRECISION=precision, ACC=accumulator(dtype), **flags)
        # As block_forward launches it (label positives come from class sums, not the element loop).
        forward_args, forward_flags = _layout_args(_forward_layout(layout), a, k, tau)
        backward = dict(common, PRESCALE=gradient_prescale(dtype), SCALE_OPERAND=dtype == torch.float16)
        shared = dict(rows, **layout_args, lse_ptr=vector(), alpha_ptr=vector(), beta_ptr=vector())
        gradient = torch.empty(n, sub_dim, dtype=acc)
        anchor = CompileSpec(f"block_{name}_backward" if layout.own_block else f"block_{name}_anchor",
                             "block_backward", _block_anchor_kernel.fn,
                             _positional(_block_anchor_kernel, dict(shared, da_ptr=gradient, gsum_ptr=vector())),
                             dict(backward, OWN=layout.own_block))
        if layout.own_block:
            specs.append(anchor)
            continue
        forward = dict(rows, **forward_args, lse_ptr=vector(), pos_sum_ptr=vector(), pos_weight_ptr=vector())
        specs += [
            CompileSpec(f"block_{name}_forward", "block_forward", _block_forward_kernel.fn,
                        _positional(_block_forward_kernel, forward), dict(common, **forward_flags)),
            anchor,
            CompileSpec(f"block_{name}_key", "block_backward", _block_key_kernel.fn,
                        _positional(_block_key_kernel, dict(shared, dk_ptr=gradient)), backward),
        ]
    return specs
