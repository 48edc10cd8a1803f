"""Global-batch contrastive losses across the ranks of a torch.distributed process group.

``distributed`` on every loss picks how negatives span the ranks:

* ``"auto"`` (the default): ``"gather"`` whenever a process group with world size > 1 is initialized,
  else ``"local"``. Under DDP the negatives therefore span the GLOBAL batch unless you say
  ``distributed="local"``.
* ``"local"``: each rank's loss sees only its own rows (what a plain single-GPU loss does under DDP).
* ``"gather"``: every rank all-gathers the rows of all ranks once, computes its own anchors against all
  global keys, and one reduce-scatter returns each rank the gradient of its rows. Per-rank memory grows
  with the global batch (M·D).
* ``"ring"``: key blocks rotate around the ranks with ``batch_isend_irecv`` while every rank merges its
  anchors' log-sum-exps online; the backward rotates the blocks again and passes the key gradients
  along the ring with them, so a rank only ever holds its own rows and one block in flight.

Contract (tested with gloo in ``tests/test_distributed.py``): with W ranks each holding N_r rows, when
every rank backpropagates the returned loss and gradients are averaged across ranks as DDP does, the
parameter gradients (temperature included) equal single-process training on the rank-major concatenated
batch, and every rank reports the global loss. Local batch sizes may differ between ranks.

How the gradient is split: rank r's anchors contribute L_r with Σ_r L_r = L. The op returns L (for
reporting) and backpropagates W·(upstream gradient)·L_r, whose key part reaches the owning ranks, so
DDP's 1/W average gives exactly dL/dθ. Each rank's upstream gradient weights the anchors it holds.

The loss math is the chunked PyTorch of :mod:`fastcl.torch_backend` (``logits``, ``blocks``,
``mask_self``) on the rows' device, CPU or CUDA: the fused Triton kernels serve ``distributed="local"``
only (a rectangular anchors × key-block kernel is future work), so ``backend`` does not apply here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastcl.torch_backend._tiles import blocks, chunk_rows, logits, mask_self, upcast

MODES = ("auto", "local", "gather", "ring")

# Tags keep gloo's point-to-point streams apart (NCCL ignores them and relies on the matching order).
_ROWS_TAG, _LABELS_TAG, _GRAD_TAG = 0, 1, 2


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_mode(distributed: str) -> str:
    """"local", "gather" or "ring" for this call."""
    if distributed not in MODES:
        raise ValueError(f"distributed: expected one of {list(MODES)}, got {distributed!r}")
    if distributed == "auto":
        return "gather" if world_size() > 1 else "local"
    if distributed != "local" and world_size() == 1:
        return "local"
    return distributed


def local_sizes(n_local: int, device: torch.device) -> list[int]:
    """Every rank's local batch size, in rank order (one small all_gather)."""
    mine = torch.tensor([n_local], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(every, mine)
    return [int(n) for n in every]


# --- which rows are anchors and keys ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Pass:
    """One anchor-vs-key sweep. Rows are stacked in ``parts`` parts of n rows (views); ``anchors`` and
    ``keys`` are [first, last) part ranges, of the local rows and of every block respectively."""

    anchors: tuple[int, int]
    keys: tuple[int, int]
    exclude_self: bool
    weight: float


@dataclass(frozen=True)
class _Layout:
    parts: int
    passes: tuple[_Pass, ...]
    base_temperature: Optional[float] = None  # SupCon's τ/τ_b prefactor; None for the other losses


def _part_rows(rows: Tensor, labels: Tensor, span: tuple[int, int]) -> tuple[Tensor, Tensor]:
    n = labels.shape[0]
    return rows[span[0] * n : span[1] * n], labels.repeat(span[1] - span[0])


def _tile(scaled_anchors: Tensor, anchor_labels: Tensor, keys: Tensor, key_labels: Tensor, self_offset):
    """Logits of an anchor chunk (rows already divided by τ) against a key block, and which entries are
    positives."""
    s = logits(scaled_anchors, keys)
    positives = anchor_labels[:, None] == key_labels[None, :]
    if self_offset is not None:
        mask_self(s, self_offset)
        positives.diagonal(offset=self_offset).fill_(False)
    return s, positives


# torch 2.13 renamed reduce_scatter_tensor (now deprecated) to reduce_scatter_single.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- how blocks reach a rank -----------------------------------------------------------------------------

Block = tuple[int, Tensor, Tensor]  # (owner rank, rows [parts·n_owner, D'], labels [n_owner])


class _Gather:
    """All ranks' rows at once (all_gather, padded to the largest rank); key gradients go back to their
    owners with one reduce_scatter."""

    def __init__(self, rows: Tensor, labels: Tensor, sizes: list[int], parts: int):
        self.sizes, self.parts, self.rank = sizes, parts, dist.get_rank()
        n_max, world = max(sizes), len(sizes)
        padded_rows = rows.new_zeros((parts * n_max, rows.shape[1]))
        padded_rows[: rows.shape[0]] = rows
        padded_labels = labels.new_zeros((n_max,))
        padded_labels[: labels.shape[0]] = labels
        self.rows = rows.new_empty((world, parts * n_max, rows.shape[1]))
        self.labels = labels.new_empty((world, n_max))
        dist.all_gather(list(self.rows.unbind(0)), padded_rows)
        dist.all_gather(list(self.labels.unbind(0)), padded_labels)
        self.key_grads: Optional[Tensor] = None

    def blocks(self) -> Iterator[Block]:
        for owner, n in enumerate(self.sizes):
            yield owner, self.rows[owner, : self.parts * n], self.labels[owner, :n]

    def push_key_grad(self, owner: int, grad: Tensor) -> None:
        if self.key_grads is None:
            self.key_grads = grad.new_zeros(self.rows.shape)
        self.key_grads[owner, : grad.shape[0]] = grad

    def collect_key_grad(self) -> Tensor:
        world, rows_max, dim = self.key_grads.shape
        mine = self.key_grads.new_empty((rows_max, dim))
        _reduce_scatter(mine, self.key_grads.view(world * rows_max, dim))
        return mine[: self.parts * self.sizes[self.rank]]


class _Ring:
    """Blocks rotate to rank r+1 each step (the next block is received while this one is used); in the
    backward each block's key gradient travels with it and reaches its owner after the last step."""

    def __init__(self, rows: Tensor, labels: Tensor, sizes: list[int], parts: int):
        self.rows, self.labels, self.sizes, self.parts = rows, labels, sizes, parts
        self.rank, self.world = dist.get_rank(), len(sizes)
        self.next, self.prev = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        self.grad_in_flight: Optional[tuple[list, Tensor, Tensor]] = None

    def _exchange(self, send: list[tuple[Tensor, int]], receive: list[tuple[Tensor, int]]) -> list:
        ops = [dist.P2POp(dist.isend, t, self.next, tag=tag) for t, tag in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, tag=tag) for t, tag in receive]
        return dist.batch_isend_irecv(ops)

    def blocks(self) -> Iterator[Block]:
        rows, labels = self.rows, self.labels
        for step in range(self.world):
            owner = (self.rank - step) % self.world
            requests = []
            if step < self.world - 1:
                n_next = self.sizes[(owner - 1) % self.world]
                next_rows = rows.new_empty((self.parts * n_next, rows.shape[1]))
                next_labels = labels.new_empty((n_next,))
                requests = self._exchange(
                    [(rows, _ROWS_TAG), (labels, _LABELS_TAG)], [(next_rows, _ROWS_TAG), (next_labels, _LABELS_TAG)]
                )
            yield owner, rows, labels
            for request in requests:
                request.wait()
            if requests:
                rows, labels = next_rows, next_labels

    def push_key_grad(self, owner: int, grad: Tensor) -> None:
        """Adds the partial key gradient that arrived with this block, passes the sum on, and starts
        receiving the partial sum of the block this rank holds next (after the last step: its own)."""
        if self.grad_in_flight is not None:
            grad = grad + self._wait_for_grad()
        incoming = grad.new_empty((self.parts * self.sizes[(owner - 1) % self.world], grad.shape[1]))
        # The sent buffer stays referenced until its request has been waited on.
        self.grad_in_flight = (self._exchange([(grad, _GRAD_TAG)], [(incoming, _GRAD_TAG)]), grad, incoming)

    def _wait_for_grad(self) -> Tensor:
        requests, _sent, incoming = self.grad_in_flight
        for request in requests:
            request.wait()
        self.grad_in_flight = None
        return incoming

    def collect_key_grad(self) -> Tensor:
        return self._wait_for_grad()


_EXCHANGES = {"gather": _Gather, "ring": _Ring}


# --- the op ---------------------------------------------------------------------------------------------

class _GlobalLoss(torch.autograd.Function):
    """L over the global batch from this rank's anchors; see the module docstring for the gradient.

    Both passes run with autocast off: the logits and reductions stay in the accumulation dtype.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, labels: Tensor, tau: Tensor, layout: _Layout, mode: str, sizes: list[int]):
        with torch.autocast(rows.device.type, enabled=False):
            return _GlobalLoss._forward(ctx, rows, labels, tau, layout, mode, sizes)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        with torch.autocast(grad_loss.device.type, enabled=False):
            return _GlobalLoss._backward(ctx, grad_loss)

    @staticmethod
    def _forward(ctx, rows: Tensor, labels: Tensor, tau: Tensor, layout: _Layout, mode: str, sizes: list[int]):
        exchange = _EXCHANGES[mode](rows, labels, sizes, layout.parts)
        local = upcast(rows)
        scaled = local / tau
        lse, positive_sum, positive_count = [], [], []
        for p in layout.passes:
            n_anchors = (p.anchors[1] - p.anchors[0]) * labels.shape[0]
            lse.append(local.new_full((n_anchors,), float("-inf")))
            positive_sum.append(local.new_zeros(n_anchors))
            positive_count.append(local.new_zeros(n_anchors))
        for owner, block_rows, block_labels in exchange.blocks():
            own = owner == dist.get_rank()
            block = upcast(block_rows)
            for i, p in enumerate(layout.passes):
                anchors, anchor_labels = _part_rows(scaled, labels, p.anchors)
                keys, key_labels = _part_rows(block, block_labels, p.keys)
                diagonal = (p.anchors[0] - p.keys[0]) * labels.shape[0] if own and p.exclude_self else None
                for start, stop in blocks(anchors.shape[0], keys.shape[0]):
                    s, positives = _tile(
                        anchors[start:stop], anchor_labels[start:stop], keys, key_labels,
                        None if diagonal is None else diagonal + start,
                    )
                    lse[i][start:stop] = torch.logaddexp(lse[i][start:stop], torch.logsumexp(s, dim=1))
                    positive_sum[i][start:stop] += s.masked_fill(~positives, 0.0).sum(dim=1)
                    positive_count[i][start:stop] += positives.sum(dim=1)

        kappa = tau / layout.base_temperature if layout.base_temperature is not None else 1.0
        terms = [kappa * (l - ps / pc.clamp(min=1)) for l, ps, pc in zip(lse, positive_sum, positive_count)]
        valid = [pc > 0 for pc in positive_count]
        totals = torch.stack(
            [torch.where(v, t, 0.0).sum() for t, v in zip(terms, valid)] + [v.sum().to(local.dtype) for v in valid]
        )
        local_totals = totals.clone()
        dist.all_reduce(totals)
        n_passes = len(layout.passes)
        counts = totals[n_passes:].clamp(min=1)
        weights = torch.tensor([p.weight for p in layout.passes], dtype=local.dtype, device=local.device)
        loss = (weights * totals[:n_passes] / counts).sum()
        own_share = (weights * local_totals[:n_passes] / counts).sum()

        ctx.layout, ctx.exchange = layout, exchange
        ctx.save_for_backward(rows, labels, tau, counts, own_share, *lse, *positive_count)
        return loss

    @staticmethod
    def _backward(ctx, grad_loss: Tensor):
        rows, labels, tau, counts, own_share, *per_pass = ctx.saved_tensors
        layout, exchange = ctx.layout, ctx.exchange
        n_passes = len(layout.passes)
        lse, positive_count = per_pass[:n_passes], per_pass[n_passes:]
        local = upcast(rows)
        scaled = local / tau
        scale = grad_loss.to(local.dtype) * world_size()
        kappa = tau / layout.base_temperature if layout.base_temperature is not None else 1.0

        # G_ac = w_a · (softmax_a(c) − 1[c ∈ P(a)]/|P(a)|); w_a folds in 1/τ so that dA = G·K, dK = Gᵀ·A.
        anchor_weight, inverse_count, finite_lse = [], [], []
        for i, p in enumerate(layout.passes):
            valid = positive_count[i] > 0
            anchor_weight.append(valid.to(local.dtype) * (scale * p.weight * kappa / (counts[i] * tau)))
            inverse_count.append(1.0 / positive_count[i].clamp(min=1))
            finite_lse.append(torch.where(valid, lse[i], torch.full_like(lse[i], float("inf"))))

        d_local = torch.zeros_like(local)
        similarity_sum = local.new_zeros(())  # Σ G_ac s_ac = Σ_a ⟨A_a, dA_a⟩, for dL/dτ
        for owner, block_rows, block_labels in exchange.blocks():
            own = owner == dist.get_rank()
            block = upcast(block_rows)
            d_block = torch.zeros_like(block)
            for i, p in enumerate(layout.passes):
                anchors, anchor_labels = _part_rows(local, labels, p.anchors)
                scaled_anchors, _ = _part_rows(scaled, labels, p.anchors)
                keys, key_labels = _part_rows(block, block_labels, p.keys)
                d_anchors, _ = _part_rows(d_local, labels, p.anchors)
                d_keys, _ = _part_rows(d_block, block_labels, p.keys)
                diagonal = (p.anchors[0] - p.keys[0]) * labels.shape[0] if own and p.exclude_self else None
                for start, stop in blocks(anchors.shape[0], keys.shape[0]):
                    chunk = slice(start, stop)
                    s, positives = _tile(
                        scaled_anchors[chunk], anchor_labels[chunk], keys, key_labels,
                        None if diagonal is None else diagonal + start,
                    )
                    g = torch.exp(s - finite_lse[i][chunk, None]) - positives * inverse_count[i][chunk, None]
                    g *= anchor_weight[i][chunk, None]
                    d_chunk = g @ keys
                    d_anchors[chunk] += d_chunk
                    d_keys += g.T @ anchors[chunk]
                    similarity_sum += (d_chunk * anchors[chunk]).sum()
            exchange.push_key_grad(owner, d_block)
        d_local += exchange.collect_key_grad()

        d_tau = None
        if ctx.needs_input_grad[2]:
            d_tau = -similarity_sum / tau
            if layout.base_temperature is not None:
                d_tau = d_tau + scale * own_share / tau  # L = (τ/τ_b)·F(S): the prefactor's share
            d_tau = d_tau.to(tau.dtype)
        return d_local.to(rows.dtype), None, d_tau, None, None, None


def _sample_labels(n: int, sizes: list[int], device: torch.device) -> Tensor:
    """Global sample index of each local sample (rank-major concatenation)."""
    return torch.arange(n, device=device) + sum(sizes[: dist.get_rank()])


def nt_xent(p1: Tensor, p2: Tensor, tau: Tensor, *, mode: str) -> Tensor:
    """NT-Xent over the global batch [z1 of all ranks; z2 of all ranks] from prepared local rows."""
    n = p1.shape[0]
    sizes = local_sizes(n, p1.device)
    layout = _Layout(parts=2, passes=(_Pass((0, 2), (0, 2), exclude_self=True, weight=1.0),))
    return _GlobalLoss.apply(torch.cat([p1, p2]), _sample_labels(n, sizes, p1.device), tau, layout, mode, sizes)


def info_nce(pq: Tensor, pk: Tensor, tau: Tensor, *, symmetric: bool, mode: str) -> Tensor:
    """Cross-view InfoNCE: local q rows against the global k rows (and k against q when symmetric)."""
    n = pq.shape[0]
    sizes = local_sizes(n, pq.device)
    if symmetric:
        passes = (_Pass((0, 1), (1, 2), False, 0.5), _Pass((1, 2), (0, 1), False, 0.5))
    else:
        passes = (_Pass((0, 1), (1, 2), False, 1.0),)
    layout = _Layout(parts=2, passes=passes)
    return _GlobalLoss.apply(torch.cat([pq, pk]), _sample_labels(n, sizes, pq.device), tau, layout, mode, sizes)


def supcon(
    z: Tensor,
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    tau: Tensor,
    *,
    base_temperature: float,
    n_anchors: int,
    views: int,
    mode: str,
) -> Tensor:
    """SupCon L_out over the global batch; z is view-major [V·N_local, D'], labels [N_local] class ids
    that mean the same class on every rank, or None: every global sample its own class."""
    if mask is not None:
        raise ValueError(
            f"mask: a per-rank [N, N] mask cannot say which rows on other ranks are positives, so it is "
            f"only supported with distributed='local' (got distributed={mode!r}); pass global class ids "
            f"as labels instead, or distributed='local'"
        )
    n = z.shape[0] // views
    sizes = local_sizes(n, z.device)
    if labels is None:
        labels = _sample_labels(n, sizes, z.device)
    anchors = (0, 1) if n_anchors == n else (0, views)
    layout = _Layout(
        parts=views, passes=(_Pass(anchors, (0, views), exclude_self=True, weight=1.0),),
        base_temperature=base_temperature,
    )
    return _GlobalLoss.apply(z.contiguous(), labels.to(torch.int64).contiguous(), tau, layout, mode, sizes)


# --- cost model (docs/distributed.md) --------------------------------------------------------------------

def scaling_model(
    global_rows: int, world: int, dim: int, *, parts: int = 2, element_bytes: int = 2, grad_bytes: int = 4
) -> dict[str, dict[str, int]]:
    """Per-rank cost of one loss step (forward + backward) of this module's "gather" and "ring".

    ``global_rows`` M embedding rows of width ``dim`` (all views: M = parts·N_global) split evenly over
    ``world`` ranks (R = M/W rows each, n = R/parts samples); rows travel in ``element_bytes`` (2 for
    bf16/fp16), key gradients and reductions in ``grad_bytes`` (fp32), labels as int64. Counts what this
    implementation allocates and sends; it leaves out the O(R) per-anchor statistics, allocator slack,
    and the collectives' internal algorithm (a ring all-gather / reduce-scatter moves the same bytes).

    * ``held_bytes``: embedding-sized buffers alive at the peak (the backward).
    * ``tile_bytes``: the largest similarity tile (``chunk_rows(R)`` anchors × R keys, fp32); the backward
      keeps about four tile-sized temporaries alive.
    * ``sent_bytes``: bytes this rank sends (point-to-point for the ring, its share of the all-gather and
      reduce-scatter for gather).
    * ``gemm_flops``: 4 GEMM-units of R anchors × M keys (forward S, recomputed S, dA, dK).

    Example:
        >>> cost = scaling_model(global_rows=1 << 20, world=8, dim=128)
        >>> cost["ring"]["held_bytes"] < cost["gather"]["held_bytes"]
        True
    """
    rows = global_rows // world
    samples = rows // parts
    row_block = rows * dim * element_bytes + samples * 8
    tile = chunk_rows(rows) * rows * 4
    flops = 4 * 2 * rows * global_rows * dim
    return {
        "gather": {
            # gathered rows + their key gradients + this rank's row gradient and its reduce-scatter share
            "held_bytes": global_rows * dim * (element_bytes + grad_bytes) + 2 * rows * dim * grad_bytes,
            "tile_bytes": tile,
            "sent_bytes": (world - 1) * row_block + (world - 1) * rows * dim * grad_bytes,
            "gemm_flops": flops,
        },
        "ring": {
            # own rows + the block in flight; row gradient, block gradient, partial sum sent and received
            "held_bytes": 2 * rows * dim * element_bytes + 4 * rows * dim * grad_bytes,
            "tile_bytes": tile,
            "sent_bytes": 2 * (world - 1) * row_block + world * rows * dim * grad_bytes,
            "gemm_flops": flops,
        },
    }
