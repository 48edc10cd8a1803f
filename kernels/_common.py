"""Helpers of the Triton block primitive (kernels/block.py).

Host side (plain Python, stable names):

- :func:`interpreted` — True when Triton runs through ``TRITON_INTERPRET=1`` (CPU).
- :func:`dot_precision` — the ``input_precision`` of every ``tl.dot`` for a given input dtype:
  float32 on tensor cores by default (``"tf32x3"``), ``"tf32"`` / ``"ieee"`` when PyTorch's fp32
  matmul precision was set to that; ``"ieee"`` for 16-bit and float64 rows.
- :func:`accumulator` — the Triton accumulation dtype (``tl.float64`` for float64 rows, else fp32).
- :func:`autotune_configs` — ``triton.Config`` lists for ``*forward`` kinds (meta-parameters
  ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_D``) and ``*backward`` kinds (adds ``BLOCK_DO``, the width of the
  slice of output features one program accumulates): ``block_forward`` / ``block_backward`` (the block
  primitive's passes). Entries for sm90 (H100/H200), sm80 (A100) and a
  small fallback; under the interpreter ONE small config (16×16 tiles), since autotuning there is
  far too slow. Use with ``triton.autotune(configs=..., key=["D", "SHAPE_BUCKET", ...],
  prune_configs_by=prune(kind))``: Triton adds the dtypes of all tensor arguments to the key, so the tuning is
  keyed on D, the size bucket and dtype. Forward and backward kernels are tuned independently (the
  backward never waits for a forward's choice, e.g. under torch.compile). Kernels must name the feature
  dimension argument ``D``. :func:`tile_configs` gives one architecture's table (the compile-only
  report compiles exactly these).
- :func:`gradient_prescale` — factor applied to a gradient tile (|values| ≤ 2) before it is cast to
  float16 for the second GEMM, so softmax weights ~1/M stay out of fp16's subnormal range; divide the
  result by it (it is a power of two: exact).
- :func:`prune` — the ``prune_configs_by`` dict of a kind: keeps the table a launch uses (small tiles,
  the sigmoid epilogue's tables) and drops feature tiles far wider than D.
- :func:`shape_bucket` — the size bucket every autotune key holds (``SHAPE_BUCKET`` kernel argument).

Device side (``@triton.jit``):

- :func:`mma` — ``tl.dot(a, b, acc)`` with the given precision and accumulator. Triton 3.9's
  interpreter multiplies bfloat16 operands as their raw uint16 bits, so under the interpreter (only)
  bfloat16 operands are widened to float32 first — exact, and the same products and fp32 accumulation
  the GPU's bf16 MMA computes. Use it for every dot.
- :func:`single_rows` / :func:`stacked_pointers` / :func:`load_stacked` — a stacked-rows descriptor of one
  [n, D] matrix (a tuple) and element pointers / masked loads of its rows × features (rows int64).
- :func:`load_inverse_norms` — stored inverse norms, or ones when the loss does not normalize.
- :func:`store_row_gradient` — dL/dz from dL/dẑ for ẑ = z·r: F.normalize's backward
  r·(dẑ − ẑ⟨ẑ, dẑ⟩), only r·dẑ where the norm was clamped, identity without normalization.

Example (host side):
    >>> import torch
    >>> from fastcl.kernels._common import dot_precision
    >>> dot_precision(torch.bfloat16)
    'ieee'
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastcl.contract import NORM_EPS, PositiveKind
from fastcl.contract import triton_interpreted as interpreted

_INTERPRETED = tl.constexpr(interpreted())


def _fp32_matmul_setting() -> str:
    """PyTorch's fp32 matmul precision: "tf32", "ieee" (either set by the user) or "none" (never set).

    The ``fp32_precision`` API (torch ≥ 2.9) wins; "none" on the cuda matmul backend inherits the global
    ``torch.backends.fp32_precision``. Older torch has only ``allow_tf32`` (default False = never set).
    Reading ``allow_tf32`` raises once the new API set TF32, so it is read only without the new API.
    """
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is None:
        return "tf32" if matmul.allow_tf32 else "none"
    if setting == "none":
        setting = getattr(torch.backends, "fp32_precision", "none")
    return setting if setting in ("tf32", "ieee") else "none"


def dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision for rows of ``dtype``.

    float32 runs on tensor cores by default: ``"tf32x3"`` (three TF32 products, the low-order terms of
    both operands included, about fp32 accuracy); ``"tf32"`` when PyTorch's fp32 matmuls were set to
    TF32 (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``torch.set_float32_matmul_precision
    ("high")`` or the legacy ``allow_tf32 = True``); ``"ieee"`` (FMA, no tensor cores) only when
    requested: ``torch.backends.cuda.matmul.fp32_precision = "ieee"`` or
    ``torch.set_float32_matmul_precision("highest")``. Other dtypes: ``"ieee"`` (16-bit operands
    multiply exactly into the fp32 accumulator; float64 has no tensor-core path here).

    Args:
        dtype: the dtype of the rows that go into the dot.

    Returns:
        One of ``"tf32x3"``, ``"tf32"``, ``"ieee"``.

    Example:
        >>> dot_precision(torch.bfloat16)
        'ieee'
    """
    if dtype != torch.float32:
        return "ieee"
    return {"tf32": "tf32", "ieee": "ieee"}.get(_fp32_matmul_setting(), "tf32x3")


def accumulator(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def gradient_prescale(dtype: torch.dtype) -> float:
    return 4096.0 if dtype == torch.float16 else 1.0


# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages); backward entries add BLOCK_DO before num_warps.
# Chosen by the compile-only report (docs/kernels.md): no spills, shared memory within the limit.
_FORWARD = {
    "sm90": [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 32, 4, 3)],
    "sm80": [(128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 8, 3)],
    "fallback": [(64, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
}
_BACKWARD = {
    "sm90": [(64, 64, 64, 64, 8, 3), (64, 64, 32, 64, 8, 3)],
    "sm80": [(64, 64, 64, 64, 8, 3), (64, 64, 32, 32, 8, 2)],
    "fallback": [(64, 32, 32, 64, 4, 2), (32, 32, 32, 32, 4, 2)],
}
# The block primitive's forward (kernels/block.py) folds the row scale into its exp2 and keeps only the
# running (max, sum) per row: its 128×64 tile fits 4 warps (one warpgroup, 64 elements per thread, half
# the per-tile row work per element of 8 warps).
_BLOCK_FORWARD = dict(_FORWARD, sm90=[(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 4),
                                      (64, 64, 32, 4, 3)])
# The block primitive's backward passes (kernels/block.py): at 4 warps they stay below 255 registers without
# spills on sm90 and halve the per-tile overhead per element.
_BLOCK_BACKWARD = dict(_BACKWARD, sm90=[(64, 64, 64, 64, 4, 3), (64, 64, 32, 64, 4, 3)])
# Small tiles, the only ones for 4-byte rows (fp32 dots: tf32x3 holds high and low parts of both
# operands in registers) and for the block kernels' per-element positives (:func:`needs_small_tiles`).
_SMALL_FORWARD = {"sm90": [(64, 64, 32, 8, 3)], "sm80": [(32, 32, 16, 4, 2)], "fallback": [(32, 32, 32, 4, 2)]}
_SMALL_BACKWARD = {"sm90": [(64, 64, 32, 64, 8, 3)], "sm80": [(32, 32, 32, 32, 4, 2)],
                   "fallback": [(32, 32, 32, 32, 4, 2)]}
# SigLIP's sigmoid epilogue (softplus forward, σ backward) holds more per element: the report found spills
# in 64×128 forward tiles on sm90, in the 64-wide gradient slices of 4-warp 16-bit key passes and of the fp32
# (tf32x3) small tiles; its launches use these tables instead.
_SIGMOID_BLOCK_FORWARD = dict(_BLOCK_FORWARD, sm90=[e for e in _BLOCK_FORWARD["sm90"] if e != (64, 128, 64, 4, 4)])
_SIGMOID_BLOCK_BACKWARD = dict(_BLOCK_BACKWARD, sm90=[(64, 64, 64, 64, 4, 3), (64, 64, 32, 32, 4, 3)])
_SIGMOID_SMALL_BACKWARD = dict(_SMALL_BACKWARD, sm90=[(64, 64, 32, 32, 8, 3)])
_TABLES = {"block_forward": (_BLOCK_FORWARD, _SMALL_FORWARD), "block_backward": (_BLOCK_BACKWARD, _SMALL_BACKWARD)}
# Tables that replace a kind's main / small ones when a launch sets the named constexpr.
# Own blocks (kernels/block.py, ``Layout.own_block``: G + Gᵀ from one tile, two exponentials and the columns'
# coefficients per element) take 8 warps on sm90 too: at 4 warps (bf16, D' = 128) index positives left out of
# the denominator spilled (64x64x64x64: 255 registers, 16 B; 64x64x32x64: 255, 4 B); at 8 warps they hold 216
# / 174 registers and labels 169 (64x64x64x64), no spills. sm80: 169-225 registers, no spills (the 64x64x32x32
# / 8-warp entry of the block backward spilled 12-80 B in the retired one-pass symmetric backwards, which
# did the same per-element work). Small tiles: 64x32x16x32 / 4 warps on sm90 (64x64 ones spilled 4 B-1.2 KB
# there with tf32x3 and mask positives), 32x32x16x32 on sm80 (32x32x32x32 spilled 32 B with a mask in tf32x3).
_OWN_BACKWARD = dict(_BLOCK_BACKWARD, sm90=_BACKWARD["sm90"], sm80=[(64, 64, 64, 64, 8, 3), (64, 64, 32, 64, 8, 3)])
_SMALL_OWN_BACKWARD = dict(_SMALL_BACKWARD, sm90=[(64, 32, 16, 32, 4, 3)], sm80=[(32, 32, 16, 32, 4, 2)])
_OVERRIDES = {
    ("block_backward", "OWN"): (_OWN_BACKWARD, _SMALL_OWN_BACKWARD),
    ("block_forward", "SIGMOID"): (_SIGMOID_BLOCK_FORWARD, _SMALL_FORWARD),
    ("block_backward", "SIGMOID"): (_SIGMOID_BLOCK_BACKWARD, _SIGMOID_SMALL_BACKWARD),
}
# Entries a table keeps for most launches but that spill for one launch shape, by the compile-only report:
# (kind, arch, the launch's constexprs → bool, entries dropped). SigLIP's sigmoid epilogue with label
# positives (the compat layer's per-rank SigLIP) held 255 registers and spilled 44 B (anchor pass) / 28 B
# (key pass) at 64x64x64x64/w4/s3 on sm90 with 16-bit rows; 64x64x32x32/w4/s3 stays at 181/187 registers.
_SPILLING = [
    ("block_backward", "sm90",
     lambda flags: flags.get("SIGMOID") and flags.get("POSITIVES") == PositiveKind.LABELS, {(64, 64, 64, 64, 4, 3)}),
]
_INTERPRETER = {"block_forward": (16, 16, 16, 1, 1), "block_backward": (16, 16, 16, 16, 1, 1)}


def _architecture() -> str:
    if not torch.cuda.is_available():
        return "fallback"
    major, _ = torch.cuda.get_device_capability()
    return "sm90" if major >= 9 else "sm80" if major == 8 else "fallback"


# Compile options of every launch. The element loops are written for FFMA contraction (the row scale enters
# each exp2's FFMA); Triton 3.9 enables it by default but turns the default off in 3.10, so it is explicit.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def _config(kind: str, entry: tuple) -> triton.Config:
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_D") + (("BLOCK_DO",) if not kind.endswith("forward") else ())
    *blocks, warps, stages = entry
    return triton.Config({**dict(zip(names, blocks)), **LAUNCH_OPTIONS}, num_warps=warps, num_stages=stages)


def needs_small_tiles(kind: str, dtype: torch.dtype, constexprs: dict) -> bool:
    """Whether a launch of a ``kind`` kernel keeps only the small tiles: 4-byte rows, the block kernels'
    mask positives (a weight read per element), or label positives inside a forward element loop (only
    with EXCLUDE_POSITIVES; otherwise they come from class sums outside it): their per-element weights
    and extra row sums spill in 128-row tiles. The block backwards' label compares fit the main tiles."""
    positives = constexprs.get("POSITIVES", PositiveKind.NONE)
    return dtype.itemsize >= 4 or positives == PositiveKind.MASK or (positives == PositiveKind.LABELS
                                                                       and kind.endswith("forward"))


def tile_configs(kind: str, arch: str, dtype: torch.dtype | None = None, constexprs: dict | None = None) -> list:
    """The autotune table of ``kind`` (see :func:`autotune_configs`) for ``arch`` ("sm90", "sm80",
    "fallback"), for rows of ``dtype`` launched with ``constexprs`` (the small-tile table when
    :func:`needs_small_tiles`). The compile-only report compiles exactly these.

    Example:
        >>> [c.kwargs["BLOCK_M"] for c in tile_configs("block_forward", "fallback")]
        [64, 32]
    """
    if kind not in _TABLES:
        raise ValueError(f"kind: expected one of {list(_TABLES)}, got {kind!r}")
    flags = constexprs or {}
    table, small = next((t for (k, flag), t in _OVERRIDES.items() if k == kind and flags.get(flag)), _TABLES[kind])
    if arch not in table:
        raise ValueError(f"arch: expected one of {list(table)}, got {arch!r}")
    if dtype is not None and needs_small_tiles(kind, dtype, flags):
        table = small
    dropped = set().union(*(e for k, a, applies, e in _SPILLING if (k, a) == (kind, arch) and applies(flags)))
    return [_config(kind, e) for e in table[arch] if e not in dropped]


@functools.lru_cache(maxsize=None)
def autotune_configs(kind: str) -> list:
    """Configs for ``kind`` (a key of ``_TABLES``: "block_forward", "block_backward") on this machine:
    the architecture's tables, small tiles and sigmoid tables (:func:`prune` keeps the ones a launch may
    use; see the module docstring)."""
    if kind not in _TABLES:
        raise ValueError(f"kind: expected one of {list(_TABLES)}, got {kind!r}")
    if interpreted():
        return [_config(kind, _INTERPRETER[kind])]
    arch = _architecture()
    tables = [_TABLES[kind]] + [t for (k, _), t in _OVERRIDES.items() if k == kind]
    return [_config(kind, e) for e in dict.fromkeys(sum((t[arch] for pair in tables for t in pair), []))]


# Input layouts the compile-only report's address check compiles each kernel for: contiguous rows (Triton
# specializes the unit feature stride away), column-major rows (a transposed view: the row stride is the unit
# one, the feature stride a runtime value) and every other column of a wider buffer (both strides runtime,
# as for a sub_dim slice of a strided view).
LAYOUTS = ("contiguous", "transposed", "strided")


def example_rows(shape: tuple, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    """An uninitialized tensor of ``shape`` (last dim: features) in one of :data:`LAYOUTS`, for compile specs.

    Example:
        >>> [example_rows((4, 8), torch.float32, layout).stride() for layout in LAYOUTS]
        [(8, 1), (1, 4), (16, 2)]
    """
    if layout == "contiguous":
        return torch.empty(shape, dtype=dtype)
    if layout == "transposed":
        return torch.empty(shape[::-1], dtype=dtype).permute(*range(len(shape) - 1, -1, -1))
    if layout == "strided":
        return torch.empty((*shape[:-1], 2 * shape[-1]), dtype=dtype)[..., ::2]
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


class CompileSpec(NamedTuple):
    """One kernel as the compile-only report compiles it: a name, its config table ("forward" /
    "backward" / "block_backward"), the ``@triton.jit`` function, launch arguments (CPU tensors of the real shapes: only
    their dtype, strides and alignment matter) and the constexprs other than the tile config."""

    name: str
    kind: str
    fn: object
    args: tuple
    constexprs: dict


def _prune_wide_tiles(kind, configs, named_args, **kwargs):
    """Keeps the configs of the table this launch uses (:func:`tile_configs`: small tiles where
    :func:`needs_small_tiles`, the sigmoid epilogue's own tables) and drops those whose feature tiles are
    wider than D needs (they only add masked work)."""
    if interpreted():
        return configs
    named_args = {**named_args, **kwargs}  # launches by keyword: the autotuner's named_args holds the positional ones
    rows = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    entry = lambda c: (*c.kwargs.values(), c.num_warps, c.num_stages)  # noqa: E731
    allowed = {entry(c) for c in tile_configs(kind, _architecture(), rows.dtype, kwargs)}
    kept = [c for c in configs if entry(c) in allowed]
    width = max(16, triton.next_power_of_2(int(named_args["D"])))
    narrow = [c for c in kept if c.kwargs["BLOCK_D"] <= width and c.kwargs.get("BLOCK_DO", 0) <= max(width, 64)]
    return narrow or kept[-1:] or configs[-1:]


def prune(kind: str) -> dict:
    """``prune_configs_by`` for kernels tuned over :func:`autotune_configs` (``kind``)."""
    return {"early_config_prune": functools.partial(_prune_wide_tiles, kind)}


@triton.jit
def stride_offsets(index, stride):
    """index × stride as a pointer offset, in int64 (a feature index times a transposed view's stride passes
    2³¹ at N·D ≥ 2³¹). Triton specializes a stride equal to 1 into the constant 1 (a contiguous feature
    axis); that product is the index itself and keeps its width, so contiguous rows compile as before."""
    if isinstance(stride, int):  # specialized (only 1 is): no product
        offsets = index * stride
    else:
        offsets = tl.cast(index, tl.int64) * stride
    return offsets


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ b (see module docstring for the interpreter's bfloat16 workaround)."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


# --- stacked rows and the fused normalization's backward ------------------------------------------------

# 1/max(‖z‖, eps) equals this exactly (fp32 and fp64) iff the norm was clamped.
_CLAMPED_INV_NORM = tl.constexpr(1.0 / NORM_EPS)


@triton.jit
def single_rows(ptr, stride_m, stride_d, n):
    """Stacked-rows descriptor (see :func:`stacked_pointers`) of one [n, D] matrix: every row in block 0."""
    return (ptr, stride_m, stride_d, ptr, 0, stride_m, stride_d, n)


@triton.jit
def stacked_pointers(src, rows, d):
    """Pointers to the [rows, d] elements of the stacked rows ``src`` = (first, first_stride_m,
    first_stride_d, rest, rest_stride_block, rest_stride_m, rest_stride_d, n): row r = b·n + i is first[i]
    for b = 0, else rest[i] shifted by b·rest_stride_block elements. Every
    index × stride product is int64 (rows × stride or d × a transposed view's stride may pass 2³¹); the
    block / local split stays in the rows' own width (no 64-bit division for int32 rows)."""
    first_ptr, first_stride_m, first_stride_d, rest_ptr, rest_stride_block, rest_stride_m, rest_stride_d, n = src
    block = rows // n
    local = (rows % n).to(tl.int64)[:, None]
    first = first_ptr + local * first_stride_m + stride_offsets(d, first_stride_d)[None, :]
    rest = rest_ptr + block.to(tl.int64)[:, None] * rest_stride_block + local * rest_stride_m \
        + stride_offsets(d, rest_stride_d)[None, :]
    # One load through selected pointers: the select is constant along d, so loads stay vectorized.
    return tl.where((block == 0)[:, None], first, rest)


@triton.jit
def load_stacked(src, rows, row_mask, d, d_mask):
    """src[rows, d] in the rows' dtype, 0 outside the masks."""
    return tl.load(stacked_pointers(src, rows, d), mask=row_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def load_inverse_norms(inv_ptr, idx, mask, NORMALIZE: tl.constexpr, ACC: tl.constexpr):
    """The rows' stored inverse norms, or ones when the loss does not normalize (×1 is exact)."""
    if NORMALIZE:
        inv = tl.load(inv_ptr + idx, mask=mask, other=1.0)
    else:
        inv = tl.full(idx.shape, 1.0, dtype=ACC)
    return inv


@triton.jit
def store_row_gradient(
    src, dst, rows, row_mask, out_d, out_mask, inv, d_hat, radial, NORMALIZE: tl.constexpr, ACC: tl.constexpr
):
    """dst[rows, out_d] = dL/dz from d_hat = dL/dẑ ([rows, out_d], ACC) and radial = ⟨ẑ, dẑ⟩ per row.

    With ẑ = z·r: r·dẑ − ⟨ẑ, dẑ⟩·r²·z (F.normalize's backward); only r·dẑ where the norm was clamped.
    """
    dz = d_hat
    if NORMALIZE:
        z = load_stacked(src, rows, row_mask, out_d, out_mask).to(ACC)
        radial = tl.where(inv < _CLAMPED_INV_NORM, radial, 0.0)
        dz = d_hat * inv[:, None] - (radial * inv * inv)[:, None] * z
    tl.store(stacked_pointers(dst, rows, out_d), dz.to(dst[0].dtype.element_ty),
             mask=row_mask[:, None] & out_mask[None, :])


def shape_bucket(rows: int) -> int:
    """The autotune key's size bucket for ``rows`` similarity rows: the next power of two, so one config
    is tuned per octave of batch sizes (the first call's size does not fix it for all sizes).

    Example:
        >>> shape_bucket(3000), shape_bucket(4096)
        (4096, 4096)
    """
    return triton.next_power_of_2(max(1, int(rows)))
