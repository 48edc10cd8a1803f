"""Row-block evaluation of the few peer formulas that fastcl's fused losses do not compute.

Two peer formulas are not functions of the block primitive's per-anchor statistics (log-sum-exp over
the keys a layout keeps, Σ P·s, Σ P): pytorch-metric-learning's NT-Xent with several positives per
anchor (a softplus per positive pair against the anchor's negatives) and solo-learn's log of the summed
positives (a log-sum-exp over the positives only, which no layout keeps). The compat layer evaluates
those two here: anchors in row
blocks against all keys, each block under activation checkpointing, so no anchors × keys matrix is
ever held (one ``rows × keys`` block at a time, forward and backward) and the gradient is exact
autograd of the formula. Reductions run in float32 or wider.

The primitive statistics that would move both onto the engine (a positives-only log-sum-exp for
solo-learn; a second sweep with the negatives' log-sum-exp as input and a per-pair softplus for pml),
with their forward statistics and backward G, are in docs/migration.md ("What the engine still lacks").
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastcl.contract import accumulation_dtype

# Elements of one rows × keys logits block (fp32: 8 MiB), as the torch backend's tiles.
_BLOCK_ELEMENTS = 1 << 21

BlockTerm = Callable[[Tensor, slice], Tensor]


def block_sum(
    anchors: Tensor,
    keys: Tensor,
    tau: Union[float, Tensor],
    term: BlockTerm,
    *,
    self_index: Optional[Tensor] = None,
    per_row: bool = False,
) -> Tensor:
    """Σ over anchor row blocks of ``term(s, rows)``, ``s = anchors[rows] @ keys.T / tau``.

    Args:
        anchors: ``[A, D]`` rows, used as given (normalize before calling if the formula does).
        keys: ``[K, D]`` rows.
        tau: temperature, a float or a 0-dim tensor (its gradient flows).
        term: maps a block's logits ``[rows, K]`` and the block's ``slice`` of anchors to a 0-dim sum.
        self_index: ``[A]`` key index of each anchor's own row (its logit is set to −inf), or None.
        per_row: ``term`` returns one value per anchor row; return them all ``[A]`` instead of a sum.

    Returns:
        The 0-dim sum (or ``[A]`` values), in float32 (float64 for float64 rows).
    """
    acc = accumulation_dtype(anchors.dtype)
    a, k = anchors.to(acc), keys.to(acc)
    tau = tau.to(acc) if isinstance(tau, Tensor) else float(tau)
    step = max(1, _BLOCK_ELEMENTS // max(1, k.shape[0]))

    def block(a_rows: Tensor, k_all: Tensor, t, start: int) -> Tensor:
        s = (a_rows @ k_all.T) / t
        if self_index is not None:
            own = self_index[start : start + a_rows.shape[0], None] == torch.arange(s.shape[1], device=s.device)
            s = s.masked_fill(own, float("-inf"))
        return term(s, slice(start, start + a_rows.shape[0]))

    parts = [
        checkpoint(block, a[start : start + step], k, tau, start, use_reentrant=False)
        for start in range(0, a.shape[0], step)
    ]
    if per_row:
        return torch.cat(parts) if parts else a.new_zeros((0,))
    return torch.stack(parts).sum() if parts else a.new_zeros(())


def masked_logsumexp(s: Tensor, keep: Tensor) -> Tensor:
    """Row-wise log Σ exp over the kept entries; −inf (with zero gradient, never NaN) for empty rows."""
    nonempty = keep.any(dim=1)
    filled = torch.where(keep & nonempty[:, None], s, torch.where(nonempty[:, None], float("-inf"), 0.0))
    return torch.where(nonempty, torch.logsumexp(filled, dim=1), float("-inf"))
