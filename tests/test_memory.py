"""No M×M tensor is ever allocated by the torch backend (forward + backward), measured with torch.profiler.

The same harness run on the naive materialising loss (fastcl.profiler.naive: what lightly, DirectCLR and
SupContrast compute) must see an allocation of ~M×M floats, so the check is known to be able to fail.
This asserts an allocation *size* (a property of the algorithm), never a time.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastcl
from fastcl.profiler import naive

M, D = 4096, 64
FLOAT_BYTES = 4
MM_BYTES = M * M * FLOAT_BYTES


def largest_allocation(step: Callable[[], None]) -> int:
    """Bytes of the largest single CPU allocation made while ``step`` runs.

    The profiler's per-allocation records ("[memory]" events with their byte counts) are read from its
    raw results: ``key_averages()`` only has per-operator net totals, which would hide a large
    temporary that an operator allocates and frees again.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert sizes, "the profiler recorded no allocation"
    return max(sizes)


def _inputs(loss: str):
    gen = torch.Generator().manual_seed(0)
    if loss == "nt_xent":  # M = 2N rows
        shapes = [(M // 2, D), (M // 2, D)]
    elif loss == "info_nce":  # the similarity is N×N: N = M
        shapes = [(M, D), (M, D)]
    else:  # M = N·V rows
        shapes = [(M // 2, 2, D)]
    tensors = [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]
    labels = torch.randint(0, 100, (M // 2,), generator=gen)
    return tensors, labels


def _ours(loss: str, tensors, labels) -> torch.Tensor:
    if loss == "supcon":
        return fastcl.functional.supcon(tensors[0], labels, backend="torch")
    return getattr(fastcl.functional, loss)(*tensors, backend="torch")


def _naive(loss: str, tensors, labels) -> torch.Tensor:
    if loss == "supcon":
        return naive.supcon(tensors[0], labels)
    return getattr(naive, loss)(*tensors)


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "supcon"])
def test_no_mxm_allocation_forward_and_backward(loss):
    tensors, labels = _inputs(loss)
    ours = largest_allocation(lambda: _ours(loss, tensors, labels).backward())
    assert ours < MM_BYTES / 4, f"largest allocation {ours} B, M×M float32 is {MM_BYTES} B"
    for t in tensors:
        t.grad = None
    materialised = largest_allocation(lambda: _naive(loss, tensors, labels).backward())
    # lightly's form holds M×(M−1) logits, the others M×M.
    assert materialised >= M * (M - 1) * FLOAT_BYTES, f"the harness missed the naive M×M logits ({materialised} B)"
