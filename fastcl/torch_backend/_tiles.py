"""Row blocking shared by the torch backend's losses."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from fastcl.contract import NORM_EPS, accumulation_dtype

# A tile of rows × M float32 logits is about 8 MiB; the backward holds ~4 such temporaries.
_TILE_ELEMENTS = 1 << 21
_override: Optional[int] = None


def chunk_rows(n_cols: int) -> int:
    """Rows per block: the user's override, else a power of two that keeps a tile near 2M elements."""
    if _override is not None:
        return _override
    rows = 1 << max(4, (_TILE_ELEMENTS // max(n_cols, 1)).bit_length() - 1)
    return min(rows, max(n_cols, 1))


@contextlib.contextmanager
def chunk_size(rows: int) -> Iterator[None]:
    """Overrides the automatic block size of the torch backend.

    Example:
        >>> import torch, fastcl
        >>> with fastcl.torch_backend.chunk_size(64):
        ...     loss = fastcl.functional.nt_xent(torch.randn(100, 8), torch.randn(100, 8), backend="torch")
    """
    global _override
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows: expected a positive int, got {rows!r}")
    previous, _override = _override, rows
    try:
        yield
    finally:
        _override = previous


def blocks(n_rows: int, n_cols: int) -> Iterator[tuple[int, int]]:
    step = chunk_rows(n_cols)
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def upcast(x: Tensor) -> Tensor:
    """Rows in the accumulation dtype (a copy only for 16-bit inputs)."""
    return x.to(accumulation_dtype(x.dtype))


def logits(scaled_rows: Tensor, cols: Tensor) -> Tensor:
    """s = (rows/τ) · colsᵀ, computed the same way in every forward and backward pass.

    Rows are scaled by 1/τ before the GEMM (R·D work) rather than dividing the R×M tile.
    """
    return scaled_rows @ cols.T


def row_logsumexp(s: Tensor) -> Tensor:
    """log Σ_j exp(s_ij) with the row max subtracted; overwrites ``s`` to save a tile-sized temporary."""
    row_max = s.amax(dim=1, keepdim=True)
    return row_max.squeeze(1) + s.sub_(row_max).exp_().sum(dim=1).log_()


def mask_self(s: Tensor, start: int) -> Tensor:
    """Sets s[i, start + i] = −inf in place (a row block's diagonal against all columns)."""
    s.diagonal(offset=start).fill_(float("-inf"))
    return s


def prepare_rows(x: Tensor, sub_dim: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """The rows the loss compares: x[:, :sub_dim] in the accumulation dtype, L2-normalized when asked.

    Returns (rows, norms); norms is empty when not normalizing. This copy is the torch backend's own
    working set (the fused backends read the prefix through strides instead).
    """
    rows = upcast(x[:, :sub_dim])
    if not normalize:
        return rows, rows.new_empty(0)
    norms = rows.norm(dim=1)
    return rows / norms.clamp_min(NORM_EPS)[:, None], norms


def rows_backward(d_rows: Tensor, rows: Tensor, norms: Tensor) -> Tensor:
    """dL/dx[:, :sub_dim] from dL/d(rows): F.normalize's gradient (dẑ − ẑ⟨ẑ, dẑ⟩)/‖x‖, where the norm
    was clamped to eps only the 1/eps scale remains; the identity when not normalizing."""
    if norms.numel() == 0:
        return d_rows
    radial = torch.where(norms > NORM_EPS, (rows * d_rows).sum(dim=1), 0.0)
    return (d_rows - rows * radial[:, None]) / norms.clamp_min(NORM_EPS)[:, None]


def full_gradient(d_prefix: Tensor, like: Tensor) -> Tensor:
    """A gradient shaped like ``like``: ``d_prefix`` on the first features, exactly zero after them."""
    grad = torch.zeros_like(like, memory_format=torch.contiguous_format)
    grad[..., : d_prefix.shape[-1]] = d_prefix
    return grad


def grad_dot_logits(pairs: list[tuple[Tensor, Tensor]], count: int) -> Tensor:
    """Σ_ij G_ij s_ij from rows and their gradients: Σ_i ⟨ẑ_i, dẑ_i⟩ counts every pair ``count`` times."""
    return sum((rows * d_rows).sum() for rows, d_rows in pairs) / count
