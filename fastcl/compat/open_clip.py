"""open_clip's ``ClipLoss`` and ``SigLipLoss`` (github.com/mlfoundations/open_clip, ``src/open_clip/loss.py``):
change only the import.

    from open_clip.loss import ClipLoss, SigLipLoss            # before
    from fastcl.compat.open_clip import ClipLoss, SigLipLoss    # after

Same constructors and call forms as open_clip today, every released one since 2.20 included:
``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
use_horovod=False)(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``
(``logit_bias`` since 2.32; open_clip's ``loss(**model_out, output_dict=True)`` works) and
``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=0)(image_features,
text_features, logit_scale, logit_bias, output_dict=False)`` (``chunk_size`` from open_clip's head; 2.22–2.29's
``bidir`` / ``use_horovod`` are accepted as keywords, and a bool in ``dist_impl``'s place is 2.2x's ``bidir``).

The logit scale arrives at call time, already exponentiated, as a float, a 0-dim or a ``[1]`` tensor, and
multiplies the logits as in open_clip (any value: 0, negative, NaN act as there; its gradient flows).
Features are used as given (open_clip's models normalize them); NaN or Inf in them gives NaN, as open_clip,
without a raise or a host sync. With ``world_size > 1`` the flags mean what they mean in open_clip
(values and, after DDP's gradient average, parameter gradients equal open_clip's):

==============================  ==========================================  ==============================
flags                           loss on each rank                           runs on
==============================  ==========================================  ==============================
world_size=1 (default)          this rank's batch only                      fused cross-view InfoNCE
local_loss=False                global batch, the same value on every rank  ``distributed="gather"``
local_loss=True                 this rank's rows against every rank's rows  InfoNCE with explicit targets
gather_with_grad=False          gradients only through this rank's rows     (open_clip's 1/W scaling kept)
==============================  ==========================================  ==============================

``use_horovod=True`` raises ``NotImplementedError``; ``cache_labels`` changes nothing (no label tensor is
built); ``ClipLoss``'s ``logit_bias`` shifts every logit of a softmax and so changes neither the loss nor
any gradient (its own gradient is exactly 0; a non-finite bias gives NaN, as open_clip).

``SigLipLoss``: ``−Σ_ij log σ(y_ij (t·⟨x_i, y_j⟩ + b)) / N`` with y = +1 on the pairs and −1 elsewhere, on
fastcl's SigLIP for one process; with ``world_size > 1`` each rank's images against the texts of every
rank, divided by its own N (every ``dist_impl`` of open_clip gives that value and those gradients), on the
block engine. ``chunk_size`` only bounds open_clip's memory; fastcl never builds the N × N logits, so any
value gives the same loss.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastcl import functional
from fastcl.compat._common import (
    all_gather_rows,
    check_rows,
    plan_loss,
    scalar,
    scale_grad,
    scale_rows,
    sigmoid_negatives,
)
from fastcl.distributed import world_size as process_world_size
from fastcl.engine import Pass, Plan

Scalar = Union[float, Tensor]
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
# SigLIP over [images; every rank's texts]: images against texts, positives where the text's global index
# is the image's target (its own index on this rank), sigmoid epilogue.
_RANK_SIGLIP_PLAN = Plan(passes=(Pass((0, 1), (1, 2), "labels"),), labels="targets", epilogue="sigmoid").encode()

__all__ = ["ClipLoss", "SigLipLoss"]


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss (Radford et al. 2021, https://arxiv.org/abs/2103.00020) with
    open_clip's signature: ``(CE(scale · I Tᵀ) + CE(scale · T Iᵀ)) / 2``.

    Args:
        local_loss: with ``world_size > 1``, each rank's own rows against all gathered rows.
        gather_with_grad: with ``world_size > 1``, gradients flow through the gathered rows.
        cache_labels: accepted for compatibility; no effect.
        rank: this process's rank (open_clip takes it from the caller).
        world_size: number of ranks; 1 computes the loss of this rank's batch.
        use_horovod: not supported (raises ``NotImplementedError`` at the first call with world_size > 1).

    Shape:
        image_features, text_features: ``[N, D]``; logit_scale: float, ``[]`` or ``[1]``. Output: ``[]``.

    Returns:
        The loss (0-dim), or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    Raises:
        ValueError: bad shapes, a non-positive or multi-element logit scale, ``world_size`` not matching
            the initialized process group.
        NotImplementedError: ``use_horovod=True`` with ``world_size > 1``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> img, txt = F.normalize(torch.randn(8, 32), dim=1), F.normalize(torch.randn(8, 32), dim=1)
        >>> logit_scale = torch.nn.Parameter(torch.ones([1]) * 2.659)    # log(1 / 0.07)
        >>> loss = ClipLoss()(img, txt, logit_scale.exp())
        >>> loss.backward()
        >>> logit_scale.grad.shape
        torch.Size([1])
    """

    def __init__(
        self,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Optional[Scalar] = None,
        output_dict=False,
    ):
        check_rows(("image_features", "text_features"), (image_features, text_features), None)
        scale = scalar("logit_scale", logit_scale)
        if self.world_size > 1:
            loss = self._distributed_loss(image_features, text_features, scale)
        else:
            scaled = scale_rows("logit_scale", image_features, scale)
            loss = functional.info_nce(
                scaled, text_features, 1.0, normalize=False, distributed="local", check_finite=False
            )
        if logit_bias is not None:
            # A shift of every logit: no change to the softmax. Kept in the graph so that its gradient
            # is an exact 0 and a non-finite bias gives NaN, as open_clip's logits + bias.
            shift = scalar("logit_bias", logit_bias) * 0
            loss = loss + (shift.to(loss.dtype) if isinstance(shift, Tensor) else shift)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image_features: Tensor, text_features: Tensor, scale: Scalar) -> Tensor:
        if self.use_horovod:
            raise NotImplementedError(
                "use_horovod: Horovod is not supported; use torch.distributed (use_horovod=False)"
            )
        if process_world_size() != self.world_size:
            raise ValueError(
                f"world_size: expected the initialized process group's size {process_world_size()}, "
                f"got {self.world_size}"
            )
        if not self.local_loss:
            if not self.gather_with_grad:
                # open_clip's gathered copies carry no gradient: each rank differentiates the global loss
                # through its own rows only, 1/W of the gather-with-gradient result (temperature excepted).
                image_features = scale_grad(image_features, 1.0 / self.world_size)
                text_features = scale_grad(text_features, 1.0 / self.world_size)
            scaled = scale_rows("logit_scale", image_features, scale)
            return functional.info_nce(
                scaled, text_features, 1.0, normalize=False, distributed="gather", check_finite=False
            )
        all_image = all_gather_rows(image_features, self.gather_with_grad)
        all_text = all_gather_rows(text_features, self.gather_with_grad)
        n = image_features.shape[0]
        positive = torch.arange(n, device=image_features.device) + n * self.rank
        one_way = dict(targets=positive, normalize=False, symmetric=False, distributed="local", check_finite=False)
        per_image = functional.info_nce(scale_rows("logit_scale", image_features, scale), all_text, 1.0, **one_way)
        per_text = functional.info_nce(scale_rows("logit_scale", text_features, scale), all_image, 1.0, **one_way)
        return (per_image + per_text) / 2

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
            f"world_size={self.world_size}"
        )


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, https://arxiv.org/abs/2303.15343) with open_clip's
    signature.

    Args:
        cache_labels: accepted for compatibility; no effect.
        rank: this process's rank. world_size: number of ranks (1: this rank's batch only).
        dist_impl: open_clip's exchange (``'bidir'``, ``'shift'``, ``'reduce'`` or ``'gather'``; None:
            ``'bidir'``; a bool: open_clip 2.2x's ``bidir``, True ``'bidir'``, False ``'shift'``); all give
            the same loss and gradients, so it only is validated.
        chunk_size: open_clip's logit row chunks (0: none); no effect on the value (nothing N × N is built).
        bidir: open_clip 2.22–2.29's flag (keyword only), as a bool ``dist_impl``.
        use_horovod: open_clip 2.22–2.29's flag (keyword only); True raises ``NotImplementedError``.

    Shape:
        image_features, text_features: ``[N, D]`` (used as given); logit_scale (t, exponentiated) and
        logit_bias (b, or None): floats, ``[]`` or ``[1]`` tensors. Output: ``[]``.

    Returns:
        The loss (0-dim), or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    Raises:
        ValueError: an unknown ``dist_impl``, a negative ``chunk_size``, bad shapes, ``world_size`` not
            matching the process group.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> img, txt = F.normalize(torch.randn(8, 32), dim=1), F.normalize(torch.randn(8, 32), dim=1)
        >>> t, b = torch.nn.Parameter(torch.tensor(10.0).log()), torch.nn.Parameter(torch.tensor(-10.0))
        >>> loss = SigLipLoss()(img, txt, t.exp(), b)
        >>> loss.backward()
        >>> t.grad is not None and b.grad is not None
        True
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        chunk_size: int = 0,
        *,
        bidir: Optional[bool] = None,
        use_horovod: bool = False,
    ):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("use_horovod: Horovod is not supported; use torch.distributed")
        if isinstance(dist_impl, bool):  # open_clip 2.2x's fourth positional argument
            dist_impl, bidir = None, dist_impl
        if bidir is not None:
            if dist_impl is not None:
                raise ValueError(f"bidir, dist_impl: give one of them, got bidir={bidir!r}, dist_impl={dist_impl!r}")
            dist_impl = "bidir" if bidir else "shift"
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size: expected an int >= 0, got {chunk_size!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        self.chunk_size = chunk_size
        if self.dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl: expected one of {list(DIST_IMPLS)}, got {dist_impl!r}")

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Optional[Scalar],
        output_dict=False,
    ):
        check_rows(("image_features", "text_features"), (image_features, text_features), None)
        scaled = scale_rows("logit_scale", image_features, logit_scale)
        bias = 0.0 if logit_bias is None else scalar("logit_bias", logit_bias)
        if self.world_size > 1:
            if process_world_size() != self.world_size:
                raise ValueError(
                    f"world_size: expected the initialized process group's size {process_world_size()}, "
                    f"got {self.world_size}"
                )
            loss = self._rank_loss(scaled, text_features, bias)
        else:
            loss = _one_process_siglip(scaled, text_features, bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _rank_loss(self, scaled_images: Tensor, text_features: Tensor, bias: Scalar) -> Tensor:
        """This rank's images against every rank's texts (gradients summed back to their owners), over
        this rank's N: [images; all texts] as one block of the engine."""
        n = scaled_images.shape[0]
        texts = all_gather_rows(text_features, with_grad=True)
        targets = torch.arange(n, device=scaled_images.device) + n * self.rank
        rows = torch.cat([scaled_images, texts])
        return plan_loss(rows, _RANK_SIGLIP_PLAN, [n, texts.shape[0]], loss="siglip", labels=targets, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
            f"chunk_size={self.chunk_size}"
        )


def _one_process_siglip(scaled_images: Tensor, texts: Tensor, bias: Scalar) -> Tensor:
    """open_clip's ``−Σ log σ(y_ij z_ij) / N`` as every pair's own softplus: the negatives' on the block
    primitive, the positives' row-wise, so an infinite logit gives open_clip's ±Inf (the engine's SigLIP,
    ``Σ softplus(z) − Σ P·z``, gives NaN there: Inf − Inf)."""
    negatives = sigmoid_negatives(scaled_images, texts, bias)
    acc = negatives.dtype
    positive = (scaled_images.to(acc) * texts.to(acc)).sum(dim=1) + (bias.to(acc) if isinstance(bias, Tensor) else bias)
    return (negatives + torch.logaddexp(-positive, torch.zeros_like(positive))).sum() / scaled_images.shape[0]
