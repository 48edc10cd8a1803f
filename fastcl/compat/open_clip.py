"""open_clip's ``ClipLoss`` and ``SigLipLoss`` (github.com/mlfoundations/open_clip, ``src/open_clip/loss.py``):
change only the import.

    from open_clip.loss import ClipLoss, SigLipLoss            # before
    from fastcl.compat.open_clip import ClipLoss, SigLipLoss    # after

Same constructor flags and ``forward(image_features, text_features, logit_scale, output_dict=False)``;
the logit scale arrives at call time, already exponentiated, as a float, a 0-dim or a ``[1]`` tensor,
and its gradient flows. Features are used as given (open_clip's models normalize them). With
``world_size > 1`` the flags mean what they mean in open_clip (values and, after DDP's gradient
average, parameter gradients equal open_clip's):

==============================  ==========================================  ==============================
flags                           loss on each rank                           runs on
==============================  ==========================================  ==============================
world_size=1 (default)          this rank's batch only                      fused cross-view InfoNCE
local_loss=False                global batch, the same value on every rank  ``distributed="gather"``
local_loss=True                 this rank's rows against every rank's rows  InfoNCE with explicit targets
gather_with_grad=False          gradients only through this rank's rows     (open_clip's 1/W scaling kept)
==============================  ==========================================  ==============================

``use_horovod=True`` raises ``NotImplementedError``; ``cache_labels`` changes nothing (no label tensor is built).

``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)(image_features, text_features,
logit_scale, logit_bias, output_dict=False)``: ``−Σ_ij log σ(y_ij (t·⟨x_i, y_j⟩ + b)) / N`` with y = +1 on
the pairs and −1 elsewhere, on fastcl's SigLIP for one process; with ``world_size > 1`` each rank's
images against the texts of every rank, divided by its own N (every ``dist_impl`` of open_clip gives
that value and those gradients), as row blocks in PyTorch.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from fastcl import functional
from fastcl.compat._common import all_gather_rows, check_rows, scale_grad, temperature_from_scale
from fastcl.compat._rowblocks import block_sum
from fastcl.distributed import world_size as process_world_size

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
        self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor], output_dict=False
    ):
        check_rows(("image_features", "text_features"), (image_features, text_features), None)
        tau = temperature_from_scale(logit_scale)
        if self.world_size > 1:
            loss = self._distributed_loss(image_features, text_features, tau)
        else:
            loss = functional.info_nce(image_features, text_features, tau, normalize=False, distributed="local")
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed_loss(self, image_features: Tensor, text_features: Tensor, tau) -> Tensor:
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
            return functional.info_nce(image_features, text_features, tau, normalize=False, distributed="gather")
        all_image = all_gather_rows(image_features, self.gather_with_grad)
        all_text = all_gather_rows(text_features, self.gather_with_grad)
        n = image_features.shape[0]
        positive = torch.arange(n, device=image_features.device) + n * self.rank
        one_way = dict(targets=positive, normalize=False, symmetric=False, distributed="local")
        per_image = functional.info_nce(image_features, all_text, tau, **one_way)
        per_text = functional.info_nce(text_features, all_image, tau, **one_way)
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
            ``'bidir'``); all give the same loss and gradients, so it only is validated.

    Shape:
        image_features, text_features: ``[N, D]`` (used as given); logit_scale (t, exponentiated) and
        logit_bias (b, or None): floats, ``[]`` or ``[1]`` tensors. Output: ``[]``.

    Returns:
        The loss (0-dim), or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    Raises:
        ValueError: an unknown ``dist_impl``, bad shapes, ``world_size`` not matching the process group.

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

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl: expected one of ['bidir', 'shift', 'reduce', 'gather'], got {dist_impl!r}")

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, output_dict=False):
        check_rows(("image_features", "text_features"), (image_features, text_features), None)
        tau = temperature_from_scale(logit_scale)
        bias = 0.0 if logit_bias is None else logit_bias
        if isinstance(bias, Tensor):
            if bias.numel() != 1:
                raise ValueError(
                    f"logit_bias: expected a scalar or a one-element tensor, got shape {tuple(bias.shape)}"
                )
            bias = bias.reshape(())
        if self.world_size > 1:
            if process_world_size() != self.world_size:
                raise ValueError(
                    f"world_size: expected the initialized process group's size {process_world_size()}, "
                    f"got {self.world_size}"
                )
            loss = self._rank_loss(image_features, text_features, tau, bias)
        else:
            loss = functional.siglip(
                image_features, text_features, logit_bias=bias, temperature=tau, normalize=False, distributed="local"
            )
        return {"contrastive_loss": loss} if output_dict else loss

    def _rank_loss(self, image_features: Tensor, text_features: Tensor, tau, bias) -> Tensor:
        """This rank's images against every rank's texts (gradients summed back to their owners)."""
        n = image_features.shape[0]
        texts = all_gather_rows(text_features, with_grad=True)
        pair = torch.arange(n, device=image_features.device) + n * self.rank

        def term(s: Tensor, rows: slice) -> Tensor:
            z = s + bias
            positive = pair[rows, None] == torch.arange(s.shape[1], device=s.device)
            return torch.nn.functional.softplus(torch.where(positive, -z, z)).sum()

        return block_sum(image_features, texts, tau, term) / n

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"
