"""InfoNCE with a queue (docs/spec.md, "InfoNCE with a queue (MoCo)") and fastcl.MemoryBank against MoCo's code.

``moco_logits`` and ``moco_enqueue`` re-state, in float64 and with the queue stored as rows, what
facebookresearch/moco (moco/builder.py, ``MoCo.forward`` and ``MoCo._dequeue_and_enqueue``) computes:
positive logits ``einsum("nc,nc->n", q, k)``, negative logits ``einsum("nc,ck->nk", q, queue)``,
concatenated, divided by T, cross-entropy against label 0; the queue's columns ``ptr : ptr + B``
replaced by the gathered keys and the pointer advanced modulo K. Several training steps run both side by
side (values, dL/dq, dL/dτ and the queue after every enqueue) on odd shapes, at T = 0.07 and 0.01, on
every backend that runs here (Triton through TRITON_INTERPRET=1).
"""

from __future__ import annotations

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

import fastcl
from fastcl import dispatch

BACKENDS = [b for b in ("torch", "triton") if dispatch.unavailable_reason(b, torch.device("cpu")) is None]
RTOL = 1e-10  # float64


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue_columns: torch.Tensor, T) -> torch.Tensor:
    """MoCo.forward's logits (q, k already normalized; the queue as MoCo stores it, [D, K])."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue_columns)
    return torch.cat([l_pos, l_neg], dim=1) / T


def moco_loss(q, k, queue_columns, T, reduction="mean"):
    logits = moco_logits(q, k, queue_columns, T)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long), reduction=reduction)


def moco_enqueue(queue_columns: torch.Tensor, pointer: int, keys: torch.Tensor) -> int:
    """MoCo._dequeue_and_enqueue on one process (K a multiple of B, as MoCo asserts)."""
    batch = keys.shape[0]
    assert queue_columns.shape[1] % batch == 0
    queue_columns[:, pointer : pointer + batch] = keys.T
    return (pointer + batch) % queue_columns.shape[1]


@pytest.mark.parametrize("T", [0.07, 0.01])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_match_moco(backend, T):
    n, dim, size = 5, 7, 15  # odd shapes; K = 3·B as MoCo requires
    gen = torch.Generator().manual_seed(int(T * 100))
    bank = fastcl.MemoryBank(size, dim, dtype=torch.float64, generator=gen)
    moco_queue = bank.keys.T.clone()  # MoCo's [D, K] buffer holding the same normalized random keys
    moco_pointer = 0
    loss_fn = fastcl.InfoNCELoss(temperature=T, symmetric=False, backend=backend)
    for step in range(4):  # the pointer wraps around after three steps
        q_raw = torch.randn(n, dim, generator=gen, dtype=torch.float64) * (step + 1)
        k = F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
        tau = torch.tensor(T, dtype=torch.float64, requires_grad=True)
        q = q_raw.clone().requires_grad_()
        loss = loss_fn(q, k, temperature=tau, queue=bank.keys)
        bank.enqueue(k)  # before the backward, as MoCo (the loss copied what it used)
        loss.backward()

        q_ref, tau_ref = q_raw.clone().requires_grad_(), torch.tensor(T, dtype=torch.float64, requires_grad=True)
        expected = moco_loss(F.normalize(q_ref, dim=1), k, moco_queue.clone(), tau_ref)
        expected.backward()
        moco_pointer = moco_enqueue(moco_queue, moco_pointer, k)

        assert relative_error(loss.detach(), expected.detach()) <= RTOL, step
        assert relative_error(q.grad, q_ref.grad) <= RTOL, step
        assert relative_error(tau.grad, tau_ref.grad) <= RTOL, step
        assert torch.equal(bank.keys, moco_queue.T) and int(bank.pointer) == moco_pointer, step


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_negatives_add_the_other_keys(backend):
    """batch_negatives=True: the negatives are the batch's other keys and the queue (logits [q·kᵀ | q·queueᵀ])."""
    gen = torch.Generator().manual_seed(3)
    q_raw, k_raw = (torch.randn(6, 9, generator=gen, dtype=torch.float64) for _ in range(2))
    queue = torch.randn(11, 9, generator=gen, dtype=torch.float64)
    q, k = q_raw.clone().requires_grad_(), k_raw.clone().requires_grad_()
    loss = fastcl.functional.info_nce(q, k, 0.05, symmetric=False, queue=queue, batch_negatives=True, backend=backend)
    loss.backward()
    q_ref, k_ref = q_raw.clone().requires_grad_(), k_raw.clone().requires_grad_()
    unit = [F.normalize(x, dim=1) for x in (q_ref, k_ref, queue)]
    logits = torch.cat([unit[0] @ unit[1].T, unit[0] @ unit[2].T], dim=1) / 0.05
    expected = F.cross_entropy(logits, torch.arange(6))
    expected.backward()
    assert relative_error(loss.detach(), expected.detach()) <= RTOL
    assert relative_error(q.grad, q_ref.grad) <= RTOL and relative_error(k.grad, k_ref.grad) <= RTOL


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_queue_reduction_and_weight(reduction):
    gen = torch.Generator().manual_seed(4)
    q_raw = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    k, queue = (F.normalize(torch.randn(m, 8, generator=gen, dtype=torch.float64), dim=1) for m in (5, 10))
    weight = torch.rand(5, generator=gen, dtype=torch.float64)
    q = q_raw.clone().requires_grad_()
    out = fastcl.functional.info_nce(q, k, 0.1, symmetric=False, queue=queue, reduction=reduction, weight=weight)
    q_ref = q_raw.clone().requires_grad_()
    per_query = moco_loss(F.normalize(q_ref, dim=1), k, queue.T, 0.1, reduction="none") * weight
    expected = per_query.sum() if reduction == "sum" else per_query
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert out.shape == expected.shape
    assert relative_error(out.detach(), expected.detach()) <= RTOL
    assert relative_error(q.grad, q_ref.grad) <= RTOL


def test_queue_is_not_the_batch_as_keys():
    """The issue's trap: keys = cat[k, queue] also makes the other batch keys negatives — not MoCo's loss."""
    gen = torch.Generator().manual_seed(5)
    q, k, queue = (torch.randn(m, 8, generator=gen, dtype=torch.float64) for m in (6, 6, 12))
    moco = fastcl.functional.info_nce(q, k, 0.07, symmetric=False, queue=queue)
    concatenated = fastcl.functional.info_nce(q, torch.cat([k, queue]), 0.07, symmetric=False)
    with_batch = fastcl.functional.info_nce(q, k, 0.07, symmetric=False, queue=queue, batch_negatives=True)
    expected = moco_loss(F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1).T, 0.07)
    assert relative_error(moco, expected) <= RTOL
    assert relative_error(with_batch, concatenated) <= RTOL and (concatenated - moco).abs() > 1e-3


@pytest.mark.parametrize(
    "call, exception, parts",
    [
        (lambda q: fastcl.functional.info_nce(q, q, queue=q), ValueError, ["queue", "symmetric=False"]),
        (lambda q: fastcl.functional.info_nce(q, q, symmetric=False, queue=q[:, :3]), ValueError, ["queue", "(4, 3)"]),
        (
            lambda q: fastcl.functional.info_nce(q, q, symmetric=False, queue=q, distributed="ring"),
            ValueError,
            ["distributed", "'ring'"],
        ),
        (lambda q: fastcl.functional.info_nce(q, q, symmetric=False, queue=q.tolist()), TypeError, ["queue", "list"]),
        (lambda q: fastcl.MemoryBank(0, 4), ValueError, ["size", "0"]),
        (lambda q: fastcl.MemoryBank(8, 4).enqueue(q[:, :3]), ValueError, ["keys", "[B, 4]", "(4, 3)"]),
    ],
    ids=["symmetric", "queue-dim", "ring", "queue-list", "bank-size", "enqueue-dim"],
)
def test_bad_queue_input_names_the_argument(call, exception, parts):
    with pytest.raises(exception) as info:
        call(torch.randn(4, 8))
    message = str(info.value)
    assert message.startswith(parts[0]), message
    assert all(part in message for part in parts[1:]), message


def test_memory_bank_fifo_wraps_and_keeps_the_newest():
    bank = fastcl.MemoryBank(6, 2, dtype=torch.float64)
    rows = F.normalize(torch.randn(20, 2, dtype=torch.float64), dim=1)
    bank.enqueue(rows[:4])
    bank.enqueue(rows[4:8])  # wraps: rows 4, 5 at slots 4, 5; rows 6, 7 at slots 0, 1
    assert torch.equal(bank.keys, torch.cat([rows[6:8], rows[2:6]])) and int(bank.pointer) == 2
    bank.enqueue(rows[8:17])  # more than K: the newest 6 (rows 11..16) land in FIFO order from slot (2 + 3) % 6
    expected = torch.empty_like(bank.keys)
    for i, row in enumerate(rows[11:17]):
        expected[(5 + i) % 6] = row
    assert torch.equal(bank.keys, expected) and int(bank.pointer) == (2 + 9) % 6


def test_memory_bank_state_dict_round_trip():
    bank = fastcl.MemoryBank(8, 3)
    bank.enqueue(torch.randn(5, 3))
    restored = fastcl.MemoryBank(8, 3)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.keys, bank.keys) and int(restored.pointer) == 5
    assert set(bank.state_dict()) == {"bank", "pointer"}


def _enqueue_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bank = fastcl.MemoryBank(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for step in range(3):
            bank.enqueue(
                torch.randn(2, 3, generator=torch.Generator().manual_seed(10 * step + rank), dtype=torch.float64)
            )
        torch.save({"keys": bank.keys, "pointer": bank.pointer}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_memory_bank_enqueues_every_ranks_keys():
    """Under DDP every rank enqueues the rank-major gathered keys (MoCo's concat_all_gather): equal banks."""
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_enqueue_rank, args=(world, port, out_dir), nprocs=world, join=True, start_method="spawn")
        results = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
    expected = fastcl.MemoryBank(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        keys = [
            torch.randn(2, 3, generator=torch.Generator().manual_seed(10 * step + r), dtype=torch.float64)
            for r in range(world)
        ]
        expected.enqueue(torch.cat(keys))
    for result in results:
        assert torch.equal(result["keys"], expected.keys) and int(result["pointer"]) == int(expected.pointer)
