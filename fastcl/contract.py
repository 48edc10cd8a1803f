"""The contract every backend implements: the :class:`Layout` of one block, the primitive's signature
(:class:`BlockForward` / :class:`BlockBackward`, docs/block-engine.md) and the constants the backends and
the layers above agree on. A leaf module: it imports torch and the standard library only, so every backend
(``fastcl.torch_backend``, ``fastcl.kernels``, ``fastcl.cuda_backend``) and the layers above them can
import it; tests/test_architecture.py holds the rule (docs/architecture.md).

    >>> import torch
    >>> layout = Layout(positives="index", self_offset=0, pos_index=torch.tensor([1, 0]))
    >>> layout.positives, layout.self_offset
    ('index', 0)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor

NORM_EPS = 1e-12  # as torch.nn.functional.normalize: ẑ = z / max(‖z‖, NORM_EPS)
POSITIVES = ("none", "index", "labels", "mask")
EPILOGUES = ("softmax", "sigmoid")

# NTSC YIQ (rows: Y, I, Q), shared by the augmentation's reference colour ops (fastcl.augment.colour) and
# its Triton kernel (fastcl.kernels.augment). Y is the 0.299/0.587/0.114 luma of grayscale and contrast.
RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.596, -0.274, -0.322),
    (0.211, -0.523, 0.312),
)
# Exact inverse (computed in float64) so that a zero hue rotation returns the input to float rounding.
YIQ_TO_RGB = tuple(tuple(row) for row in torch.linalg.inv(torch.tensor(RGB_TO_YIQ, dtype=torch.float64)).tolist())


def triton_interpreted() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_norms(x: Tensor, sub_dim: int) -> Tensor:
    """1 / max(‖x[i, :sub_dim]‖, NORM_EPS) per row, in the accumulation dtype, without copying x.

    Example:
        >>> inverse_norms(torch.tensor([[3.0, 4.0, 9.0]]), 2)
        tensor([0.2000])
    """
    norms = torch.linalg.vector_norm(x[:, :sub_dim], dim=1, dtype=accumulation_dtype(x.dtype))
    return 1.0 / norms.clamp_min(NORM_EPS)


@dataclass(frozen=True)
class Layout:
    """Which entries of one anchors × keys block are positives, and which are left out.

    Attributes:
        positives: "none" (no positive in this block), "index" (``pos_index``), "labels" (``a_labels`` ==
            ``k_labels``) or "mask" (weights ``mask[a mod Na, c mod Nk]``, soft values allowed).
        self_offset: anchor ``a`` is key ``a + self_offset`` (the same row): that entry is excluded from
            the denominator and from the positives. None: no anchor is one of the keys.
        pos_index: [A] int64, the key index of anchor ``a``'s positive in this block, −1 for none here.
        a_labels, k_labels: [A] / [K] int64 labels; P_ac = 1[a_labels[a] == k_labels[c]].
        mask: [Na, Nk] floating weights; P_ac = mask[a mod Na, c mod Nk].
        exclude_positives: remove the positives from the denominator too (DCL).
        epilogue: "softmax" (log-sum-exp statistics) or "sigmoid" (SigLIP's per-pair sigmoid, logit
            s_ac + ``bias``).
        bias: 0-dim tensor, the sigmoid epilogue's logit bias b (accumulation dtype); None = 0.
        own_block: the keys are the anchors themselves (the same rows and inverse norms, A == K, the
            same lse/alpha/beta per row): the backward returns the rows' whole gradient, the anchor side
            G k̂/τ and the key side Gᵀ â/τ, as ``d_a`` and ``None`` for ``d_k``, so a backend can make both
            from one recomputed tile (G_ac and G_ca share s_ac = s_ca).

    Raises:
        ValueError: a field that contradicts ``positives`` / ``epilogue`` (named in the message).
    """

    positives: str = "none"
    self_offset: Optional[int] = None
    pos_index: Optional[Tensor] = None
    a_labels: Optional[Tensor] = None
    k_labels: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    exclude_positives: bool = False
    epilogue: str = "softmax"
    bias: Optional[Tensor] = None
    own_block: bool = False

    def __post_init__(self):
        if self.positives not in POSITIVES:
            raise ValueError(f"positives: expected one of {list(POSITIVES)}, got {self.positives!r}")
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue: expected one of {list(EPILOGUES)}, got {self.epilogue!r}")
        needs = {"index": ("pos_index",), "labels": ("a_labels", "k_labels"), "mask": ("mask",), "none": ()}
        for name in ("pos_index", "a_labels", "k_labels", "mask"):
            given = getattr(self, name) is not None
            if given != (name in needs[self.positives]):
                state = "is required" if not given else "must be None"
                raise ValueError(f"{name}: {state} with positives={self.positives!r}")
        if self.bias is not None and self.epilogue != "sigmoid":
            raise ValueError(f"bias: only the sigmoid epilogue has a logit bias, got epilogue={self.epilogue!r}")


class BlockForward(Protocol):
    """The signature of every backend's ``block_forward`` (the reference: ``fastcl.torch_backend.block``).

    Args:
        a, k: anchor rows [A, D] and key rows [K, D] (any strides, the same floating dtype and device).
        a_inv, k_inv: inverse norms [A] / [K] in the accumulation dtype, or None (no normalization).
        tau: 0-dim temperature in the accumulation dtype.
        sub_dim: the number of leading features compared, read in place through the strides.
        layout: positives and exclusions of the block.

    Returns:
        (stat [A], pos_sum [A], pos_weight [A]) in the accumulation dtype: stat is log Σ exp(s) over the
        entries not excluded (softmax epilogue) or Σ softplus(s + b) (sigmoid), then Σ_c P_ac s_ac, Σ_c P_ac.
    """

    def __call__(
        self,
        a: Tensor,
        a_inv: Optional[Tensor],
        k: Tensor,
        k_inv: Optional[Tensor],
        tau: Tensor,
        sub_dim: int,
        layout: Layout,
    ) -> tuple[Tensor, Tensor, Tensor]: ...


class BlockBackward(Protocol):
    """The signature of every backend's ``block_backward``: one block's gradients given the merged statistics.

    Args:
        a, a_inv, k, k_inv, tau, sub_dim, layout: as :class:`BlockForward`.
        lse: [A] the anchors' statistic merged over all blocks (unused by the sigmoid epilogue).
        alpha, beta: [A] coefficients of G_ac = alpha_a·exp(s_ac − lse_a) − beta_a·P_ac (sigmoid:
            alpha_a·σ(s_ac + b) − beta_a·P_ac).

    Returns:
        (d_a [A, sub_dim], d_k [K, sub_dim] or None under ``layout.own_block``, gs): gradients with respect
        to the raw rows' prefix (normalization backward included) in the accumulation dtype, and
        gs = Σ G·s (0-dim; the sigmoid epilogue returns [Σ G·s, Σ G]).
    """

    def __call__(
        self,
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
    ) -> tuple[Tensor, Optional[Tensor], Tensor]: ...


class ClassSegments(NamedTuple):
    """Where each class's rows lie once sorted by class (:func:`class_segments`); shared by the sums
    of several value tensors over the same classes."""

    order: Tensor  # [K] row indices sorted by class, stable
    pieces: Tensor  # [K] length of the piece starting at each sorted position (0 where none starts)
    tiles: Tensor  # [n_classes] tile starts inside each class's sorted span
    partial_start: Tensor  # [n_classes] sorted position of a class's first piece when it does not begin a tile, else -1
    tile: int  # tile length T


def class_segments(classes: Tensor, n_classes: int) -> ClassSegments:
    """The sorted layout of ``classes`` ([K] ids in [0, n_classes)) for :func:`class_sums`."""
    rows = classes.shape[0]
    tile = 1 << max(0, math.ceil(math.log2(max(rows, 1)) / 2))  # T ≈ √K: both levels' loops ≤ ~√K
    ids = classes.to(torch.int64)
    order = torch.sort(ids, stable=True).indices
    ordered = ids[order]
    every = torch.arange(n_classes, device=ids.device)
    starts = torch.searchsorted(ordered, every)
    ends = torch.searchsorted(ordered, every, right=True)
    position = torch.arange(rows, device=ids.device)
    class_end = ends[ordered]
    tile_end = (position // tile + 1) * tile
    begins = (starts[ordered] == position) | (position % tile == 0)
    pieces = torch.where(begins, torch.minimum(class_end, tile_end) - position, 0)
    tiles = (ends + tile - 1) // tile - (starts + tile - 1) // tile
    partial_start = torch.where((ends > starts) & (starts % tile != 0), starts, -1)
    return ClassSegments(order, pieces, tiles, partial_start, tile)


def class_sums(values: Tensor, segments: ClassSegments) -> Tensor:
    """[n_classes, D]: row c is the sum of the rows of ``values`` ([K, D]) of class c (0 for an empty class).

    Deterministic by construction, with no atomics (``index_add_`` is atomicAdd on CUDA, nondeterministic
    by PyTorch's own list) and no host sync: the rows are sorted by class (a stable sort) and summed in
    two levels of fixed-order sequential segment sums (``torch.segment_reduce``, one thread per output
    element on CUDA): first the pieces of each class inside tiles of T ≈ √K sorted rows, then each
    class's tile-start pieces. Each loop runs over at most about √K terms, so the rounding error is
    that of a √K-term sum at each level (about 2√K·ε relative to Σ|x| in the worst case). Not a
    one-hot GEMM: that is O(K²·D) work, and TF32 would round the values; not cumsum differences:
    floating cumsum is itself nondeterministic on CUDA and cancels against the whole prefix."""
    rows, dim = values.shape
    n_classes = segments.tiles.shape[0]
    out = values.new_zeros(n_classes, dim)
    if rows == 0:
        return out
    partial = segments.partial_start >= 0
    first_pieces = segments.partial_start.clamp(min=0)
    step = max(1, (1 << 22) // rows)  # feature columns per pass: [K, step] temporaries of ~16 MB
    for start in range(0, dim, step):
        ordered = values[segments.order, start : start + step]
        pieces = torch.segment_reduce(ordered, "sum", lengths=segments.pieces, unsafe=True, initial=0.0)
        tiles = pieces[:: segments.tile]
        sums = torch.segment_reduce(tiles, "sum", lengths=segments.tiles, unsafe=True, initial=0.0)
        out[:, start : start + step] = sums + partial[:, None] * pieces[first_pieces]
    return out


class PositiveKind(IntEnum):
    """``Layout.positives`` as the integer a compiled kernel specializes on (its ``POSITIVES`` constexpr).

    Example:
        >>> PositiveKind.of(Layout(positives="labels", a_labels=torch.zeros(1), k_labels=torch.zeros(1)))
        <PositiveKind.LABELS: 2>
    """

    NONE = 0
    INDEX = 1
    LABELS = 2
    MASK = 3

    @classmethod
    def of(cls, layout: Layout) -> "PositiveKind":
        return cls[layout.positives.upper()]
