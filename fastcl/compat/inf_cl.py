"""Inf-CL (github.com/DAMO-NLP-SG/Inf-CLIP, package ``inf_cl``): change only the import line.

    from inf_cl import cal_inf_loss                   # before
    from fastcl.compat.inf_cl import cal_inf_loss      # after

Same functions ``cal_inf_loss`` / ``cal_ring_loss`` (mean) and ``cal_flash_loss`` (per-row losses), same
arguments ``(q, k, labels=None, scale=None, head_dim=256)`` and values: one direction (q against k), rows
used as given (no normalization), ``scale`` (an exponentiated logit scale, or None for 1) multiplies the
logits, ``labels[i]`` is the index of q_i's positive in k (default ``arange``), and k may hold more rows
than q. ``head_dim`` only shapes Inf-CL's kernels (its ``q.view(B, -1, head_dim)``), so it must divide D as
there (a ``ValueError`` naming it otherwise); the value does not depend on it. NaN or Inf in q, k or the
scale gives NaN, as Inf-CL, without a raise or a host sync.

Under an initialized process group (as Inf-CL checks), ``cal_inf_loss`` / ``cal_ring_loss`` compute this
rank's q against the k of every rank (``labels`` index this rank's k, as in Inf-CL), each rank's key
gradient summed over ranks and the scale's gradient all-reduced, as Inf-CL's ring does.

Every function computes Inf-CL's per-row losses as Inf-CL does: each row's log-sum-exp from the block
primitive (never a B × K matrix) and its positive logit from one row-wise product (the positive keys'
gradient summed per key in a fixed order, without atomics); the mean functions average them.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from fastcl import _validate
from fastcl.compat._common import all_gather_rows, check_rows, key_logsumexp, scale_rows
from fastcl.contract import class_segments, class_sums
from fastcl.distributed import world_size

__all__ = ["cal_inf_loss", "cal_ring_loss", "cal_flash_loss"]

Scale = Optional[Union[float, Tensor]]


class _AllReduceGrad(torch.autograd.Function):
    """Identity whose gradient is summed over ranks (Inf-CL's GradientGather on the scale)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _checked(q: Tensor, k: Tensor, labels: Optional[Tensor], scale: Scale, head_dim: int):
    """Inf-CL's inputs checked in its terms: (scale·q, k, each query's positive key index)."""
    check_rows(("q", "k"), (q, k), None, same_n=False)
    d = q.shape[1]
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1 or d % head_dim:
        raise ValueError(
            f"head_dim: Inf-CL views each row as [D / head_dim, head_dim], so it must divide D = {d}; got {head_dim!r}"
        )
    positive = torch.arange(q.shape[0], device=q.device) if labels is None else labels.to(q.device)
    try:
        _validate.targets(positive, q.shape[0], q.device)
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("targets", "labels", 1)) from None
    return (q if scale is None else scale_rows("scale", q, scale)), k, positive


def cal_flash_loss(
    q: Tensor, k: Tensor, labels: Optional[Tensor] = None, scale: Scale = None, head_dim: int = 256
) -> Tensor:
    """Per-row InfoNCE losses of q against k on one process (Inf-CL's ``cal_flash_loss``).

    Args:
        q: ``[B, D]`` queries. k: ``[K, D]`` keys (K ≥ B allowed).
        labels: ``[B]`` index of each query's positive key; default ``arange(B)``.
        scale: logit scale (already exponentiated), float or one-element tensor; None: 1.
        head_dim: Inf-CL's kernel tiling; must divide D (no effect on the value).

    Returns:
        ``[B]``: ``log Σ_j exp(scale q_i·k_j) − scale q_i·k_{labels_i}``, float32 (float64 for float64).

    Example:
        >>> import torch
        >>> q, k = torch.randn(4, 32), torch.randn(6, 32)
        >>> cal_flash_loss(q, k, labels=torch.tensor([5, 0, 2, 2]), head_dim=16).shape
        torch.Size([4])
    """
    return _per_row_losses(*_checked(q, k, labels, scale, head_dim))


def _per_row_losses(q: Tensor, k: Tensor, positive: Tensor) -> Tensor:
    """Inf-CL's lse_i − q_i·k_{positive_i}: the lse on the block primitive, the positive logit row-wise (an
    infinite logit then gives Inf-CL's ±Inf, where a Σ P·s statistic has 0·Inf = NaN)."""
    lse = key_logsumexp(q, k)
    acc = lse.dtype
    return lse - (q.to(acc) * _KeyRows.apply(k, positive).to(acc)).sum(dim=1)


class _KeyRows(torch.autograd.Function):
    """``k[index]``, whose backward sums the gradient rows of each key in a fixed order
    (:func:`fastcl.contract.class_sums`, no host sync): autograd's ``index_put`` accumulates with
    atomics on CUDA (nondeterministic by PyTorch's own list), and several queries may share a key."""

    @staticmethod
    def forward(ctx, k: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.keys = k.shape[0]
        return k[index]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return class_sums(grad, class_segments(index, ctx.keys)), None


def cal_inf_loss(
    q: Tensor, k: Tensor, labels: Optional[Tensor] = None, scale: Scale = None, head_dim: int = 256
) -> Tensor:
    """Mean InfoNCE loss of q against k (Inf-CL's ``cal_inf_loss``; Cheng et al. 2024,
    https://arxiv.org/abs/2410.17243), across ranks under an initialized process group.

    Args:
        q: ``[B, D]`` queries. k: ``[K, D]`` keys (K ≥ B allowed).
        labels: ``[B]`` index of each query's positive in this rank's k; default ``arange(B)``.
        scale: logit scale (already exponentiated), float or one-element tensor; None: 1.
        head_dim: Inf-CL's kernel tiling; must divide D (no effect on the value).

    Returns:
        The 0-dim mean over this rank's queries.

    Raises:
        ValueError: bad shapes or a non-positive scale (fastcl's messages name the argument).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> q, k = F.normalize(torch.randn(8, 256), dim=1), F.normalize(torch.randn(8, 256), dim=1)
        >>> scale = torch.tensor(1 / 0.07, requires_grad=True)
        >>> loss = cal_inf_loss(q, k, scale=scale)
        >>> loss.backward()
        >>> scale.grad is not None
        True
    """
    distributed = dist.is_available() and dist.is_initialized() and world_size() > 1
    if distributed and isinstance(scale, Tensor):
        scale = _AllReduceGrad.apply(scale)
    q, k, positive = _checked(q, k, labels, scale, head_dim)
    if distributed:
        k, positive = all_gather_rows(k, with_grad=True), positive + k.shape[0] * dist.get_rank()
    return _per_row_losses(q, k, positive).mean()


def cal_ring_loss(
    q: Tensor, k: Tensor, labels: Optional[Tensor] = None, scale: Scale = None, head_dim: int = 256
) -> Tensor:
    """Inf-CL's ``cal_ring_loss``: the same loss as :func:`cal_inf_loss` (Inf-CL's ring variant
    differs only in how its kernels tile the keys).

    Args:
        q, k, labels, scale, head_dim: as :func:`cal_inf_loss`.

    Example:
        >>> import torch
        >>> q, k = torch.randn(8, 64), torch.randn(8, 64)
        >>> bool(torch.isclose(cal_ring_loss(q, k, head_dim=64), cal_inf_loss(q, k, head_dim=64)))
        True
    """
    return cal_inf_loss(q, k, labels, scale, head_dim)
