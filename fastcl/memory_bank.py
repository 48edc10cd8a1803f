"""A FIFO queue of keys for MoCo-style negatives (He et al. 2020, https://arxiv.org/abs/1911.05722).

:class:`MemoryBank` holds K key rows; :func:`fastcl.functional.info_nce` with ``queue=bank.keys`` uses them
as negatives (docs/spec.md, "InfoNCE with a queue (MoCo)"), and ``bank.enqueue(k)`` then replaces the
oldest rows with this step's keys — gathered from every rank under DDP, as MoCo's ``concat_all_gather``
does, so every rank holds the same queue. The pointer is a device tensor: enqueueing reads nothing back
to the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import distributed as _distributed

__all__ = ["MemoryBank"]


class MemoryBank(nn.Module):
    """A FIFO queue of K key rows (MoCo's queue), its state in ``state_dict()``.

    Args:
        size: K, the number of keys held.
        dim: D, the keys' feature dimension.
        distributed: "auto" (gather every rank's keys on enqueue under an initialized process group of
            world size > 1), or "local" (enqueue this rank's keys only).
        dtype, device: of the bank (moved by ``.to()`` like any buffer).
        generator: seeds the initial random unit rows (MoCo starts from ``normalize(randn)``).

    Shape:
        keys: ``[K, D]`` (rows, as fastcl's keys; MoCo's own buffer is its transpose ``[D, K]``).

    Example:
        >>> import torch, fastcl
        >>> bank = fastcl.MemoryBank(size=16, dim=8)
        >>> q, k = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss = fastcl.functional.info_nce(q, k, 0.07, symmetric=False, queue=bank.keys)
        >>> bank.enqueue(k)                  # after the loss, as MoCo's _dequeue_and_enqueue
        >>> torch.equal(bank.keys[:4], k), int(bank.pointer)
        (True, 4)
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        distributed: str = "auto",
        dtype: torch.dtype = torch.float32,
        device=None,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if distributed not in ("auto", "local"):
            raise ValueError(f"distributed: expected 'auto' or 'local', got {distributed!r}")
        self.distributed = distributed
        initial = F.normalize(torch.randn(size, dim, generator=generator, dtype=torch.float64), dim=1)
        self.register_buffer("bank", initial.to(device=device, dtype=dtype))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def keys(self) -> Tensor:
        """The ``[K, D]`` queue (the buffer itself: :meth:`enqueue` overwrites it in place; fastcl's losses
        copy what they use, so enqueueing between a loss and its backward is safe)."""
        return self.bank

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Replaces the oldest rows with ``keys`` (rank-major over every rank under DDP), stored as given:
        a loss with ``normalize=True`` normalizes the queue's rows as it does q and k.

        Args:
            keys: ``[B, D]`` this step's keys (detached). Under DDP every rank passes the same B.
        """
        if not isinstance(keys, Tensor) or keys.dim() != 2 or keys.shape[1] != self.bank.shape[1]:
            shape = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
            raise ValueError(f"keys: expected shape [B, {self.bank.shape[1]}], got {shape}")
        keys = keys.detach().to(device=self.bank.device, dtype=self.bank.dtype)
        world = _distributed.world_size() if self.distributed == "auto" else 1
        if world > 1:
            gathered = [torch.empty_like(keys) for _ in range(world)]
            dist.all_gather(gathered, keys.contiguous())
            keys = torch.cat(gathered)
        size, count = self.bank.shape[0], keys.shape[0]
        start = self.pointer
        if count > size:  # only the newest K survive; they land where FIFO order puts them
            start = (start + count - size) % size
            keys = keys[-size:]
        index = (start + torch.arange(keys.shape[0], device=self.bank.device)) % size
        self.bank.index_copy_(0, index, keys)
        self.pointer.copy_((self.pointer + count) % size)

    def extra_repr(self) -> str:
        return f"size={self.bank.shape[0]}, dim={self.bank.shape[1]}, distributed={self.distributed!r}"
