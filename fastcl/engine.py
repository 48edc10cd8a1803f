"""The block engine: any loss of docs/block-engine.md as blocks of the backend's primitive, in every mode.

A :class:`Plan` says which of a rank's rows are anchors and keys (``passes`` over consecutive *parts* of
the rows, e.g. [z1; z2] or SupCon's views), how positives are given, and how per-anchor statistics make
the loss. The parts are the caller's tensors as they are (any strides, full width, ``sub_dim`` read in
place): a pass runs one sweep of the primitive per part pair, and a part against itself on this rank's
own block is an own block (``Layout.own_block``, where the backend has ``SUPPORTS_OWN_BLOCK``).
:func:`block_loss` runs it: ``"local"`` as one block of this process's rows, ``"gather"`` against every
rank's rows after one all-gather, ``"ring"`` against key blocks rotating around the ranks
(:mod:`fastcl.distributed` holds the exchanges). The backend comes from :func:`fastcl.dispatch.block_primitive`.

The op is a ``torch.library`` custom op pair (forward and backward), so ``torch.compile(fullgraph=True)``
captures a model calling it in any mode without a graph break: the collectives run inside the opaque op.
Nothing but O(anchors) statistics is saved between the two: the backward exchanges the rows again
(gather: a second all-gather; ring: a second rotation, which the ring needs anyway to carry key grads).

Per-anchor loss (softmax epilogue), from the statistics merged over all blocks:

    ℓ_a = κ · (lse_a − pos_sum_a / pos_weight_a)      κ = τ/τ_b (SupCon) else 1
    L = Σ_passes weight_p · Σ_{a counted} w_a·ℓ_a / #counted     (reduction "mean")
    L = Σ_a w_a·ℓ_a                                                (reduction "sum")

(a pass whose positives are "none" is a negatives-only term, ℓ_a = κ·lse_a: DCL's same-view part)
and for the sigmoid epilogue (SigLIP) ℓ_a = Σ_c softplus(z_ac) − Σ_c P_ac z_ac with z = s + b. Anchors
without positives add 0 and are dropped from the count (``missing="drop"``) or counted (``"zero"``).
w_a is the caller's per-anchor weight (1 when none is given). The op also returns every ℓ_a (reduction
"none"), and its backward takes an upstream gradient per anchor as well as one for L: both only change
the per-anchor coefficients alpha_a / beta_a the block primitive already takes, so no kernel knows about
reductions or weights.

Gradient contract (gather/ring): with W ranks, when every rank backpropagates the returned loss and DDP
averages the gradients, the parameter gradients (temperature included) equal single-process training
on the rank-major concatenated batch. Rank r's anchors contribute L_r with Σ_r L_r = L; the op returns L
and backpropagates W·(upstream gradient)·L_r, whose key part reaches the owning ranks, so DDP's 1/W
average gives exactly dL/dθ. Reduction "none" returns this rank's own ℓ_a; their upstream gradients are
backpropagated as they are (no factor W), so DDP's average of what each rank makes of its ℓ_a (e.g. their
mean over equal local batches) is the gradient of the same function of the global batch.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from fastcl import dispatch
from fastcl import distributed as _distributed
from fastcl.contract import Layout, accumulation_dtype, inverse_norms

__all__ = ["Pass", "Plan", "block_loss"]


@dataclass(frozen=True)
class Pass:
    """One anchors × keys sweep over [first, last) part ranges of the local rows / of every block.

    ``positives``: "pairs" (NT-Xent: row i of part 0 ↔ row i of part 1, own block), "diagonal"
    (row i of the anchor part ↔ row i of the first key part, own block), "labels" (row labels equal), "mask"
    (SupCon's [N, N] sample mask, single process only) or "none". ``exclude_self``: on the own block
    the anchor row is also a key row and is left out.
    """

    anchors: tuple[int, int]
    keys: tuple[int, int]
    positives: str
    exclude_self: bool = False
    weight: float = 1.0


@dataclass(frozen=True)
class Plan:
    """A loss as passes. ``labels``: how per-row labels are made from the op's ``labels`` argument:
    "none"; "given" (per-sample class ids, repeated per part); "samples" (each global sample its own
    class); "targets" (part 0 rows carry the given global key indices, part 1 rows their own global index);
    "rows" (one given label per row of this rank, as given: the compat layer's already-gathered batches).
    ``pair_weight_sigma``: σ of DCLW's weights w_i = 2 − N·softmax_i(⟨ẑ_i, ẑ'_i⟩/σ) over the N global
    pairs (parts 0 and 1, row i of each; no gradient through w), which scale each anchor's positive term."""

    passes: tuple[Pass, ...]
    labels: str = "none"
    base_temperature: Optional[float] = None  # SupCon's κ = τ/τ_b; None: κ = 1
    exclude_positives: bool = False  # DCL
    epilogue: str = "softmax"
    missing: str = "drop"
    pair_weight_sigma: Optional[float] = None  # DCLW: von Mises-Fisher weights of the positive terms

    def encode(self) -> str:
        """The plan as a string, the form the custom op takes."""
        return json.dumps(asdict(self), sort_keys=True)


@functools.lru_cache(maxsize=256)
def _decode(plan: str) -> Plan:
    fields = json.loads(plan)
    fields["passes"] = tuple(Pass(tuple(p.pop("anchors")), tuple(p.pop("keys")), **p) for p in fields["passes"])
    return Plan(**fields)


def _part_start(sizes: list[int], part: int) -> int:
    return sum(sizes[:part])


def _rows_of(sizes: list[int], span: tuple[int, int]) -> tuple[int, int]:
    return _part_start(sizes, span[0]), _part_start(sizes, span[1])


def _row_labels(plan: Plan, labels: Optional[Tensor], sizes: list[list[int]], rank: int, device) -> Optional[Tensor]:
    """Per-row int64 labels of this rank's rows (they travel with the rows), or None."""
    mine = sizes[rank]
    if plan.labels == "none":
        return None
    if plan.labels == "given":
        return labels.to(torch.int64).repeat(len(mine))
    if plan.labels == "rows":
        return labels.to(torch.int64)
    if plan.labels == "samples":
        first = sum(s[0] for s in sizes[:rank])
        return (torch.arange(mine[0], device=device) + first).repeat(len(mine))
    first_key = sum(s[1] for s in sizes[:rank])
    return torch.cat([labels.to(torch.int64), torch.arange(mine[1], device=device) + first_key])


def _layout(
    plan: Plan,
    p: Pass,
    own: bool,
    anchor_part: int,
    key_part: int,
    n_anchors: int,
    labels: tuple[Optional[Tensor], Optional[Tensor]],
    mask: Optional[Tensor],
    bias: Optional[Tensor],
    own_block: bool,
    device: torch.device,
) -> Layout:
    """The primitive's layout for pass ``p`` on one part pair of one block: anchors from this rank's part
    ``anchor_part`` (``n_anchors`` rows), keys from the block's part ``key_part`` (``own``: this rank's
    own block). ``own_block``: the backend can return a part against itself as the rows' whole gradient."""
    same_part = own and anchor_part == key_part
    common = dict(
        exclude_positives=plan.exclude_positives,
        epilogue=plan.epilogue,
        bias=bias,
        self_offset=0 if same_part and p.exclude_self else None,
        own_block=same_part and own_block,
    )
    if p.positives == "labels":
        return Layout(positives="labels", a_labels=labels[0], k_labels=labels[1], **common)
    if p.positives == "mask":
        return Layout(positives="mask", mask=mask, **common)
    # "pairs": row i of one part ↔ row i of the other; "diagonal": row i of the anchor part ↔ row i of the
    # pass's first key part (later key parts, e.g. a MoCo queue, hold negatives only).
    diagonal = p.positives == "diagonal" and key_part == p.keys[0]
    if own and ((p.positives == "pairs" and not same_part) or diagonal):
        return Layout(positives="index", pos_index=torch.arange(n_anchors, device=device), **common)
    return Layout(**common)


@dataclass(frozen=True)
class _Sweep:
    """One pass on one part pair of one block: the primitive's arguments and where its outputs go."""

    index: int  # the pass
    anchor_part: int
    key_part: int
    anchors: tuple[int, int]  # row span of the local rows (the parts one after the other)
    keys: tuple[int, int]  # row span of the block's rows
    layout: Layout


class _Run:
    """What the forward and the backward share: the exchange, the rows' inverse norms, the layouts.

    The rows stay the caller's parts (any strides, full width): the primitive reads each part's first
    ``sub_dim`` features in place, so a pass over several parts runs one sweep per part pair. Only
    gather/ring pack the prefixes once, into the buffer the exchange sends."""

    def __init__(self, parts, labels, mask, tau, bias, plan: Plan, sizes, sub_dim, normalize, mode, backend):
        """``sizes``: every rank's part sizes (:func:`fastcl.distributed.rank_part_sizes`)."""
        self.plan, self.tau, self.mask, self.backend, self.sub_dim = plan, tau, mask, backend, sub_dim
        self.normalize = normalize
        self.bias = None if bias is None else bias.to(tau.dtype)
        self.forward_fn, self.backward_fn = dispatch.block_primitive(backend)
        self.own_block = dispatch.supports_own_block(backend)
        self.sizes = sizes
        self.rank = 0 if mode == "local" else dist.get_rank()
        self.world = len(self.sizes)
        device = parts[0].device
        self.row_labels = _row_labels(plan, labels, self.sizes, self.rank, device)
        self.parts = parts
        self.part_inv = [self._inv(part) for part in parts]
        # Own blocks are read from the parts; gather/ring send this rank's prefixes as one buffer.
        packed = None if mode == "local" else torch.cat([part[:, :sub_dim] for part in parts])
        self.exchange = _distributed.EXCHANGES[mode](packed, self.row_labels, [sum(s) for s in self.sizes])
        self.pair_weights = None if plan.pair_weight_sigma is None else self._pair_weights(mode)

    def _unit(self, part: int) -> Tensor:
        rows = self.parts[part][:, : self.sub_dim].to(self.tau.dtype)
        return rows if self.part_inv[part] is None else rows * self.part_inv[part][:, None]

    def _pair_weights(self, mode: str) -> Tensor:
        """DCLW's w per row (pair i's weight on both of its rows), from the global batch of pairs."""
        n = self.sizes[self.rank][0]
        logits = (self._unit(0) * self._unit(1)).sum(dim=1) / self.plan.pair_weight_sigma
        shift = logits.max() if n else logits.new_full((), float("-inf"))
        if mode != "local":
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        stats = torch.stack([torch.exp(logits - shift).sum(), logits.new_full((), float(n))])
        if mode != "local":
            dist.all_reduce(stats)
        w = 2.0 - stats[1] * torch.exp(logits - shift) / stats[0]
        return torch.cat([w, w])

    def _inv(self, rows: Tensor) -> Optional[Tensor]:
        return inverse_norms(rows, self.sub_dim) if self.normalize else None

    def positive_scale(self, start: int, stop: int):
        """The weight of the positive term of anchor rows start..stop (DCLW), else 1.0."""
        return 1.0 if self.pair_weights is None else self.pair_weights[start:stop]

    def anchor_spans(self) -> list[tuple[int, int]]:
        return [_rows_of(self.sizes[self.rank], p.anchors) for p in self.plan.passes]

    def blocks(self):
        """(owner, the block's key parts, their inverse norms, the sweeps of every pass), block by block."""
        mine = self.sizes[self.rank]
        for owner, block_rows, block_labels in self.exchange.blocks():
            own = owner == self.rank
            if own:
                key_parts, key_inv = self.parts, self.part_inv
            else:
                key_parts = list(block_rows.split(self.sizes[owner]))
                block_inv = self._inv(block_rows)
                key_inv = [None] * len(key_parts) if block_inv is None else list(block_inv.split(self.sizes[owner]))
            sweeps = []
            for i, p in enumerate(self.plan.passes):
                for anchor_part in range(*p.anchors):
                    for key_part in range(*p.keys):
                        a0, a1 = _rows_of(mine, (anchor_part, anchor_part + 1))
                        k0, k1 = _rows_of(self.sizes[owner], (key_part, key_part + 1))
                        labels = (
                            None if self.row_labels is None else self.row_labels[a0:a1],
                            None if block_labels is None else block_labels[k0:k1],
                        )
                        layout = _layout(
                            self.plan, p, own, anchor_part, key_part, a1 - a0, labels, self.mask, self.bias,
                            self.own_block, self.parts[0].device,
                        )  # fmt: skip
                        sweeps.append(_Sweep(i, anchor_part, key_part, (a0, a1), (k0, k1), layout))
            yield owner, key_parts, key_inv, sweeps

    def primitive(self, fn, sweep: _Sweep, key_parts: list[Tensor], key_inv: list, *extra):
        """Runs the forward or backward primitive on one sweep; a layout the backend lacks is a RuntimeError."""
        try:
            return fn(
                self.parts[sweep.anchor_part],
                self.part_inv[sweep.anchor_part],
                key_parts[sweep.key_part],
                key_inv[sweep.key_part],
                self.tau,
                self.sub_dim,
                sweep.layout,
                *extra,
            )
        except NotImplementedError as error:
            raise RuntimeError(f"backend={self.backend!r} cannot run this block: {error}") from error


def _anchor_terms(
    plan: Plan, p: Pass, lse: Tensor, pos_sum: Tensor, pos_weight: Tensor, kappa, bias, pos_scale
) -> tuple[Tensor, Tensor]:
    """(ℓ_a with 0 for uncounted anchors, counted_a as 0/1) from merged statistics; ``pos_scale`` weighs
    the positive term (DCLW; 1.0 otherwise)."""
    if plan.epilogue == "sigmoid":
        b = 0.0 if bias is None else bias
        return lse - pos_sum - b * pos_weight, torch.ones_like(lse)
    if p.positives == "none":  # a negatives-only pass (DCL's same-view term): ℓ_a = κ·lse_a
        return kappa * lse, torch.ones_like(lse)
    has_positive = pos_weight > 0
    terms = torch.where(
        has_positive, kappa * (lse - pos_scale * pos_sum / torch.where(has_positive, pos_weight, 1.0)), 0.0
    )
    counted = torch.ones_like(lse) if plan.missing == "zero" else has_positive.to(lse.dtype)
    return terms, counted


def _forward(
    parts,
    labels,
    mask,
    tau,
    bias,
    anchor_weight,
    plan_str,
    part_sizes,
    sub_dim,
    normalize,
    mode,
    backend,
    reduction,
    equal=False,
):
    """The loss and what the backward needs; the last output holds every rank's part sizes on the host
    when they had to be exchanged (uneven batches), else it is empty."""
    plan = _decode(plan_str)
    like = parts[0]
    sizes, host_sizes = _distributed.rank_part_sizes(list(part_sizes), like.device, mode, equal)
    run = _Run(parts, labels, mask, tau, bias, plan, sizes, sub_dim, normalize, mode, backend)
    spans = run.anchor_spans()
    acc = tau.dtype
    merged = [
        [
            like.new_full((s1 - s0,), float("-inf") if plan.epilogue == "softmax" else 0.0, dtype=acc),
            like.new_zeros((s1 - s0,), dtype=acc),
            like.new_zeros((s1 - s0,), dtype=acc),
        ]
        for s0, s1 in spans
    ]
    for _, key_parts, key_inv, sweeps in run.blocks():
        for sweep in sweeps:
            lse, pos_sum, pos_weight = run.primitive(run.forward_fn, sweep, key_parts, key_inv)
            m = merged[sweep.index]
            at = slice(sweep.anchors[0] - spans[sweep.index][0], sweep.anchors[1] - spans[sweep.index][0])
            m[0][at] = torch.logaddexp(m[0][at], lse) if plan.epilogue == "softmax" else m[0][at] + lse
            m[1][at] += pos_sum
            m[2][at] += pos_weight
    kappa = tau / plan.base_temperature if plan.base_temperature is not None else 1.0
    sums, counts, all_terms = [], [], []
    for p, (s0, s1), (lse, pos_sum, pos_weight) in zip(plan.passes, spans, merged):
        terms, counted = _anchor_terms(plan, p, lse, pos_sum, pos_weight, kappa, run.bias, run.positive_scale(s0, s1))
        offset = sum(t.numel() for t in all_terms)
        weighted = terms if anchor_weight is None else terms * anchor_weight[offset : offset + terms.numel()]
        sums.append(weighted.sum())
        counts.append(counted.sum())
        all_terms.append(terms)
    totals = torch.stack(sums + counts)
    if mode != "local":
        dist.all_reduce(totals)
    n_passes = len(plan.passes)
    global_counts = totals[n_passes:].clamp(min=1)
    loss = (_pass_coefficients(plan, global_counts, reduction) * totals[:n_passes]).sum()
    lse_all = torch.cat([m[0] for m in merged])
    weight_all = torch.cat([m[2] for m in merged])
    return loss, lse_all, weight_all, global_counts, torch.cat(all_terms), host_sizes


def _pass_coefficients(plan: Plan, counts: Tensor, reduction: str) -> Tensor:
    """dL/d(Σ_{a in pass p} w_a·ℓ_a) per pass: weight_p / #counted_p for "mean", 1 for "sum" ("none"
    returns the ℓ_a, and L is computed as "mean")."""
    if reduction == "sum":
        return torch.ones_like(counts)
    # Filled on the device: a tensor built from a Python list per call is a blocking host-to-device copy.
    weights = torch.stack([counts.new_full((), p.weight) for p in plan.passes])
    return weights / counts


def _backward(
    grad,
    grad_terms,
    parts,
    labels,
    mask,
    tau,
    bias,
    anchor_weight,
    lse_all,
    weight_all,
    counts,
    terms_all,
    host_sizes,
    plan_str,
    part_sizes,
    sub_dim,
    normalize,
    mode,
    backend,
    reduction,
    equal=False,
):
    plan = _decode(plan_str)
    sizes = _distributed.saved_part_sizes(list(part_sizes), host_sizes, mode, equal)
    run = _Run(parts, labels, mask, tau, bias, plan, sizes, sub_dim, normalize, mode, backend)
    acc = tau.dtype
    # The upstream gradient of every ℓ_a (before κ): from L (times W, see the gradient contract) and from
    # the per-anchor output. d_weight_a = dL/dw_a.
    per_pass = grad.to(acc) * run.world * _pass_coefficients(plan, counts, reduction)
    spans = run.anchor_spans()
    from_loss = torch.cat([per_pass[i].expand(s1 - s0) for i, (s0, s1) in enumerate(spans)])
    d_weight = from_loss * terms_all if anchor_weight is not None else terms_all.new_zeros(0)
    upstream = from_loss if anchor_weight is None else from_loss * anchor_weight
    if grad_terms is not None:
        upstream = upstream + grad_terms.to(acc)
    kappa = tau / plan.base_temperature if plan.base_temperature is not None else 1.0
    alphas, betas, lses, offset = [], [], [], 0
    for i, (s0, s1) in enumerate(spans):
        lse, pos_weight = lse_all[offset : offset + s1 - s0], weight_all[offset : offset + s1 - s0]
        coefficient = upstream[offset : offset + s1 - s0]
        offset += s1 - s0
        if plan.epilogue == "sigmoid":
            alpha = coefficient
            beta = alpha
        elif plan.passes[i].positives == "none":
            alpha = coefficient * kappa
            beta = torch.zeros_like(lse)
        else:
            has_positive = pos_weight > 0
            alpha = torch.where(has_positive, coefficient * kappa, 0.0)
            beta = alpha * run.positive_scale(s0, s1) / torch.where(has_positive, pos_weight, 1.0)
        alphas.append(alpha)
        betas.append(beta)
        lses.append(lse)
    like = parts[0]
    d_parts = [like.new_zeros((part.shape[0], sub_dim), dtype=acc) for part in parts]
    gs = like.new_zeros((2,), dtype=acc)  # Σ G·s and, for the sigmoid epilogue, Σ G
    for owner, key_parts, key_inv, sweeps in run.blocks():
        d_block = like.new_zeros((sum(sizes[owner]), sub_dim), dtype=acc)
        for sweep in sweeps:
            i = sweep.index
            at = slice(sweep.anchors[0] - spans[i][0], sweep.anchors[1] - spans[i][0])
            d_a, d_k, block_gs = run.primitive(
                run.backward_fn, sweep, key_parts, key_inv, lses[i][at], alphas[i][at], betas[i][at]
            )
            d_parts[sweep.anchor_part] += d_a
            if d_k is not None:  # None: an own block, whose d_a is the rows' whole gradient
                d_block[sweep.keys[0] : sweep.keys[1]] += d_k
            gs[: block_gs.numel()] += block_gs.reshape(-1)
        run.exchange.push_key_grad(owner, d_block)
    for d_part, key_grad in zip(d_parts, run.exchange.collect_key_grad().split(sizes[run.rank])):
        d_part += key_grad
    d_tau = -gs[0] / tau
    if plan.base_temperature is not None:
        d_tau = d_tau + (upstream * terms_all).sum() / tau  # ℓ_a = (τ/τ_b)·F_a(S): the prefactor's share
    d_bias = gs[1] if plan.epilogue == "sigmoid" else torch.zeros_like(gs[1])
    return [_full_width(d_part, part) for d_part, part in zip(d_parts, parts)], d_tau, d_bias, d_weight


def _full_width(d_prefix: Tensor, part: Tensor) -> Tensor:
    """A part's gradient, shaped and typed like the part: ``d_prefix`` on the first features, exactly zero
    after them."""
    if d_prefix.shape[1] == part.shape[1]:
        return d_prefix.to(part.dtype)
    grad = part.new_zeros(part.shape)
    grad[:, : d_prefix.shape[1]] = d_prefix
    return grad


# --- the custom ops ---------------------------------------------------------------------------------------


@torch.library.custom_op("fastcl::block_loss", mutates_args=())
def _block_loss_op(
    parts: list[Tensor],
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    tau: Tensor,
    bias: Optional[Tensor],
    anchor_weight: Optional[Tensor],
    plan: str,
    part_sizes: list[int],
    sub_dim: int,
    normalize: bool,
    mode: str,
    backend: str,
    reduction: str,
    equal_batches: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, merged per-anchor statistic, pos_weight, counted anchors per pass, ℓ per anchor, every
    rank's part sizes on the host or an empty host tensor)."""
    options = (plan, part_sizes, sub_dim, normalize, mode, backend, reduction, equal_batches)
    with torch.autocast(parts[0].device.type, enabled=False):
        return _forward(parts, labels, mask, tau, bias, anchor_weight, *options)


def _anchor_count(plan: str, part_sizes: list[int]) -> int:
    return sum(stop - start for start, stop in (_rows_of(part_sizes, p.anchors) for p in _decode(plan).passes))


@_block_loss_op.register_fake
def _(parts, labels, mask, tau, bias, anchor_weight, plan, part_sizes, sub_dim, normalize, mode, backend, *rest):
    anchors = _anchor_count(plan, part_sizes)
    acc = tau.dtype
    like = parts[0]
    return (
        like.new_empty((), dtype=acc),
        like.new_empty((anchors,), dtype=acc),
        like.new_empty((anchors,), dtype=acc),
        like.new_empty((len(_decode(plan).passes),), dtype=acc),
        like.new_empty((anchors,), dtype=acc),
        _distributed.host_sizes_like(len(part_sizes), mode, rest[-1]),
    )


@torch.library.custom_op("fastcl::block_loss_backward", mutates_args=())
def _block_loss_backward_op(
    grad: Tensor,
    grad_terms: Optional[Tensor],
    parts: list[Tensor],
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    tau: Tensor,
    bias: Optional[Tensor],
    anchor_weight: Optional[Tensor],
    lse: Tensor,
    pos_weight: Tensor,
    counts: Tensor,
    terms: Tensor,
    host_sizes: Tensor,
    plan: str,
    part_sizes: list[int],
    sub_dim: int,
    normalize: bool,
    mode: str,
    backend: str,
    reduction: str,
    equal_batches: bool,
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Returns (the parts' gradients, dL/dτ, dL/db, dL/dw per anchor or [0] without weights)."""
    inputs = (grad, grad_terms, parts, labels, mask, tau, bias, anchor_weight, lse, pos_weight, counts, terms)
    options = (plan, part_sizes, sub_dim, normalize, mode, backend, reduction, equal_batches)
    with torch.autocast(parts[0].device.type, enabled=False):
        return _backward(*inputs, host_sizes, *options)


@_block_loss_backward_op.register_fake
def _(
    grad,
    grad_terms,
    parts,
    labels,
    mask,
    tau,
    bias,
    anchor_weight,
    lse,
    pos_weight,
    counts,
    terms,
    host_sizes,
    *options,
):
    weights = terms.numel() if anchor_weight is not None else 0
    d_parts = [torch.empty_like(part) for part in parts]
    return d_parts, tau.new_empty(()), tau.new_empty(()), terms.new_empty((weights,))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the auxiliary outputs never get a gradient: no zero tensors for them
    parts, labels, mask, tau, bias, anchor_weight, *options = inputs
    ctx.options = tuple(options)
    ctx.n_parts = len(parts)
    ctx.save_for_backward(*parts, labels, mask, tau, bias, anchor_weight, *output[1:])


def _op_backward(ctx, grad_loss, _grad_lse, _grad_pos_weight, _grad_counts, grad_terms, _grad_host_sizes):
    if grad_loss is None and grad_terms is None:  # only auxiliary outputs got a gradient: all zero
        return ([None] * ctx.n_parts, *(None,) * (len(ctx.needs_input_grad) - 1))
    saved = ctx.saved_tensors
    parts = list(saved[: ctx.n_parts])
    labels, mask, tau, bias, anchor_weight, lse, pos_weight, counts, terms, host_sizes = saved[ctx.n_parts :]
    if grad_loss is None:  # reduction "none": only the per-anchor losses are used
        grad_loss = tau.new_zeros(())
    d_parts, d_tau, d_bias, d_weight = _block_loss_backward_op(
        grad_loss,
        grad_terms,
        parts,
        labels,
        mask,
        tau,
        bias,
        anchor_weight,
        lse,
        pos_weight,
        counts,
        terms,
        host_sizes,
        *ctx.options,
    )
    return (
        d_parts,
        None,
        None,
        d_tau.to(tau.dtype) if ctx.needs_input_grad[3] else None,
        d_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[4] else None,
        d_weight if anchor_weight is not None and ctx.needs_input_grad[5] else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("fastcl::block_loss", _op_backward, setup_context=_setup)


def block_loss(
    rows: Union[Tensor, Sequence[Tensor]],
    plan: Plan | str,
    part_sizes: list[int],
    tau: Tensor,
    *,
    sub_dim: Optional[int] = None,
    labels: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    anchor_weight: Optional[Tensor] = None,
    normalize: bool = True,
    mode: str = "local",
    backend: str = "torch",
    reduction: str = "mean",
) -> Tensor:
    """The loss of ``plan`` over this rank's parts, its anchors against every block.

    Args:
        rows: this rank's parts, a sequence of [part_sizes[i], D] tensors (any strides: z1 and z2, or
            SupCon's views ``features[:, v]``), or one [R, D] tensor holding them one after the other.
            Nothing is copied: the primitive reads the first ``sub_dim`` features of each part in place.
        plan: the loss's passes, a :class:`Plan` or its :meth:`Plan.encode` string (what a function
            traced by torch.compile passes: build it in a ``torch.compiler.assume_constant_result``
            function).
        part_sizes: rows per part on this rank.
        tau: 0-dim temperature in the accumulation dtype.
        sub_dim: the number of leading features the loss uses (None: all D); the gradient is exactly
            zero after them.
        labels: per-sample labels (``plan.labels`` "given") or per-anchor global key indices ("targets").
        mask: [N, N] floating positive weights (passes with positives="mask"; single process).
        bias: 0-dim logit bias of the sigmoid epilogue.
        anchor_weight: [anchors] per-anchor weights w_a (the passes' anchors in order; dL/dw when it
            requires grad), or None for w = 1.
        normalize: L2-normalize the rows (fused into the primitive through inverse norms).
        mode: "local", "gather" or "ring" (already resolved).
        backend: a concrete backend that exposes the block primitive.
        reduction: "mean", "sum" (of w_a·ℓ_a; the global one on every rank under gather/ring) or "none".

    Returns:
        The 0-dim loss in the accumulation dtype (the global loss on every rank), or for "none" this
        rank's per-anchor ℓ_a (the passes' anchors in order, 0 for anchors without a positive).

    Example:
        >>> z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
        >>> plan = Plan(passes=(Pass((0, 2), (0, 2), "pairs", exclude_self=True),))
        >>> float(block_loss([z1, z2], plan, [3, 3], torch.tensor(0.5), sub_dim=2)) > 0
        True
    """
    parts = list(rows.split(list(part_sizes))) if isinstance(rows, Tensor) else list(rows)
    acc = accumulation_dtype(parts[0].dtype)
    if bias is not None:
        bias = bias.to(acc)
    if anchor_weight is not None:
        anchor_weight = anchor_weight.to(acc)
    encoded = plan.encode() if isinstance(plan, Plan) else plan
    outputs = _block_loss_op(
        parts,
        labels,
        mask,
        tau.to(acc),
        bias,
        anchor_weight,
        encoded,
        list(part_sizes),
        parts[0].shape[1] if sub_dim is None else sub_dim,
        normalize,
        mode,
        backend,
        reduction,
        mode != "local" and _distributed.equal_batches(),
    )
    return outputs[4] if reduction == "none" else outputs[0]
