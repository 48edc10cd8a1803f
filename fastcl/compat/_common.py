"""Helpers shared by the compat modules: collectives with the peers' gradient rules, logit scales."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from fastcl import _validate, dispatch
from fastcl.contract import Layout, accumulation_dtype
from fastcl.distributed import _reduce_scatter as reduce_scatter
from fastcl.distributed import world_size
from fastcl.engine import block_loss


def check_rows(names: Sequence[str], tensors: Sequence[Tensor], temperature, same_n: bool = True) -> None:
    """fastcl's input checks for the losses the compat layer evaluates itself: ``[N, D]`` floating rows
    of one dtype, device and D (and N when ``same_n``), a temperature > 0 (None: not checked here, e.g.
    a tensor the loss checks without a host sync); errors name the argument."""
    for name, t in zip(names, tensors):
        _validate.embeddings(name, t, 2)
    rows = min(t.shape[0] for t in tensors)
    _validate.same_layout(names, tensors if same_n else [t[:rows] for t in tensors])
    if temperature is not None:
        _validate.temperature("temperature", temperature, tensors[0].device, True)


class _GatherRows(torch.autograd.Function):
    """All ranks' rows (equal counts); the backward returns each rank the sum over ranks of the gradient
    of its rows, one reduce-scatter (what the peers' GatherLayer computes with an all-reduce)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        mine = grad.new_empty((grad.shape[0] // world_size(), *grad.shape[1:]))
        reduce_scatter(mine, grad.contiguous())
        return mine


def all_gather_rows(x: Tensor, with_grad: bool) -> Tensor:
    """The rows of every rank, rank-major. ``with_grad``: the backward sums every rank's gradient for
    this rank's rows (the GatherLayer of SimCLR-style code bases); otherwise a plain, gradient-free copy."""
    if with_grad:
        return _GatherRows.apply(x)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged in the forward; its gradient multiplied by ``factor`` in the backward."""
    return _ScaleGrad.apply(x, factor)


def scalar(name: str, value: Union[float, Tensor]) -> Union[float, Tensor]:
    """A float, or a one-element tensor (0-dim or ``[1]``) as 0-dim: the peers' logit scales and biases.
    No value is read (no host sync): 0, negative or non-finite values act as in the peer's formula."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a scalar or a one-element tensor, got shape {tuple(value.shape)}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float or a one-element tensor, got {type(value).__name__}")
    return float(value)


def scale_rows(name: str, rows: Tensor, scale: Union[float, Tensor]) -> Tensor:
    """``scale · rows``: a peer's logit scale multiplies the logits ``scale · a·kᵀ``; applied to one side's
    rows (the loss then runs at τ = 1) it gives the same logits for any scale the peer accepts (0 and
    negative included, where τ = 1/scale would not exist) and the scale's gradient flows. The rows keep
    their dtype (a 0-dim scale does not promote them), as in the peer's ``logit_scale * features``."""
    return rows * scalar(name, scale)


def class_ids(labels: Tensor) -> Tensor:
    """``[N]`` int64 ids, equal exactly where the labels are equal as ``torch.eq`` compares them (any dtype;
    a NaN label equals nothing), without a host sync: sort + searchsorted (``torch.unique`` reads the
    device to size its output). Ids lie in [0, 2N) and need not be consecutive."""
    flat = labels.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    ids = torch.searchsorted(flat.sort().values, flat)
    if flat.is_floating_point():
        own = torch.arange(flat.shape[0], device=flat.device) + flat.shape[0]
        ids = torch.where(torch.isnan(flat), own, ids)
    return ids


def matches(values: Tensor, among: Tensor) -> Tensor:
    """``[len(values)]``: how many entries of ``among`` equal each entry of ``values`` (integer ids such
    as :func:`class_ids`'), by sort + searchsorted: no ``[len(values), len(among)]`` matrix, no host sync."""
    ordered = among.sort().values
    return torch.searchsorted(ordered, values, right=True) - torch.searchsorted(ordered, values)


def zero_loss(*rows: Tensor) -> Tensor:
    """An exact 0 connected to the inputs' graph (zero gradients, never NaN even for NaN rows)."""
    return sum(r[:0].sum().to(accumulation_dtype(r.dtype)) for r in rows)


def plan_loss(
    rows: Tensor,
    plan: str,
    part_sizes: Sequence[int],
    tau: Union[float, Tensor] = 1.0,
    *,
    loss: str,
    labels: Optional[Tensor] = None,
    bias: Union[float, Tensor, None] = None,
    normalize: bool = False,
) -> Tensor:
    """One process's :func:`fastcl.engine.block_loss` of ``plan`` over ``rows`` (the peers' own gathers
    come before: a gathered copy is just more rows here), on the backend ``"auto"`` picks for them and
    ``loss``, the registry loss whose formula the plan computes (it names "auto"'s self-check)."""
    acc = accumulation_dtype(rows.dtype)
    device = rows.device
    as_tensor = lambda v: v.to(acc) if isinstance(v, Tensor) else torch.full((), float(v), dtype=acc, device=device)  # noqa: E731
    return block_loss(
        rows,
        plan,
        list(part_sizes),
        as_tensor(tau),
        labels=labels,
        bias=None if bias is None else as_tensor(bias),
        normalize=normalize,
        mode="local",
        backend=dispatch.resolve_block("auto", device, rows.dtype, loss),
    )


class _BlockStatistic(torch.autograd.Function):
    """The block primitive's per-anchor statistic of one block (softmax epilogue: ``lse_a``; sigmoid:
    ``Σ_c softplus(s_ac + b)``, over the entries the layout keeps), differentiable in the anchors, the
    keys, τ and the bias: the primitive's backward with α = the upstream gradient of each statistic and
    β = 0 (docs/block-engine.md). Never an A × K matrix."""

    @staticmethod
    def forward(ctx, anchors: Tensor, keys: Tensor, tau: Tensor, bias: Optional[Tensor], layout: Layout, backend):
        layout = layout if bias is None else dataclasses.replace(layout, bias=bias)
        forward_fn, _ = dispatch.block_primitive(backend)
        stat, _, _ = forward_fn(anchors, None, keys, None, tau, anchors.shape[1], layout)
        ctx.save_for_backward(anchors, keys, tau, stat)
        ctx.layout, ctx.backend = layout, backend
        return stat

    @staticmethod
    def backward(ctx, grad: Tensor):
        anchors, keys, tau, stat = ctx.saved_tensors
        _, backward_fn = dispatch.block_primitive(ctx.backend)
        alpha = grad.to(stat.dtype)
        d_a, d_k, gs = backward_fn(
            anchors, None, keys, None, tau, anchors.shape[1], ctx.layout, stat, alpha, torch.zeros_like(alpha)
        )
        gs = gs.reshape(-1)
        d_tau = -gs[0] / tau if ctx.needs_input_grad[2] else None
        d_bias = gs[1] if ctx.needs_input_grad[3] else None  # sigmoid: Σ G = dL/db
        return d_a.to(anchors.dtype), d_k.to(keys.dtype), d_tau, d_bias, None, None


def _accumulation_scalar(value: Union[float, Tensor], like: Tensor) -> Tensor:
    acc = accumulation_dtype(like.dtype)
    return value.to(acc) if isinstance(value, Tensor) else torch.full((), float(value), dtype=acc, device=like.device)


def key_logsumexp(anchors: Tensor, keys: Tensor, tau: Union[float, Tensor] = 1.0) -> Tensor:
    """``[A]``: each anchor row's log-sum-exp over all key rows at temperature τ (rows used as given),
    in the accumulation dtype, on the backend ``"auto"`` picks for InfoNCE (whose denominator this is):
    the per-anchor statistic the peers' own formulas need beside the block engine's mean losses (Inf-CL's
    per-row losses). A row with a +Inf logit has lse = +Inf, as ``torch.logsumexp``."""
    backend = dispatch.resolve_block("auto", anchors.device, anchors.dtype, "info_nce")
    tau = _accumulation_scalar(tau, anchors)
    return _BlockStatistic.apply(anchors, keys.to(anchors.dtype), tau, None, Layout(), backend)


def sigmoid_negatives(anchors: Tensor, keys: Tensor, bias: Union[float, Tensor]) -> Tensor:
    """``[A]``: ``Σ_{c ≠ a} softplus(a_a · k_c + b)``, anchor a's SigLIP terms against every key but its own
    positive (key a), rows used as given (τ = 1), in the accumulation dtype, on the backend ``"auto"``
    picks for SigLIP; the bias's gradient flows. Each term is a softplus of its own logit, so a +Inf
    logit gives +Inf (the engine's ``Σ softplus(z) − Σ P·z`` would give Inf − Inf = NaN there)."""
    backend = dispatch.resolve_block("auto", anchors.device, anchors.dtype, "siglip")
    own = torch.arange(anchors.shape[0], device=anchors.device)
    layout = Layout(positives="index", pos_index=own, exclude_positives=True, epilogue="sigmoid")
    tau, bias = _accumulation_scalar(1.0, anchors), _accumulation_scalar(bias, anchors)
    return _BlockStatistic.apply(anchors, keys.to(anchors.dtype), tau, bias, layout, backend)
