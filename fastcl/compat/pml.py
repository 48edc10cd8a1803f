"""pytorch-metric-learning's ``NTXentLoss``, ``SupConLoss`` and ``SelfSupervisedLoss``: change only the import.

    from pytorch_metric_learning.losses import NTXentLoss, SupConLoss, SelfSupervisedLoss   # before
    from fastcl.compat.pml import NTXentLoss, SupConLoss, SelfSupervisedLoss               # after

Same constructors (``NTXentLoss(temperature=0.07)``, ``SupConLoss(temperature=0.1)``,
``SelfSupervisedLoss(loss, symmetric=True)``), same ``forward(embeddings, labels=None, indices_tuple=None,
ref_emb=None, ref_labels=None)`` and values, with pml's defaults (cosine similarity: rows normalized;
NT-Xent averaged over positive pairs, SupCon over anchors with a positive; a batch without positive or
without negative pairs gives 0). Labels are compared by equality (any dtype).

pml's NT-Xent with labels scores each positive pair against the anchor's negatives only:
``−log(e^{s_ap} / (e^{s_ap} + Σ_{n: y_n ≠ y_a} e^{s_an}))``. Where every anchor has at most one positive
(instance labels of two views, ``SelfSupervisedLoss``, ``ref_emb`` rows with one positive each) that is
fastcl's NT-Xent / SupCon / cross-view InfoNCE and runs on the fused losses or the block engine, as does
SupCon with ``ref_emb``; NT-Xent with several positives per anchor runs as row blocks in PyTorch (pml
itself builds a positive-pairs × negative-pairs matrix there). ``NTXentLoss`` with labels picks between
the two with one read of the largest positive count (one host sync per call, the price of the fused
path until the engine computes the per-pair formula: docs/migration.md; pml itself reads its label
matrix with ``torch.where``). ``SupConLoss`` and ``SelfSupervisedLoss`` never read the device
(tests/test_compat_oplog.py).

pml's keyword options are accepted at their default values: ``distance=None`` or ``CosineSimilarity()``
(pml's default for both losses; ``power=1``), ``reducer=None`` or the loss's default reducer with default
arguments (``MeanReducer()`` for NT-Xent, ``AvgNonZeroReducer()`` for SupCon), ``embedding_regularizer=None``
(then ``embedding_reg_weight`` is unused), and ``collect_stats`` (pml's statistics, not recorded here).
Any other value, and ``indices_tuple`` (miners), raise ``NotImplementedError`` naming the argument. NaN or
Inf in the embeddings gives NaN, as pml, without a raise. Per-rank under DDP, as pml (its
``DistributedLossWrapper`` is not mirrored).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcl import functional
from fastcl.compat._common import check_rows, class_ids, matches, plan_loss, zero_loss
from fastcl.compat._rowblocks import block_sum, masked_logsumexp
from fastcl.engine import Pass, Plan

__all__ = ["NTXentLoss", "SupConLoss", "SelfSupervisedLoss"]


# Embeddings (part 0) against ref_emb (part 1), positives where the labels are equal.
_CROSS_PLAN = Plan(passes=(Pass((0, 1), (1, 2), "labels"),), labels="rows").encode()

# The reducer each loss uses when given none, with its default arguments (pml's get_default_reducer).
_DEFAULT_REDUCERS = {"NTXentLoss": ("MeanReducer", {}), "SupConLoss": ("AvgNonZeroReducer", {"low": 0, "high": None})}


def _is_default(name: str, value, loss: str) -> bool:
    """Whether pml option ``name`` = ``value`` is what ``loss`` does by default (compared by class name
    and the options that change the result: pml itself is not needed to use this module)."""
    if value is None or name == "collect_stats":
        return True
    if name == "distance":
        return type(value).__name__ == "CosineSimilarity" and getattr(value, "power", 1) == 1
    if name == "reducer" and loss in _DEFAULT_REDUCERS:
        cls, options = _DEFAULT_REDUCERS[loss]
        return type(value).__name__ == cls and all(getattr(value, k, v) == v for k, v in options.items())
    return name == "embedding_reg_weight"  # only read with an embedding_regularizer, which must be None


def _refuse_options(kwargs: dict, loss: str) -> None:
    """Accepts pml's options at their default values; any other raises, naming it."""
    changed = sorted(name for name, value in kwargs.items() if not _is_default(name, value, loss))
    if kwargs.get("embedding_regularizer") is None and "embedding_reg_weight" in changed:
        changed.remove("embedding_reg_weight")
    if changed:
        given = ", ".join(f"{name}={kwargs[name]!r}" for name in changed)
        raise NotImplementedError(
            f"{', '.join(changed)}: fastcl.compat.pml supports pml's default options only (cosine similarity, "
            f"the loss's default reducer, no embedding regularizer), got {given}"
        )


def _zero_without_negatives(loss: Tensor, ids: Tensor) -> Tensor:
    """``loss``, or an exact 0 (zero gradients for finite rows) when every row has the same label: pml's
    loss without negative pairs. Decided on the device (no host sync)."""
    has_negative = (ids != ids[:1]).any()
    return torch.where(has_negative, loss, torch.zeros_like(loss))


def _several_positives(ids: Tensor, key_ids: Tensor, own: bool = False) -> bool:
    """Whether some anchor has two or more positive keys (``own``: the keys are the anchors, the anchor
    itself not counted). The one host read of pml's NT-Xent with labels: its per-pair formula runs on the
    fused SupCon with at most one positive per anchor and as row blocks otherwise (see the module
    docstring; pml itself reads the label matrix with ``torch.where``)."""
    return bool((matches(ids, key_ids) - int(own)).max() > 1)


class _PairLoss(nn.Module):
    def __init__(self, temperature: float, kwargs: dict):
        super().__init__()
        _refuse_options(kwargs, type(self).__name__)
        self.temperature = temperature

    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = None,
        indices_tuple=None,
        ref_emb: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
    ) -> Tensor:
        if indices_tuple is not None:
            raise NotImplementedError("indices_tuple: miners are not supported by fastcl.compat.pml; pass labels")
        if labels is None:
            raise ValueError("labels: fastcl.compat.pml needs labels (pml's indices_tuple is not supported)")
        if ref_emb is None:
            check_rows(("embeddings",), (embeddings,), self.temperature)
        else:
            check_rows(("embeddings", "ref_emb"), (embeddings, ref_emb), self.temperature, same_n=False)
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels: expected shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if ref_emb is None:
            return self._same_rows(embeddings, class_ids(labels.to(embeddings.device)))
        if ref_labels is None or ref_labels.dim() != 1 or ref_labels.shape[0] != ref_emb.shape[0]:
            raise ValueError(f"ref_labels: expected shape ({ref_emb.shape[0]},) with ref_emb")
        device = embeddings.device
        both = class_ids(torch.cat([labels.to(device), ref_labels.to(device)]))
        return self._cross_rows(embeddings, both[: labels.shape[0]], ref_emb, both[labels.shape[0] :])

    def _cross_rows(self, embeddings: Tensor, ids: Tensor, ref_emb: Tensor, ref_ids: Tensor) -> Tensor:
        if isinstance(self, NTXentLoss) and _several_positives(ids, ref_ids):
            anchors, keys = F.normalize(embeddings, dim=1), F.normalize(ref_emb, dim=1)
            return self._pair_rows(anchors, keys, ids, ref_ids, None)
        # Anchors against the ref rows, positives by label: SupCon L_out (τ_b = τ), which with one
        # positive per anchor is also pml's per-pair NT-Xent; anchors without positives left out (no
        # positive pair at all: 0), and 0 where no pair is negative, as pml.
        rows = torch.cat([embeddings, ref_emb])
        parts = [embeddings.shape[0], ref_emb.shape[0]]
        loss = plan_loss(
            rows, _CROSS_PLAN, parts, self.temperature, loss="supcon", labels=torch.cat([ids, ref_ids]), normalize=True
        )
        return _zero_without_negatives(loss, torch.cat([ids, ref_ids]))

    def _supcon(self, embeddings: Tensor, ids: Tensor) -> Tensor:
        """SupCon L_out with τ_b = τ over the rows as one view (pml's SupCon; its NT-Xent with at most one
        positive per anchor): 0 without a positive pair (anchors without one are left out of the mean) or
        without a negative pair, as pml."""
        with warnings.catch_warnings():  # the core loss's no-positive warning (CPU only); pml returns 0 silently
            warnings.filterwarnings("ignore", message="supcon: no anchor has a positive")
            loss = functional.supcon(
                embeddings[:, None],
                ids,
                None,
                self.temperature,
                base_temperature=self.temperature,
                distributed="local",
                check_finite=False,
            )
        return _zero_without_negatives(loss, ids)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class NTXentLoss(_PairLoss):
    """pml's ``NTXentLoss`` (NT-Xent with labels; Chen et al. 2020, https://arxiv.org/abs/2002.05709).

    Args:
        temperature: τ > 0.
        **kwargs: pml's options, at their default values only (else ``NotImplementedError``).

    Shape:
        embeddings: ``[B, D]``; labels: ``[B]``; ref_emb: ``[K, D]``; ref_labels: ``[K]``. Output: ``[]``.

    Returns:
        The mean over positive pairs of ``−log(e^{s_ap} / (e^{s_ap} + Σ_{negatives n of a} e^{s_an}))``;
        0 without positive or negative pairs.

    Raises:
        ValueError: missing or mis-shaped labels. NotImplementedError: ``indices_tuple``, pml options.

    Example:
        >>> import torch
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = NTXentLoss(temperature=0.1)(torch.cat([z1, z2]), torch.arange(8).repeat(2))
        >>> float(NTXentLoss()(torch.randn(4, 16), torch.zeros(4)))     # all labels equal: no negatives
        0.0
    """

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(temperature, kwargs)

    def _same_rows(self, embeddings: Tensor, ids: Tensor) -> Tensor:
        if not _several_positives(ids, ids, own=True):
            # At most one positive per anchor: each pair's denominator is every other row (SupCon, τ_b = τ).
            return self._supcon(embeddings, ids)
        z = F.normalize(embeddings, dim=1)
        return self._pair_rows(z, z, ids, ids, torch.arange(z.shape[0], device=z.device))

    def _pair_rows(
        self, anchors: Tensor, keys: Tensor, ids: Tensor, key_ids: Tensor, self_index: Optional[Tensor]
    ) -> Tensor:
        def term(s: Tensor, rows: slice) -> Tensor:
            same = ids[rows, None] == key_ids[None, :]
            positive = same & torch.isfinite(s)  # the anchor itself (s = −inf) is not a positive
            negative_lse = masked_logsumexp(s, ~same)
            pair_losses = F.softplus(negative_lse[:, None] - s)
            return torch.where(positive, pair_losses, 0.0).sum()

        n_pairs = (ids[:, None] == key_ids[None, :]).sum() - (0 if self_index is None else anchors.shape[0])
        return block_sum(anchors, keys, self.temperature, term, self_index=self_index) / n_pairs


class SupConLoss(_PairLoss):
    """pml's ``SupConLoss`` (Khosla et al. 2020, https://arxiv.org/abs/2004.11362): SupCon L_out with
    τ_b = τ, normalized rows, the mean over anchors with a positive.

    Args:
        temperature: τ > 0.
        **kwargs: pml's options, at their default values only (else ``NotImplementedError``).

    Returns:
        The loss (0-dim); 0 without positive or negative pairs.

    Example:
        >>> import torch
        >>> loss = SupConLoss(temperature=0.1)(torch.randn(12, 16), torch.randint(0, 3, (12,)))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(temperature, kwargs)

    def _same_rows(self, embeddings: Tensor, ids: Tensor) -> Tensor:
        return self._supcon(embeddings, ids)


class SelfSupervisedLoss(nn.Module):
    """pml's ``SelfSupervisedLoss``: ``embeddings[i]`` and ``ref_emb[i]`` are two views of sample i.

    ``symmetric=True`` is NT-Xent over the 2N rows; ``symmetric=False`` the one-way cross-view InfoNCE
    of embeddings against ref_emb. Both run on fastcl's fused losses.

    Args:
        loss: a :class:`NTXentLoss` or :class:`SupConLoss` of this module.
        symmetric: see above.

    Raises:
        TypeError: another loss. NotImplementedError: pml keyword options.

    Example:
        >>> import torch
        >>> loss_fn = SelfSupervisedLoss(NTXentLoss(temperature=0.2))
        >>> loss = loss_fn(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(self, loss, symmetric=True, **kwargs):
        super().__init__()
        _refuse_options(kwargs, type(self).__name__)
        if not isinstance(loss, (NTXentLoss, SupConLoss)):
            raise TypeError(f"loss: expected fastcl.compat.pml.NTXentLoss or SupConLoss, got {type(loss).__name__}")
        self.loss = loss
        self.symmetric = symmetric

    def forward(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        """pml's labels here are the row indices: every anchor has exactly one positive, known from the
        shapes alone, so this runs on the fused losses without reading the data (no host sync)."""
        check_rows(("embeddings", "ref_emb"), (embeddings, ref_emb), self.loss.temperature)
        if embeddings.shape[0] == 1:
            return zero_loss(embeddings, ref_emb)  # one pair: no negative pair, pml's 0
        common = dict(distributed="local", check_finite=False)
        if self.symmetric:  # NT-Xent over the 2N rows (pml's NT-Xent and SupCon agree with one positive)
            return functional.nt_xent(embeddings, ref_emb, self.loss.temperature, **common)
        return functional.info_nce(embeddings, ref_emb, self.loss.temperature, symmetric=False, **common)
