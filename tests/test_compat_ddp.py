"""fastcl.compat under DDP: each peer flag gives the peer's per-rank loss and DDP-averaged gradients.

Two gloo ranks on CPU, equal local batches (the peers assume them). On every rank a tiny linear layer
shared by the ranks (as DDP keeps it) maps this rank's inputs to embeddings, and a shared logit scale
or temperature parameter is used where the peer has one; every rank back-propagates its loss and the
parameter gradients are averaged over the ranks, as DDP does. The peers are the transcriptions in
``test_compat.py`` and open_clip 3.3.0's own ``loss.py`` (``tests/peers``) running their own
collectives (torch.distributed.nn.all_gather, open_clip's neighbour exchanges, lightly's GatherLayer,
plain all_gather), in float64; fastcl must match to 1e-9 relative on every rank.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from loss_cases import relative_error
from test_compat import (
    RTOL,
    LightlyMemoryBank,
    _LightlyGatherLayer,
    directclr_reference,
    lightly_bank_reference,
    lightly_dcl_reference,
    lightly_mises_fisher_weights,
    lightly_reference,
    open_clip_peer,
    solo_reference,
)

from fastcl.compat import directclr, inf_cl, lightly, open_clip, solo_learn

WORLD, N_LOCAL, D_IN, D_OUT = 2, 5, 6, 7


def _inputs(rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    return tuple(torch.randn(N_LOCAL, D_IN, generator=gen, dtype=torch.float64) for _ in range(2))


def _step(loss_fn, rank: int, seed: int, scale_init: float, normalize: bool):
    """Loss of this rank and the DDP-averaged gradients of the shared weight and scale."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_IN, D_OUT, generator=gen, dtype=torch.float64).requires_grad_()
    scale = torch.tensor(scale_init, dtype=torch.float64, requires_grad=True)
    a, b = _inputs(rank, seed)
    za, zb = a @ weight, b @ weight
    if normalize:
        za, zb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
    loss = loss_fn(za, zb, scale)
    loss.backward()
    grads = []
    for p in (weight, scale):
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(g)
        grads.append(g / WORLD)
    return loss.detach(), grads


def _cases():
    """name → (ours, theirs, initial scale, normalize the embeddings first)."""
    cases = {}
    for local_loss in (False, True):
        for with_grad in (False, True):
            name = f"open_clip-local_loss={local_loss}-gather_with_grad={with_grad}"
            rank = dist.get_rank()
            flags = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=WORLD)
            ours, theirs = open_clip.ClipLoss(**flags), open_clip_peer.ClipLoss(**flags)
            cases[name] = (
                lambda a, b, s, ours=ours: ours(a, b, s),
                lambda a, b, s, theirs=theirs: theirs(a, b, s),
                1 / 0.07,
                True,
            )
    rank = dist.get_rank()
    for dist_impl in ("gather", "shift", "bidir", "reduce"):  # open_clip's four exchanges: one value
        ours = open_clip.SigLipLoss(rank=rank, world_size=WORLD, dist_impl=dist_impl)
        theirs = open_clip_peer.SigLipLoss(rank=rank, world_size=WORLD, dist_impl=dist_impl)
        cases[f"open_clip-SigLipLoss-{dist_impl}"] = (
            lambda a, b, s, ours=ours: ours(a, b, s, -2.0),
            lambda a, b, s, theirs=theirs: theirs(a, b, s, -2.0),
            5.0,
            True,
        )
    for gather in (False, True):
        ours = lightly.NTXentLoss(temperature=0.3, gather_distributed=gather)
        cases[f"lightly-gather_distributed={gather}"] = (
            lambda a, b, s, ours=ours: ours(a, b),
            lambda a, b, s, g=gather: lightly_reference(a, b, 0.3, g),
            1.0,
            False,
        )
    for weighted in (False, True):
        ours = (lightly.DCLWLoss if weighted else lightly.DCLLoss)(0.3, gather_distributed=True)
        weight_fn = lightly_mises_fisher_weights if weighted else None
        cases[f"lightly-{'DCLW' if weighted else 'DCL'}-gather_distributed=True"] = (
            lambda a, b, s, ours=ours: ours(a, b),
            lambda a, b, s, w=weight_fn: lightly_dcl_reference(a, b, 0.3, w, gather_distributed=True),
            1.0,
            False,
        )
    torch.manual_seed(11)  # the same bank on every rank and on both sides
    ours_bank = lightly.NTXentLoss(0.3, (7, D_OUT), gather_distributed=True)
    torch.manual_seed(11)
    theirs_bank = LightlyMemoryBank((7, D_OUT), gather_distributed=True).double()
    ours_bank.double()

    def theirs_bank_loss(a, b):
        return lightly_bank_reference(theirs_bank, a, b, 0.3)

    cases["lightly-memory-bank-gather_distributed=True"] = (  # a first call enqueues both ranks' out1
        lambda a, b, s: (ours_bank(a, b), ours_bank(a, b))[1],
        lambda a, b, s: (theirs_bank_loss(a, b), theirs_bank_loss(a, b))[1],
        1.0,
        False,
    )
    cases["inf_cl"] = (
        lambda a, b, s: inf_cl.cal_inf_loss(a, b, scale=s, head_dim=D_OUT),
        lambda a, b, s: _inf_cl_ring_reference(a, b, s),
        1 / 0.05,
        True,
    )
    cases["directclr-infoNCE"] = (
        lambda a, b, s: directclr.infoNCE(a, b, 0.2),
        lambda a, b, s: directclr_reference(_full_gather(a), _full_gather(b), 0.2),  # DirectCLR's gather_from_all
        1.0,
        False,
    )
    for name, classes in (("solo-learn-2-crops", None), ("solo-learn-supervised", 3)):
        cases[name] = (
            lambda a, b, s, c=classes: solo_learn.simclr_loss_func(torch.cat([a, b]), _solo_indexes(c), 0.2),
            lambda a, b, s, c=classes: solo_reference(
                torch.cat([a, b]), _solo_indexes(c), 0.2, _full_gather, dist.get_rank()
            ),
            1.0,
            False,
        )
    return cases


def _solo_indexes(classes):
    """Global sample ids of this rank's two crops, or their classes."""
    ids = torch.arange(N_LOCAL) + N_LOCAL * dist.get_rank()
    return (ids if classes is None else ids % classes).repeat(2)


def _full_gather(x):
    """solo-learn's ``gather`` (solo/utils/misc.py ``GatherLayer``) and DirectCLR's ``gather_from_all``
    (directclr/utils.py): their gather layers are the same code as lightly's GatherLayer."""
    return torch.cat(_LightlyGatherLayer.apply(x))


class _InfClGradientGather(torch.autograd.Function):
    """inf_cl/ring.py ``GradientGather`` (inf_cl 1.2.1)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, dx):
        dist.all_reduce(dx)
        return dx


def _inf_cl_ring_reference(q, k, scale):
    """inf_cl ``cal_inf_loss`` under a process group (inf_cl/ring.py): this rank's scaled q against
    the k of every rank (the ring), numerator ``q · k[labels]`` of this rank's k, key gradients summed
    over ranks (``InfProb``'s backward passes dk around the ring), the scale's gradient all-reduced."""
    scale = _InfClGradientGather.apply(scale)
    keys = torch.cat(_LightlyGatherLayer.apply(k))
    q = scale * q
    return (torch.logsumexp(q @ keys.T, dim=1) - torch.einsum("md,md->m", q, k)).mean()


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for seed, (name, (ours, theirs, scale, normalize)) in enumerate(_cases().items()):
            results[name] = (_step(ours, rank, seed, scale, normalize), _step(theirs, rank, seed, scale, normalize))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def _world_results() -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multiprocessing.set_forkserver_preload(["torch", __name__])
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(port, out_dir), nprocs=WORLD, join=True, start_method="forkserver")
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(WORLD)]


CASE_NAMES = [
    *(f"open_clip-local_loss={ll}-gather_with_grad={wg}" for ll in (False, True) for wg in (False, True)),
    "lightly-gather_distributed=False",
    "lightly-gather_distributed=True",
    "inf_cl",
    "directclr-infoNCE",
    "solo-learn-2-crops",
    "solo-learn-supervised",
    "lightly-DCL-gather_distributed=True",
    "lightly-DCLW-gather_distributed=True",
    *(f"open_clip-SigLipLoss-{impl}" for impl in ("gather", "shift", "bidir", "reduce")),
    "lightly-memory-bank-gather_distributed=True",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_peer_flags_under_ddp(name):
    losses = []
    for rank, results in enumerate(_world_results()):
        (loss, grads), (expected, expected_grads) = results[name]
        assert relative_error(loss, expected) <= RTOL, (rank, loss.item(), expected.item())
        for g, h in zip(grads, expected_grads):
            assert relative_error(g, h) <= RTOL, rank
        losses.append(loss)
    per_rank = (
        "lightly-gather_distributed=True",
        "open_clip-local_loss=True",
        "lightly-DCL",
        "open_clip-Sig",
        "solo-learn",
    )
    if name.startswith(per_rank):
        assert losses[0] != losses[1]  # per-rank values, as the peer reports them
