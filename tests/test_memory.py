"""No M×M tensor is ever allocated by the torch backend (forward + backward), measured with torch.profiler.

The same harness run on each loss's naive materialising form (the registry's ``naive``: what lightly,
DirectCLR, SupContrast and open_clip compute) must see an allocation of ~M×M floats, so the check is
known to be able to fail.
This asserts an allocation *size* (a property of the algorithm), never a time.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastcl
from fastcl import registry

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


@pytest.mark.parametrize("loss", list(registry.LOSSES))
def test_no_mxm_allocation_forward_and_backward(loss):
    """Every registered loss at M similarity rows (its registry input maker) stays below a quarter of an
    M×M float32 tile; its naive form does reach it (DCL's naive holds N×N = M×M/4 blocks)."""
    entry = registry.get(loss)
    tensors, targets = entry.make_inputs(M, D)
    tensors = [t.requires_grad_() for t in tensors]
    ours = largest_allocation(lambda: entry.functional(*tensors, backend="torch", **targets).backward())
    assert ours < MM_BYTES / 4, f"largest allocation {ours} B, M×M float32 is {MM_BYTES} B"
    for t in tensors:
        t.grad = None
    tau = entry.default_temperature
    materialised = largest_allocation(lambda: entry.naive(*tensors, temperature=tau, **targets).backward())
    assert materialised >= MM_BYTES / 4, f"the harness missed the naive M×M logits ({materialised} B)"


def test_block_engine_options_allocate_no_mxm():
    """The single-process block-engine path (InfoNCE with explicit targets, one block per pass)."""
    q, k = (torch.randn(M, D).requires_grad_() for _ in range(2))
    targets = torch.randperm(M)
    step = lambda: fastcl.functional.info_nce(q, k, 0.1, targets=targets, symmetric=False, backend="torch").backward()  # noqa: E731
    assert largest_allocation(step) < MM_BYTES / 4
