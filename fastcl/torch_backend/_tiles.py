"""Row blocking of the torch backend's block primitive (and the compat layer's row walks)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

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
