"""solo-learn's ``simclr_loss_func`` (github.com/vturrisi/solo-learn, ``solo/losses/simclr.py``): change the import.

    from solo.losses.simclr import simclr_loss_func            # before
    from fastcl.compat.solo_learn import simclr_loss_func       # after

Same ``simclr_loss_func(z, indexes, temperature=0.1)`` and values: ``z`` holds every crop of the batch
(``[N·views, D]``, normalized inside), ``indexes`` the sample id (unsupervised) or class (supervised) of
each crop; row i's positives are the other rows with its index, its negatives the rows with another:
``ℓ_i = −log(Σ_{p∈P(i)} e^{s_ip} / Σ_{j≠i} e^{s_ij})``, averaged over this rank's rows. Under DDP, as
solo-learn's main branch: this rank's rows against the rows of every rank (solo-learn's ``gather``, whose
backward sums each row's gradient over the ranks), so each rank logs the mean over its own rows and the
values differ between ranks; after DDP's gradient average the parameter gradients are those of the
global mean.

Where every row has at most one positive (two crops per sample), this is NT-Xent / SupCon and runs on
fastcl's block engine; multi-crop or supervised batches (several positives per row, the log of their
summed exponentials) run as row blocks in PyTorch; one read of the largest index count picks between
them (one host sync per call, until the engine computes the summed-positives formula:
docs/migration.md; solo-learn's own loss does not sync: this read is fastcl's).

One deliberate difference: a row without any positive (a lone crop) makes solo-learn's loss ``inf``;
here it is left out of the mean and the loss stays finite.
NaN or Inf in ``z`` gives NaN, as solo-learn, without a raise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from fastcl.compat._common import all_gather_rows, check_rows, class_ids, matches, plan_loss
from fastcl.compat._rowblocks import block_sum, masked_logsumexp
from fastcl.distributed import world_size
from fastcl.engine import Pass, Plan

__all__ = ["simclr_loss_func"]

# [rows of lower ranks; this rank's rows; rows of higher ranks]: this rank's rows against all of them,
# positives where the per-row ids are equal, the anchor's own row left out.
_RANK_PLAN = Plan(passes=(Pass((1, 2), (0, 3), "labels", exclude_self=True),), labels="rows").encode()


def simclr_loss_func(z: Tensor, indexes: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR loss over all crops with solo-learn's signature (Chen et al. 2020, https://arxiv.org/abs/2002.05709).

    Args:
        z: ``[N·views, D]`` projected features of every crop.
        indexes: ``[N·views]`` sample ids (unsupervised) or targets (supervised) of each crop.
        temperature: τ > 0.

    Returns:
        The mean over this rank's rows with a positive (0-dim).

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
    m, rank = z.shape[0], dist.get_rank() if distributed else 0
    all_indexes = all_gather_rows(indexes, with_grad=False) if distributed else indexes
    ids = class_ids(all_indexes)
    keys = all_gather_rows(z, with_grad=True) if distributed else z
    parts = [m * rank, m, keys.shape[0] - m * (rank + 1)]
    # The one host read: the largest class, which picks the formula's algorithm (module docstring).
    if bool(matches(ids, ids).max() <= 2):
        # At most one positive per row: the log of one positive term is SupCon's L_out with τ_b = τ
        # (rows without a positive left out; none at all: 0).
        return plan_loss(keys, _RANK_PLAN, parts, temperature, loss="supcon", labels=ids, normalize=True)
    own = slice(m * rank, m * (rank + 1))
    return _summed_positives_loss(F.normalize(keys, dim=-1), own, ids, temperature)


def _summed_positives_loss(keys: Tensor, own: slice, ids: Tensor, temperature: float) -> Tensor:
    """mean over this rank's rows with a positive of ``log Σ_{j≠i} e^{s_ij} − log Σ_{p∈P(i)} e^{s_ip}``."""
    anchor_ids = ids[own]

    def term(s: Tensor, rows: slice) -> Tensor:
        positive = (anchor_ids[rows, None] == ids[None, :]) & ~torch.isneginf(s)  # s = −inf on the row itself
        has_positive = positive.any(dim=1)
        per_row = torch.logsumexp(s, dim=1) - masked_logsumexp(s, positive)
        return torch.where(has_positive, per_row, 0.0).sum()

    with_positive = (matches(anchor_ids, ids) > 1).sum()
    self_index = torch.arange(own.start, own.stop, device=keys.device)
    return block_sum(keys[own], keys, temperature, term, self_index=self_index) / with_positive
