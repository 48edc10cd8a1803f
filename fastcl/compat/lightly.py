"""lightly's ``NTXentLoss`` (github.com/lightly-ai/lightly, ``lightly/loss/ntx_ent_loss.py``): change only the import.

    from lightly.loss import NTXentLoss            # before
    from fastcl.compat.lightly import NTXentLoss    # after

Same constructor ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``, same
``forward(out0, out1)`` and values:

* rows are L2-normalized inside the loss, as lightly does;
* a batch of one pair gives exactly 0 (the positive is the only other row), as lightly;
* per-rank under DDP unless ``gather_distributed=True``, as lightly. With it, each rank's loss is the
  mean over its own 2n rows against the 2·(global batch) rows of every rank (lightly's value, which
  differs between ranks), with lightly's gradients; that path runs as row blocks in PyTorch;
* ``abs(temperature) < 1e-8`` raises lightly's ``ValueError``.

``memory_bank_size > 0`` (MoCo-style negatives from a queue) is not implemented: it raises
``NotImplementedError`` at construction, naming the option.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import functional
from fastcl.compat._common import all_gather_rows, check_rows
from fastcl.compat._rowblocks import cross_entropy_rows
from fastcl.distributed import world_size

__all__ = ["NTXentLoss"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (Chen et al. 2020, https://arxiv.org/abs/2002.05709) with lightly's signature.

    Args:
        temperature: τ; ``abs(τ) < 1e-8`` raises ``ValueError`` (fastcl also requires τ > 0).
        memory_bank_size: only 0 (or a shape whose first entry is 0) is supported.
        gather_distributed: under DDP, negatives from every rank (see the module docstring).

    Shape:
        out0, out1: ``[N, D]``. Output: ``[]``.

    Returns:
        The mean NT-Xent over the 2N rows (this rank's rows under ``gather_distributed``).

    Raises:
        ValueError: ``abs(temperature) < 1e-8``; ``gather_distributed`` without ``torch.distributed``.
        NotImplementedError: ``memory_bank_size`` other than 0.

    Example:
        >>> import torch
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> out0, out1 = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = loss_fn(out0, out1)
        >>> float(loss_fn(out0[:1], out1[:1]))      # one pair: the positive is the only candidate
        0.0
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
    ):
        super().__init__()
        size = memory_bank_size[0] if isinstance(memory_bank_size, Sequence) else memory_bank_size
        if size != 0:
            raise NotImplementedError(
                f"memory_bank_size: a memory bank (MoCo-style negatives) is not implemented in fastcl, got "
                f"{memory_bank_size!r}; use memory_bank_size=0 (SimCLR, in-batch negatives)"
            )
        self.temperature = temperature
        self.memory_bank_size = memory_bank_size
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        if abs(self.temperature) < self.eps:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        if gather_distributed and not torch_dist.is_available():
            raise ValueError(
                "gather_distributed is True but torch.distributed is not available. Please set "
                "gather_distributed=False or install a torch version with distributed support."
            )

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        check_rows(("out0", "out1"), (out0, out1), self.temperature)
        if self.gather_distributed and world_size() > 1:
            return self._gathered(out0, out1)
        return functional.nt_xent(out0, out1, self.temperature, distributed="local")

    def _gathered(self, out0: Tensor, out1: Tensor) -> Tensor:
        """lightly's gather: this rank's 2n rows against [out0 of all ranks; out1 of all ranks], self
        excluded, gradients summed back to every row's owner (lightly's GatherLayer)."""
        n = out0.shape[0]
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        keys0, keys1 = all_gather_rows(out0, with_grad=True), all_gather_rows(out1, with_grad=True)
        m = keys0.shape[0]
        own = torch.arange(n, device=out0.device) + n * torch_dist.get_rank()
        keys = torch.cat([keys0, keys1])
        anchors = torch.cat([out0, out1])
        self_index = torch.cat([own, own + m])
        positive = torch.cat([own + m, own])
        return cross_entropy_rows(anchors, keys, positive, self.temperature, self_index=self_index).mean()

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
            f"gather_distributed={self.gather_distributed}"
        )
