"""lightly's ``NTXentLoss``, ``DCLLoss`` and ``DCLWLoss`` (github.com/lightly-ai/lightly, ``lightly/loss/``):
change only the import.

    from lightly.loss import NTXentLoss, DCLLoss, DCLWLoss                  # before
    from fastcl.compat.lightly import NTXentLoss, DCLLoss, DCLWLoss          # after

Same constructor ``NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)``, same
``forward(out0, out1)`` and values:

* rows are L2-normalized inside the loss, as lightly does;
* a batch of one pair gives exactly 0 with exactly zero gradients (the positive is the only other row),
  as lightly;
* per-rank under DDP unless ``gather_distributed=True``, as lightly. With it, each rank's loss is the
  mean over its own 2n rows against the 2·(global batch) rows of every rank (lightly's value, which
  differs between ranks), with lightly's gradients, on fastcl's block engine;
* ``abs(temperature) < 1e-8`` raises lightly's ``ValueError``;
* ``memory_bank_size=(num_features, dim)`` keeps lightly's MoCo-style queue: the bank is drawn at
  construction exactly as lightly draws it (``torch.randn`` then normalized, so the same seed gives the
  same bank), the loss of ``out0`` against its positive ``out1`` and the bank's entries runs in row
  blocks over the bank with its gradient computed in the forward (the bank takes none: two GEMMs, as
  lightly's, never an N × bank matrix), and ``out1`` is enqueued afterwards when ``out0`` requires
  grad (gathered from every rank first under ``gather_distributed``), as lightly.

``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)`` and ``DCLWLoss(temperature=0.1,
sigma=0.5, gather_distributed=False)`` are lightly's decoupled contrastive losses (NT-Xent without the
positive in the denominator; ``weight_fn(out0, out1)`` weights the positive term, DCLW with lightly's
negative von Mises-Fisher weights), with the same DDP conventions as ``NTXentLoss``. On one process
without weights or with DCLW's they are :func:`fastcl.functional.dcl`; a custom ``weight_fn`` or
``gather_distributed`` runs the same DCL on the block engine, the weights' share of the positive term
added on the N pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Callable, Optional, Union

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import functional
from fastcl.compat._common import all_gather_rows, check_rows, plan_loss
from fastcl.contract import accumulation_dtype
from fastcl.distributed import world_size
from fastcl.engine import Pass, Plan
from fastcl.torch_backend._tiles import blocks

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss", "negative_mises_fisher_weights"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (Chen et al. 2020, https://arxiv.org/abs/2002.05709) with lightly's signature.

    Args:
        temperature: τ; ``abs(τ) < 1e-8`` raises ``ValueError`` (fastcl also requires τ > 0).
        memory_bank_size: 0 (no bank, SimCLR) or ``(num_features, dim)`` (MoCo-style negatives).
        gather_distributed: under DDP, negatives from every rank (see the module docstring).

    Shape:
        out0, out1: ``[N, D]``. Output: ``[]``.

    Returns:
        The mean NT-Xent over the 2N rows (this rank's rows under ``gather_distributed``); with a
        memory bank, the mean over the N rows of ``out0`` of ``−log(e^{s(out0_i, out1_i)} /
        (e^{s(out0_i, out1_i)} + Σ_k e^{s(out0_i, bank_k)}))``.

    Raises:
        ValueError: ``abs(temperature) < 1e-8``; ``gather_distributed`` without ``torch.distributed``;
            a ``memory_bank_size`` lightly rejects (a bare integer > 0, negative entries, not 2 entries).

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
        self.size = _bank_size(memory_bank_size)
        # lightly's MemoryBankModule buffers, drawn here as lightly draws them (the same RNG calls).
        self.register_buffer("bank", torch.empty(size=self.size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(self.size) > 1:
            with torch.no_grad():
                self.bank = F.normalize(torch.randn(self.size).type_as(self.bank), dim=-1)
                self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)
        # The pointer lives on the host (lightly reads its device copy with int(), a host sync each step).
        self._bank_pointer = 0
        self.temperature = temperature
        self.memory_bank_size = memory_bank_size
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        if abs(self.temperature) < self.eps:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        _check_gather_available(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        check_rows(("out0", "out1"), (out0, out1), self.temperature)
        if self.size[0] > 0:
            return self._with_bank(out0, out1)
        if self.gather_distributed and world_size() > 1:
            return self._gathered(out0, out1)
        if out0.shape[0] == 1:
            return _one_pair(out0, out1, self.temperature)
        return functional.nt_xent(out0, out1, self.temperature, distributed="local", check_finite=False)

    def _gathered(self, out0: Tensor, out1: Tensor) -> Tensor:
        """lightly's gather: this rank's 2n rows against [out0 of all ranks; out1 of all ranks], self
        excluded, gradients summed back to every row's owner (lightly's GatherLayer), on the engine."""
        rows, parts, ids = _gathered_views(out0, out1)
        return plan_loss(
            rows, _GATHERED_NT_XENT_PLAN, parts, self.temperature, loss="nt_xent", labels=ids, normalize=True
        )

    def _with_bank(self, out0: Tensor, out1: Tensor) -> Tensor:
        """out0_i against its positive out1_i and the bank as it was before this call (lightly's order)."""
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        bank = self.bank.clone().detach().to(out0.device)
        if out0.requires_grad:
            self._enqueue(out1)
        positive = (out0 * out1).sum(dim=1) / self.temperature
        with_grad = torch.is_grad_enabled() and (out0.requires_grad or positive.requires_grad)
        return _BankLoss.apply(out0, bank, positive, float(self.temperature), with_grad)

    @torch.no_grad()
    def _enqueue(self, batch: Tensor) -> None:
        """lightly's ``_dequeue_and_enqueue``: a ring buffer whose wrap-around drops the batch's tail."""
        if self.gather_distributed and world_size() > 1:
            batch = all_gather_rows(batch, with_grad=False)
        size, ptr = self.size[0], self._bank_pointer
        if ptr + batch.shape[0] >= size:
            self.bank[ptr:] = batch[: size - ptr].detach()
            self._bank_pointer = 0
        else:
            self.bank[ptr : ptr + batch.shape[0]] = batch.detach()
            self._bank_pointer = ptr + batch.shape[0]
        self.bank_ptr.fill_(self._bank_pointer)  # lightly's buffer, kept current; written, never read

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
            f"gather_distributed={self.gather_distributed}"
        )


def _own_rows_pass(part: int) -> Pass:
    """This rank's rows of view ``part // 3`` against all rows of both views (see _gathered_views)."""
    return Pass((part, part + 1), (0, 6), "labels", exclude_self=True, weight=0.5)


# Over [out0 of lower ranks; own out0; higher ranks; out1 of lower ranks; own out1; higher ranks], positives
# where the global sample ids are equal: NT-Xent's per-rank value under lightly's gather, and DCL's.
_GATHERED_NT_XENT_PLAN = Plan(passes=(_own_rows_pass(1), _own_rows_pass(4)), labels="rows").encode()
_GATHERED_DCL_PLAN = Plan(passes=(_own_rows_pass(1), _own_rows_pass(4)), labels="rows", exclude_positives=True).encode()


def _gathered_views(out0: Tensor, out1: Tensor) -> tuple[Tensor, list[int], Tensor]:
    """(rows, part sizes, per-row global sample ids) of both views of every rank (this rank's alone on one
    process), gathered with lightly's gradient rule (each row's gradient summed over the ranks)."""
    n = out0.shape[0]
    gather = world_size() > 1
    rank = torch_dist.get_rank() if gather else 0
    keys0, keys1 = (all_gather_rows(z, with_grad=True) for z in (out0, out1)) if gather else (out0, out1)
    m = keys0.shape[0]
    view = [n * rank, n, m - n * (rank + 1)]
    ids = torch.arange(m, device=out0.device)
    return torch.cat([keys0, keys1]), view + view, torch.cat([ids, ids])


def _one_pair(out0: Tensor, out1: Tensor, temperature: float) -> Tensor:
    """lightly's loss of one pair: each row's only candidate is its positive, a cross-entropy over one
    logit, exactly 0 with exactly zero gradients (fastcl's fused NT-Xent leaves rounding noise there),
    NaN for a non-finite row, as lightly."""
    logit = (F.normalize(out0, dim=1) * F.normalize(out1, dim=1)).sum(dim=1) / temperature
    return (torch.logsumexp(logit[:, None], dim=1) - logit).mean()


class _BankLoss(torch.autograd.Function):
    """mean_i [log(e^{p_i} + Σ_k e^{⟨a_i, b_k⟩/τ}) − p_i] over anchor row blocks against the bank b (no
    gradient), the anchors' and positives' gradients computed in the forward (Liger-Kernel's fused
    cross-entropy does the same): one GEMM for the logits and one for dA per block, nothing N × K kept."""

    @staticmethod
    def forward(ctx, anchors: Tensor, bank: Tensor, positive: Tensor, tau: float, with_grad: bool) -> Tensor:
        acc = accumulation_dtype(anchors.dtype)
        a, b, p = anchors.to(acc) / tau, bank.to(acc), positive.to(acc)
        n = a.shape[0]
        total = a.new_zeros(())
        d_a = torch.empty_like(a) if with_grad else None
        d_p = torch.empty_like(p) if with_grad else None
        for start, stop in blocks(n, b.shape[0]):
            s = a[start:stop] @ b.T
            # torch's fused log_softmax is about twice as fast as logsumexp on CPU; lse from one column.
            log_probabilities = torch.log_softmax(s, dim=1)
            lse = s[:, 0] - log_probabilities[:, 0]
            total += (torch.logaddexp(p[start:stop], lse) - p[start:stop]).sum()
            if with_grad:
                # dℓ/dlse = σ(lse − p) (through the softmax over the bank), dℓ/dp = −σ(lse − p)
                weight = torch.sigmoid(lse - p[start:stop]) / n
                probabilities = log_probabilities.exp_().mul_(weight[:, None])  # in place: one tile
                d_a[start:stop] = probabilities @ b / tau
                d_p[start:stop] = -weight
        ctx.save_for_backward(d_a, d_p)
        ctx.dtypes = (anchors.dtype, positive.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad: Tensor):
        d_a, d_p = ctx.saved_tensors
        return (grad * d_a).to(ctx.dtypes[0]), None, (grad * d_p).to(ctx.dtypes[1]), None, None


def _bank_size(size: Union[int, Sequence[int]]) -> tuple[int, ...]:
    """lightly's checks of ``memory_bank_size``: 0, or a ``(num_features, dim)`` tuple."""
    shape = (size,) if isinstance(size, int) else tuple(size)
    if any(x < 0 for x in shape):
        raise ValueError(f"memory_bank_size: illegal memory bank size {size}, all entries must be non-negative")
    if isinstance(size, int) and size > 0:
        raise ValueError(
            f"memory_bank_size: 'size={size}' does not specify the feature dimension; set it with "
            f"'memory_bank_size=({size}, dim)', or pass 0 to disable the memory bank"
        )
    if shape != (0,) and len(shape) != 2:
        raise ValueError(f"memory_bank_size: illegal memory bank size {size}, expected (num_features, dim) or 0")
    return shape


def _check_gather_available(gather_distributed: bool) -> None:
    if gather_distributed and not torch_dist.is_available():
        raise ValueError(
            "gather_distributed is True but torch.distributed is not available. Please set "
            "gather_distributed=False or install a torch version with distributed support."
        )


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """lightly's DCLW weights: ``2 − N · softmax_i(out0_i · out1_i / σ)`` on detached rows.

    Args:
        out0, out1: [N, D] the two views' (normalized) rows.
        sigma: σ > 0.

    Example:
        >>> import torch
        >>> negative_mises_fisher_weights(torch.randn(4, 8), torch.randn(4, 8)).shape
        torch.Size([4])
    """
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return 2 - out0.shape[0] * nn.functional.softmax(similarity, dim=0)


class DCLLoss(nn.Module):
    """Decoupled contrastive loss (Yeh et al. 2022, https://arxiv.org/abs/2110.06848) with lightly's signature.

    Each anchor's term is docs/spec.md, "DCL" (one log-sum-exp over both views' negatives) on normalized
    rows, with ``w = weight_fn(u, v)`` (1 without one); the loss is the mean over i of the two views'
    terms, halved. On one process without weights or with DCLW's weights this is
    :func:`fastcl.functional.dcl`; a custom ``weight_fn`` or ``gather_distributed`` runs the block engine
    here, with lightly's per-rank values.

    Args:
        temperature: τ > 0.
        weight_fn: ``(out0, out1) -> [N]`` weights of the positive term, or None.
        gather_distributed: under DDP, negatives from every rank; each rank's loss is the mean over its
            own rows (lightly's value), with lightly's gradients.

    Shape:
        out0, out1: ``[N, D]``, N ≥ 2 on one process. Output: ``[]``.

    Raises:
        ValueError: bad shapes (naming the argument), N = 1 on one process (lightly returns −inf), τ ≤ 0,
            ``gather_distributed`` without ``torch.distributed``.

    Example:
        >>> import torch
        >>> loss = DCLLoss(temperature=0.1)(torch.randn(8, 32), torch.randn(8, 32))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        gather_distributed: bool = False,
    ):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        self._sigma: Optional[float] = None  # DCLW's σ: the core loss computes these weights itself
        _check_gather_available(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """this rank's rows against every rank's rows under ``gather_distributed`` (else its own),
        self and positive excluded from the denominator, gradients summed back to every row's owner."""
        check_rows(("out0", "out1"), (out0, out1), self.temperature)
        gather = self.gather_distributed and world_size() > 1
        n = out0.shape[0]
        if n < 2 and not gather:
            raise ValueError(f"out0: DCL needs N >= 2 rows per view (its denominators hold the other samples), got {n}")
        if not gather and (self.weight_fn is None or self._sigma is not None):
            # One process, no weights or DCLW's: fastcl's fused DCL computes exactly this.
            return functional.dcl(
                out0, out1, self.temperature, weight_sigma=self._sigma, distributed="local", check_finite=False
            )
        # The engine's DCL weighs each positive term by 1; the weights' share is added back on the n pairs.
        rows, parts, ids = _gathered_views(out0, out1) if gather else (torch.cat([out0, out1]), [0, n, 0] * 2, None)
        if ids is None:
            ids = torch.arange(n, device=out0.device).repeat(2)
        loss = plan_loss(rows, _GATHERED_DCL_PLAN, parts, self.temperature, loss="dcl", labels=ids, normalize=True)
        if self.weight_fn is None:
            return loss
        unit0, unit1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        positive = (unit0 * unit1).sum(dim=1) / self.temperature
        weights = self.weight_fn(unit0, unit1) + self.weight_fn(unit1, unit0)
        return loss + ((2 - weights) * positive).sum().to(loss.dtype) / (2 * n)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, weight_fn={self.weight_fn}, gather_distributed={self.gather_distributed}"
        )


class DCLWLoss(DCLLoss):
    """lightly's weighted DCL: :class:`DCLLoss` with :func:`negative_mises_fisher_weights` (σ = ``sigma``).

    Args:
        temperature: τ > 0.
        sigma: σ > 0 of the von Mises-Fisher weights.
        gather_distributed: as :class:`DCLLoss`.

    Example:
        >>> import torch
        >>> loss = DCLWLoss(temperature=0.1, sigma=0.5)(torch.randn(8, 32), torch.randn(8, 32))
    """

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False):
        super().__init__(
            temperature=temperature,
            weight_fn=partial(negative_mises_fisher_weights, sigma=sigma),
            gather_distributed=gather_distributed,
        )
        # The fused DCLW takes σ > 0; lightly computes any σ (its softmax of similarities / σ), so any
        # other value runs lightly's weights through the weight_fn path.
        self._sigma = float(sigma) if isinstance(sigma, (int, float)) and sigma > 0 else None
