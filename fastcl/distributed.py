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
batch, and every rank reports the global loss. Local batch sizes may differ between ranks: the forward
then exchanges them once per step (the step's only host sync); :func:`set_equal_batches` declares them
equal and removes the exchange.

How the gradient is split: rank r's anchors contribute L_r with Σ_r L_r = L. The op returns L (for
reporting) and backpropagates W·(upstream gradient)·L_r, whose key part reaches the owning ranks, so
DDP's 1/W average gives exactly dL/dθ. Each rank's upstream gradient weights the anchors it holds.

This module is the communication layer: the modes, and the exchanges that bring key blocks to a rank
(:class:`Local`, :class:`Gather`, :class:`Ring`). The loss math runs in :mod:`fastcl.engine` as blocks
of the block primitive of the backend that ``backend=`` / :mod:`fastcl.dispatch` chose, in every mode.
"""

from __future__ import annotations

import warnings
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from fastcl import dispatch

MODES = ("auto", "local", "gather", "ring")

# Tags keep gloo's point-to-point streams apart (NCCL ignores them and relies on the matching order).
_ROWS_TAG, _LABELS_TAG, _GRAD_TAG = 0, 1, 2


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_mode(distributed: str) -> str:
    """ "local", "gather" or "ring" for this call. An explicit "gather" or "ring" without an initialized
    process group runs locally and warns, once per mode and process (not while torch.compile traces)."""
    if distributed not in MODES:
        raise ValueError(f"distributed: expected one of {list(MODES)}, got {distributed!r}")
    if distributed == "auto":
        return "gather" if world_size() > 1 else "local"
    if distributed != "local" and world_size() == 1:
        if not (dist.is_available() and dist.is_initialized()):
            _warn_no_process_group(distributed)
        return "local"
    return distributed


_WARNED_NO_GROUP: set = set()


def _warn_no_process_group(mode: str) -> None:
    if mode in _WARNED_NO_GROUP or torch.compiler.is_compiling():
        return
    _WARNED_NO_GROUP.add(mode)
    warnings.warn(
        f"distributed={mode!r} was requested but no torch.distributed process group is initialized: the loss "
        "runs on this process's rows only (as distributed='local'). Initialize the process group first "
        "(torchrun, dist.init_process_group), or pass distributed='local' or 'auto' to say so.",
        UserWarning,
        stacklevel=4,
    )


# --- every rank's batch sizes ------------------------------------------------------------------------------

_equal_batches = False


def set_equal_batches(equal: bool = True) -> None:
    """Declares that every rank passes a batch of the same size (the same rows per part) to every loss call
    of this process in gather/ring mode, so no rank has to learn the others' sizes: no size exchange and
    no host sync. ``torch.utils.data.DistributedSampler`` gives exactly this: it pads every rank to the
    same number of samples, so each step's batch has the same size on every rank (the last one too).

    Without the declaration (the default), sizes may differ between ranks and the forward exchanges them
    once per step (one all_gather of a few int64 and one device-to-host copy); the backward reuses them.
    A declared but false promise is caught before any row is exchanged: a device-side assertion after one
    small all_reduce (an error on every rank rather than a hang).

    Example:
        >>> set_equal_batches(True)
        >>> equal_batches()
        True
        >>> set_equal_batches(False)
    """
    global _equal_batches
    if not isinstance(equal, bool):
        raise TypeError(f"equal: expected a bool, got {type(equal).__name__}")
    _equal_batches = equal


def equal_batches() -> bool:
    """Whether :func:`set_equal_batches` declared equal batch sizes on every rank."""
    return _equal_batches


def _device_ints(values: list[int], device: torch.device) -> Tensor:
    """An int64 vector on ``device`` made there (fills), not copied from a host list."""
    return torch.cat([torch.full((1,), v, dtype=torch.int64, device=device) for v in values])


def exchange_part_sizes(part_sizes: list[int], device: torch.device) -> Tensor:
    """Every rank's part sizes, [W, P] int64 on the host: one small all_gather and one device-to-host copy
    (the single host sync of an uneven-batch step)."""
    mine = _device_ints(part_sizes, device)
    every = mine.new_empty((world_size(), len(part_sizes)))
    dist.all_gather(list(every.unbind(0)), mine)
    return every.cpu()


def _check_equal(part_sizes: list[int], device: torch.device) -> None:
    """Raises (on the device, no host sync) unless every rank has ``part_sizes``."""
    bounds = _device_ints(part_sizes + [-s for s in part_sizes], device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)  # max(s) == s and max(−s) == −s: all equal
    parts = len(part_sizes)
    torch._assert_async(
        (bounds[:parts] == -bounds[parts:]).all(),
        f"fastcl.distributed.set_equal_batches(True) was declared, but the ranks' batch sizes differ "
        f"(this rank: {part_sizes})",
    )


def host_sizes_like(parts: int, mode: str, equal: bool) -> Tensor:
    """The host tensor :func:`rank_part_sizes` returns, empty (its shape; for a fake implementation)."""
    exchanged = mode != "local" and not equal
    return torch.empty((world_size(), parts) if exchanged else (0,), dtype=torch.int64)


def rank_part_sizes(part_sizes: list[int], device: torch.device, mode: str, equal: bool) -> tuple[list, Tensor]:
    """(every rank's part sizes in rank order, the host tensor the backward reads them from).

    Local: this process's. Declared equal (:func:`set_equal_batches`): this rank's, W times, checked on
    the device. Otherwise exchanged (:func:`exchange_part_sizes`) and returned on the host as well, so
    the backward reads them there instead of exchanging again (:func:`saved_part_sizes`)."""
    if mode == "local":
        return [part_sizes], host_sizes_like(len(part_sizes), mode, equal)
    if equal:
        _check_equal(part_sizes, device)
        return [part_sizes] * world_size(), host_sizes_like(len(part_sizes), mode, equal)
    host = exchange_part_sizes(part_sizes, device)
    return read_host_sizes(host), host


def saved_part_sizes(part_sizes: list[int], host_sizes: Tensor, mode: str, equal: bool) -> list[list[int]]:
    """The backward's every-rank part sizes: from the forward's host tensor, with no communication."""
    if mode == "local":
        return [part_sizes]
    if equal:
        return [part_sizes] * world_size()
    return read_host_sizes(host_sizes)


def read_host_sizes(host_sizes: Tensor) -> list[list[int]]:
    """The values of the host tensor :func:`exchange_part_sizes` made: a memory read that waits for nothing."""
    if host_sizes.device.type != "cpu":
        raise ValueError(f"host_sizes: expected a CPU tensor (reading a device tensor syncs), got {host_sizes.device}")
    return host_sizes.tolist()


# torch 2.13 renamed reduce_scatter_tensor (now deprecated) to reduce_scatter_single.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- how blocks reach a rank -----------------------------------------------------------------------------

Block = tuple[int, Tensor, Optional[Tensor]]  # (owner rank, rows [R_owner, D'], row labels [R_owner] or None)


class Local:
    """One process, one block: this rank's own rows (``distributed="local"`` through the block engine)."""

    def __init__(self, rows: Tensor, labels: Optional[Tensor], row_counts: list[int]):
        self.rows, self.labels, self.rank = rows, labels, 0
        self.key_grad: Optional[Tensor] = None

    def blocks(self) -> Iterator[Block]:
        yield 0, self.rows, self.labels

    def push_key_grad(self, owner: int, grad: Tensor) -> None:
        self.key_grad = grad

    def collect_key_grad(self) -> Tensor:
        return self.key_grad


class Gather:
    """All ranks' rows at once (all_gather, padded to the largest rank); key gradients go back to their
    owners with one reduce_scatter."""

    def __init__(self, rows: Tensor, labels: Optional[Tensor], row_counts: list[int]):
        self.row_counts, self.rank = row_counts, dist.get_rank()
        rows_max, world = max(row_counts), len(row_counts)
        self.rows = _all_gather_padded(rows, rows_max, world)
        self.labels = None if labels is None else _all_gather_padded(labels, rows_max, world)
        self.key_grads: Optional[Tensor] = None

    def blocks(self) -> Iterator[Block]:
        for owner, count in enumerate(self.row_counts):
            yield owner, self.rows[owner, :count], None if self.labels is None else self.labels[owner, :count]

    def push_key_grad(self, owner: int, grad: Tensor) -> None:
        if self.key_grads is None:
            self.key_grads = grad.new_zeros((*self.rows.shape[:2], grad.shape[1]))
        self.key_grads[owner, : grad.shape[0]] = grad

    def collect_key_grad(self) -> Tensor:
        world, rows_max, dim = self.key_grads.shape
        mine = self.key_grads.new_empty((rows_max, dim))
        _reduce_scatter(mine, self.key_grads.view(world * rows_max, dim))
        return mine[: self.row_counts[self.rank]]


def _all_gather_padded(x: Tensor, rows_max: int, world: int) -> Tensor:
    padded = x.new_zeros((rows_max, *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((world, *padded.shape))
    dist.all_gather(list(out.unbind(0)), padded)
    return out


class Ring:
    """Blocks rotate to rank r+1 each step (the next block is received while this one is used); in the
    backward each block's key gradient travels with it and reaches its owner after the last step."""

    def __init__(self, rows: Tensor, labels: Optional[Tensor], row_counts: list[int]):
        self.rows, self.labels, self.row_counts = rows, labels, row_counts
        self.rank, self.world = dist.get_rank(), len(row_counts)
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
                count = self.row_counts[(owner - 1) % self.world]
                next_rows = rows.new_empty((count, rows.shape[1]))
                send, receive = [(rows, _ROWS_TAG)], [(next_rows, _ROWS_TAG)]
                if labels is not None:
                    next_labels = labels.new_empty((count,))
                    send.append((labels, _LABELS_TAG))
                    receive.append((next_labels, _LABELS_TAG))
                requests = self._exchange(send, receive)
            try:
                yield owner, rows, labels
            finally:  # also when the consumer stops early (an error on every rank): no request left pending
                for request in requests:
                    request.wait()
            if requests:
                rows, labels = next_rows, (next_labels if labels is not None else None)

    def push_key_grad(self, owner: int, grad: Tensor) -> None:
        """Adds the partial key gradient that arrived with this block, passes the sum on, and starts
        receiving the partial sum of the block this rank holds next (after the last step: its own)."""
        if self.grad_in_flight is not None:
            grad = grad + self._wait_for_grad()
        incoming = grad.new_empty((self.row_counts[(owner - 1) % self.world], grad.shape[1]))
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


EXCHANGES = {"local": Local, "gather": Gather, "ring": Ring}


# --- cost model (docs/distributed.md) --------------------------------------------------------------------


def scaling_model(
    global_rows: int, world: int, dim: int, *, element_bytes: int = 2, grad_bytes: int = 4, labels: bool = False
) -> dict[str, dict[str, int]]:
    """Per-rank cost of one loss step (forward + backward) of the engine's "gather" and "ring".

    ``global_rows`` M embedding rows of width ``dim`` (D', all views) split evenly over ``world`` ranks
    (R = M/W rows each); rows travel in ``element_bytes`` (the embeddings' dtype: 2 for bf16/fp16), key
    gradients in ``grad_bytes`` (the accumulation dtype, fp32), and with ``labels`` (SupCon, InfoNCE
    targets) one int64 label per row. Counts what this implementation allocates and sends; it leaves out
    the O(R) per-anchor statistics, the one-int-per-part size exchange, allocator slack, and the
    collectives' internal algorithm (a ring all-gather / reduce-scatter moves the same bytes).

    Both modes exchange the rows twice: the forward and the backward are separate custom ops that keep
    only O(R) statistics between them (gather all-gathers again in the backward, the ring rotates again
    carrying the key gradients).

    * ``held_bytes``: embedding-sized buffers alive at the peak (the backward).
    * ``tile_bytes``: the torch backend's largest similarity tile (``chunk_rows(R)`` anchors × R keys of
      one block, fp32; the fused backends keep their tiles on chip).
    * ``sent_bytes``: bytes this rank sends (point-to-point for the ring, its share of the all-gather and
      reduce-scatter for gather).
    * ``gemm_flops``: 4 GEMM-units of R anchors × M keys (forward S, recomputed S, dA, dK).

    Example:
        >>> cost = scaling_model(global_rows=1 << 20, world=8, dim=128)
        >>> cost["ring"]["held_bytes"] < cost["gather"]["held_bytes"]
        True
    """
    rows = global_rows // world
    row_block = rows * dim * element_bytes + (rows * 8 if labels else 0)
    chunk_rows = dispatch.module("torch").chunk_rows
    tile = chunk_rows(rows) * rows * 4
    flops = 4 * 2 * rows * global_rows * dim
    return {
        "gather": {
            # gathered rows + their key gradients + this rank's row gradient and its reduce-scatter share
            "held_bytes": global_rows * dim * (element_bytes + grad_bytes) + 2 * rows * dim * grad_bytes,
            "tile_bytes": tile,
            "sent_bytes": 2 * (world - 1) * row_block + (world - 1) * rows * dim * grad_bytes,
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
