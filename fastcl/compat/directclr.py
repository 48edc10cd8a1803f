"""DirectCLR's losses (github.com/facebookresearch/directclr, ``directclr/main.py``): change only the import.

    from main import infoNCE                               # before
    from fastcl.compat.directclr import infoNCE             # after

* ``infoNCE(nn, p, temperature=0.1)``: one-way InfoNCE of normalized ``nn`` against normalized ``p``;
  under DDP over the rows of all ranks, as DirectCLR's ``gather_from_all`` (fastcl's ``distributed="auto"``,
  which is "gather" under a process group: the same value on every rank and, after DDP's average, the same
  gradients; in one process it runs locally without the warning an explicit "gather" gives there).
* ``directclr_loss(r1, r2, dim=360, temperature=0.1)``: the ``--mode directclr`` loss,
  ``infoNCE(z1, z2) / 2 + infoNCE(z2, z1) / 2`` with ``z = r[:, :dim]``; the prefix is read in place.
* ``group_loss(r1, r2, idx=None, groups=8, temperature=0.1)``: the ``--mode group`` loss, the sum over
  ``groups`` random disjoint feature subsets of the symmetric InfoNCE; ``idx=None`` draws the
  permutation from NumPy's global generator exactly as DirectCLR does (``np.random.shuffle``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastcl import functional
from fastcl.compat._common import check_rows

__all__ = ["infoNCE", "directclr_loss", "group_loss"]


def infoNCE(nn: Tensor, p: Tensor, temperature: float = 0.1) -> Tensor:  # noqa: N802 (DirectCLR's name)
    """DirectCLR's one-way InfoNCE (van den Oord et al. 2018, https://arxiv.org/abs/1807.03748).

    Args:
        nn: ``[N, D]`` queries. p: ``[N, D]`` keys; ``p[i]`` is the positive of ``nn[i]``.
        temperature: τ > 0.

    Returns:
        ``mean_i [ −s(nn_i, p_i) + log Σ_j exp s(nn_i, p_j) ]`` on normalized rows (0-dim).

    Example:
        >>> import torch
        >>> loss = infoNCE(torch.randn(8, 16), torch.randn(8, 16))
        >>> loss.shape
        torch.Size([])
    """
    check_rows(("nn", "p"), (nn, p), None)
    return functional.info_nce(nn, p, temperature, symmetric=False, distributed="auto", check_finite=False)


def directclr_loss(r1: Tensor, r2: Tensor, dim: int = 360, temperature: float = 0.1) -> Tensor:
    """DirectCLR (Jing et al. 2022, https://arxiv.org/abs/2110.09348): symmetric InfoNCE on ``r[:, :dim]``.

    Args:
        r1, r2: ``[N, D]`` representations of the two views.
        dim: prefix length (DirectCLR's ``--dim``); ``dim ≥ D`` uses all D features, as DirectCLR's
            slice ``r[:, :dim]`` does.
        temperature: τ > 0.

    Returns:
        ``infoNCE(z1, z2) / 2 + infoNCE(z2, z1) / 2`` (0-dim).

    Raises:
        ValueError: ``dim`` < 1 (an empty prefix), bad shapes (naming ``r1`` / ``r2``).

    Example:
        >>> import torch
        >>> loss = directclr_loss(torch.randn(8, 2048), torch.randn(8, 2048))
    """
    check_rows(("r1", "r2"), (r1, r2), None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a prefix length >= 1 (DirectCLR's r[:, :dim]), got {dim!r}")
    return functional.info_nce(
        r1, r2, temperature, sub_dim=min(dim, r1.shape[1]), symmetric=True, distributed="auto", check_finite=False
    )


def group_loss(
    r1: Tensor, r2: Tensor, idx: Optional[Sequence[int]] = None, groups: int = 8, temperature: float = 0.1
) -> Tensor:
    """DirectCLR's ``--mode group``: Σ over ``groups`` disjoint random feature subsets of the symmetric InfoNCE.

    Args:
        r1, r2: ``[N, D]`` representations; D must be divisible by ``groups`` (2048 / 8 = 256 in DirectCLR).
        idx: a permutation of ``range(D)`` (a list or array is checked; a tensor is taken to be one, as
            checking it would read the device); ``None`` draws ``np.random.permutation(D)``, the same
            permutation as DirectCLR's ``np.random.shuffle(np.arange(D))`` for the same NumPy state.
        groups: number of subsets.
        temperature: τ > 0.

    Returns:
        The summed loss (0-dim).

    Raises:
        ValueError: D not divisible by ``groups``, or ``idx`` not a permutation of ``range(D)``.

    Example:
        >>> import torch
        >>> loss = group_loss(torch.randn(8, 64), torch.randn(8, 64), idx=torch.randperm(64), groups=8)
    """
    check_rows(("r1", "r2"), (r1, r2), None)
    d = r1.shape[1]
    if groups < 1 or d % groups:
        raise ValueError(f"groups: expected a divisor of D = {d}, got {groups}")
    if idx is None:
        import numpy as np

        idx = np.random.permutation(d)
    if not isinstance(idx, Tensor) and sorted(int(i) for i in idx) != list(range(d)):
        raise ValueError(f"idx: expected a permutation of range({d}), got {len(idx)} entries that are not one")
    idx = torch.as_tensor(idx, dtype=torch.long, device=r1.device)
    if idx.shape != (d,):
        raise ValueError(f"idx: expected a permutation of range({d}), got shape {tuple(idx.shape)}")
    p1, p2 = _PermutedColumns.apply(r1, idx), _PermutedColumns.apply(r2, idx)
    size = d // groups
    loss = 0
    for start in range(0, d, size):
        loss = loss + functional.info_nce(
            p1[:, start : start + size],
            p2[:, start : start + size],
            temperature,
            symmetric=True,
            distributed="auto",
            check_finite=False,
        )
    return loss


class _PermutedColumns(torch.autograd.Function):
    """``x[:, idx]`` for a permutation ``idx``, whose gradient is the upstream's columns in the inverse
    order: a plain gather, where autograd of the indexing accumulates with ``index_put`` (which PyTorch
    lists as nondeterministic on CUDA)."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        return x[:, idx]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        return grad[:, torch.argsort(idx)], None
