"""fastcl.GradCache under DistributedDataParallel, multi-process on CPU with gloo (world 2 and 3).

Each world is spawned once; its ranks run every registered loss × {gather, ring}: DDP-wrapped towers (two
for InfoNCE and SigLIP), a learnable temperature (SigLIP: logit scale and bias) in the loss, uneven local
batches so the ranks run different numbers of chunks, one GradCache step. The tests compare every rank's
loss and gradients with single-process training on the rank-major concatenated batch (float64, ≤ 1e-10
relative), and count DDP's all-reduces: one per gradient bucket per step, as a plain DDP step does.
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
from loss_cases import relative_error
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import fastcl
from fastcl import registry

LOCAL_SIZES = {2: [7, 4], 3: [5, 2, 6]}  # with CHUNK = 3 the ranks run 3/2 and 2/1/3 chunks per input
CHUNK = 3
SCHEMES = ("gather", "ring")
TWO_TOWERS = ("info_nce", "siglip")
D_IN, D_OUT = 6, 5


def make_step(name: str, scheme: str):
    """Identical towers and loss on every rank and in the single-process reference (float64)."""
    torch.manual_seed(0)
    entry = registry.get(name)
    towers = [
        nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_OUT)).double()
        for _ in range(2 if name in TWO_TOWERS else 1)
    ]
    if name == "siglip":
        scale = nn.Parameter(torch.tensor(10.0, dtype=torch.float64))
        loss_module = entry.module(scale, nn.Parameter(torch.tensor(-10.0, dtype=torch.float64)), distributed=scheme)
    else:
        tau = nn.Parameter(torch.tensor(entry.default_temperature, dtype=torch.float64))
        loss_module = entry.module(temperature=tau, distributed=scheme)
    if entry.views_input:

        def loss_fn(z1, z2, labels):
            return loss_module(torch.stack([z1, z2], 1), labels)
    else:
        loss_fn = loss_module
    return towers, loss_module, loss_fn


def global_batch(world: int):
    gen = torch.Generator().manual_seed(world)
    n = sum(LOCAL_SIZES[world])
    x1, x2 = (torch.randn(n, D_IN, generator=gen, dtype=torch.float64) for _ in range(2))
    return x1, x2, torch.randint(0, 3, (n,), generator=gen)


def _counting_hook(counter: list):
    def hook(state, bucket):
        counter.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def _rank_step(name: str, scheme: str, rank: int, world: int, cached: bool) -> dict:
    towers, loss_module, loss_fn = make_step(name, scheme)
    x1, x2, labels = global_batch(world)
    start = sum(LOCAL_SIZES[world][:rank])
    rows = slice(start, start + LOCAL_SIZES[world][rank])
    kwargs = {"labels": labels[rows]} if registry.get(name).views_input else {}
    wrapped, allreduces = [], []
    for tower in towers:
        ddp = DistributedDataParallel(tower)
        counter = []
        ddp.register_comm_hook(None, _counting_hook(counter))
        wrapped.append(ddp)
        allreduces.append(counter)
    encoders = wrapped if len(wrapped) == 2 else wrapped[0]
    if cached:
        loss = fastcl.GradCache(encoders, loss_fn, CHUNK)(x1[rows], x2[rows], **kwargs)
    else:  # a plain DDP step, for the count of all-reduces
        both = wrapped * (2 // len(wrapped))
        loss = loss_fn(both[0](x1[rows]), both[1](x2[rows]), **kwargs)
        loss.backward()
    # The loss's own parameters live outside DDP: average their gradients as DDP averages the towers'.
    for p in loss_module.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    return {
        "loss": loss.detach(),
        "grads": [p.grad.clone() for m in [*towers, loss_module] for p in m.parameters()],
        "allreduces": [len(c) for c in allreduces],
    }


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name in registry.LOSSES:
            for scheme in SCHEMES:
                for cached in (True, False):
                    results[(name, scheme, cached)] = _rank_step(name, scheme, rank, world, cached)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def world_results(world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", __name__])
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(world, port, out_dir), nprocs=world, join=True, start_method="forkserver")
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]


def single_process(name: str, world: int):
    towers, loss_module, loss_fn = make_step(name, "local")
    x1, x2, labels = global_batch(world)
    kwargs = {"labels": labels} if registry.get(name).views_input else {}
    both = towers * (2 // len(towers))
    loss = loss_fn(both[0](x1), both[1](x2), **kwargs)
    loss.backward()
    return loss.detach(), [p.grad for m in [*towers, loss_module] for p in m.parameters()]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_ddp_step_equals_single_process_on_the_global_batch(name, scheme, world):
    expected_loss, expected_grads = single_process(name, world)
    for rank, results in enumerate(world_results(world)):
        got = results[(name, scheme, True)]
        assert relative_error(got["loss"], expected_loss, floor=1.0) <= 1e-10, rank
        for i, (a, b) in enumerate(zip(got["grads"], expected_grads)):
            assert relative_error(a, b) <= 1e-10, (rank, i, relative_error(a, b))


@pytest.mark.parametrize("world", [2, 3])
def test_gradients_are_all_reduced_once_per_step(world):
    """Every chunk but each encoder's last runs under no_sync(): DDP all-reduces each bucket once, as in
    a plain DDP step, although the ranks run different numbers of chunks."""
    for results in world_results(world):
        for name in registry.LOSSES:
            for scheme in SCHEMES:
                cached, plain = results[(name, scheme, True)], results[(name, scheme, False)]
                assert cached["allreduces"] == plain["allreduces"] and min(plain["allreduces"]) >= 1, (name, scheme)
