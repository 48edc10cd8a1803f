"""pytest-benchmark suite: fwd+bwd of each loss implementation, the same code as ``fastcl bench``.

    python -m pytest bench/test_bench_losses.py --benchmark-only
    FASTCL_BENCH_SIZES=1024 FASTCL_BENCH_IMPLS=torch,naive python -m pytest bench --benchmark-only

Each (impl, M) first measures its peak extra memory in a worker process (``fastcl.profiler.runner``'s
workers, with the default per-case memory limit); a case that does not fit is skipped as OOM before anything
big is allocated in the pytest process. Memory, FLOPs and TFLOP/s go into the benchmark's ``extra_info``
(``--benchmark-json`` keeps them). Defaults: M ∈ {1024, 4096, 8192}, D = 128, fp32, CPU (CUDA if present).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from fastcl.profiler.cases import LOSSES, Case, ImplUnavailable, build_workload, loss_entry
from fastcl.profiler.measure import step
from fastcl.profiler.runner import default_mem_limit, measure_in_workers

SIZES = [int(m) for m in os.environ.get("FASTCL_BENCH_SIZES", "1024,4096,8192").split(",")]
IMPLS = os.environ.get("FASTCL_BENCH_IMPLS", "torch,naive,compile,pml").split(",")
DIM = int(os.environ.get("FASTCL_BENCH_DIM", "128"))
ROUNDS = int(os.environ.get("FASTCL_BENCH_ROUNDS", "3"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(loss: str, impl: str, m: int) -> Case:
    return Case(loss, impl, m, DIM, device=DEVICE, repeats=0, mem_limit=default_mem_limit(DEVICE))


@functools.lru_cache(maxsize=None)
def _memory(impl: str) -> dict:
    """Peak memory of every (loss, M) of ``impl``, measured in one worker process."""
    cases = [_case(loss, impl, m) for loss in LOSSES for m in SIZES]
    return {(c.loss, c.m): result for c, result in measure_in_workers(cases, None, lambda case: None)}


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
def test_fwd_bwd(benchmark, loss, impl, m):
    case = _case(loss, impl, m)
    try:
        build_workload(Case(loss, impl, 2, 1, device=DEVICE))  # cheap: says whether the impl can run here
    except ImplUnavailable as why:
        pytest.skip(str(why))
    memory = _memory(impl)[(loss, m)]
    if memory["status"] != "ok":
        pytest.skip(f"{memory['status']}: {memory['note']}")
    call, leaves = build_workload(case)
    benchmark.group = f"{loss} M={m}"
    benchmark.pedantic(step, args=(call, leaves, torch.device(DEVICE)), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    model_flops = loss_entry(loss).flops(m, DIM)
    benchmark.extra_info.update(
        peak_mem_bytes=memory["peak_mem_bytes"],
        flops=model_flops,
        tflops=model_flops / benchmark.stats.stats.median / 1e12,
        device=DEVICE,
        dim=DIM,
        dtype=case.dtype,
    )
