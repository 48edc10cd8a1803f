"""solo-learn's ``simclr_loss_func`` (github.com/vturrisi/solo-learn, ``solo/losses/simclr.py``): change the import.

    from solo.losses.simclr import simclr_loss_func            # before
    from fastcl.compat.solo_learn import simclr_loss_func       # after

Same ``simclr_loss_func(z, indexes, temperature=0.1)`` and values: ``z`` holds every crop of the batch
(``[N·views, D]``, normalized inside), ``indexes`` the sample id (unsupervised) or class (supervised) of
each crop; row i's positives are the other rows with its index, its negatives the rows with another:
``ℓ_i = −log(Σ_{p∈P(i)} e^{s_ip} / Σ_{j≠i} e^{s_ij})``, averaged over rows. Under DDP every rank
computes this over the rows of all ranks (solo-learn's ``full_gather``), with its gradients (the
earlier ``gather`` variant of this function averaged over this rank's rows only).

Where every row has at most one positive (two crops per sample), this is NT-Xent / SupCon and runs on
fastcl's fused losses; multi-crop or supervised batches (several positives per row) run as row blocks
in PyTorch. One deliberate difference: a row without any positive (a lone crop) makes solo-learn's loss
``inf``; here it is left out of the mean and the loss stays finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl import functional
from fastcl.compat._common import all_gather_rows, check_rows, zero_loss
from fastcl.compat._rowblocks import block_sum, masked_logsumexp
from fastcl.distributed import world_size

__all__ = ["simclr_loss_func"]


def simclr_loss_func(z: Tensor, indexes: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR loss over all crops with solo-learn's signature (Chen et al. 2020, https://arxiv.org/abs/2002.05709).

    Args:
        z: ``[N·views, D]`` projected features of every crop.
        indexes: ``[N·views]`` sample ids (unsupervised) or targets (supervised) of each crop.
        temperature: τ > 0.

    Returns:
        The mean over rows with a positive (0-dim; the global batch under DDP).

    Raises:
        ValueError: ``indexes`` not one entry per row of ``z``.

    Example:
        >>> import torch
        >>> z = torch.randn(12, 16)                       # 4 samples × 3 crops
        >>> indexes = torch.arange(4).repeat(3)
        >>> loss = simclr_loss_func(z, indexes, temperature=0.2)
        >>> loss.shape
        torch.Size([])
    """
    check_rows(("z",), (z,), temperature)
    if indexes.dim() != 1 or indexes.shape[0] != z.shape[0]:
        raise ValueError(f"indexes: expected shape ({z.shape[0]},) (one per row of z), got {tuple(indexes.shape)}")
    indexes = indexes.to(z.device)
    distributed = world_size() > 1
    all_indexes = all_gather_rows(indexes, with_grad=False) if distributed else indexes
    ids = torch.unique(all_indexes, return_inverse=True)[1]
    counts = torch.bincount(ids)
    if counts.max() < 2:
        return zero_loss(z)
    if counts.max() == 2:
        # One positive per row: the log of one positive term is SupCon's L_out with τ_b = τ.
        # Class ids that mean the same on every rank: this rank's slice of the ids of all ranks' rows.
        start = torch.distributed.get_rank() * z.shape[0] if distributed else 0
        own = ids[start : start + z.shape[0]]
        return functional.supcon(
            z[:, None],
            own,
            None,
            temperature,
            base_temperature=temperature,
            distributed="gather" if distributed else "local",
        )
    rows = F.normalize(z, dim=-1)
    rows = all_gather_rows(rows, with_grad=True) if distributed else rows
    return _summed_positives_loss(rows, ids, temperature)


def _summed_positives_loss(z: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """mean over rows with a positive of ``log Σ_{j≠i} e^{s_ij} − log Σ_{p∈P(i)} e^{s_ip}``."""

    def term(s: Tensor, rows: slice) -> Tensor:
        positive = (ids[rows, None] == ids[None, :]) & torch.isfinite(s)  # s = −inf on the row itself
        has_positive = positive.any(dim=1)
        per_row = torch.logsumexp(s, dim=1) - masked_logsumexp(s, positive)
        return torch.where(has_positive, per_row, 0.0).sum()

    with_positive = (torch.bincount(ids)[ids] > 1).sum()
    return block_sum(z, z, temperature, term, self_index=torch.arange(z.shape[0], device=z.device)) / with_positive
