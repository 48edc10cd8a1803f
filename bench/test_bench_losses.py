"""pytest-benchmark suite: fwd+bwd of each loss implementation, the same code as ``fastcl bench``.

    python -m pytest bench/test_bench_losses.py --benchmark-only
    FASTCL_BENCH_SIZES=1024 FASTCL_BENCH_IMPLS=torch,naive python -m pytest bench --benchmark-only

Each case first measures its peak extra memory in a worker subprocess (``fastcl.profiler.measure.run_case``,
with the default per-case memory limit); a case that does not fit is skipped as OOM before anything big is
allocated in the pytest process. Memory, FLOPs and TFLOP/s go into the benchmark's ``extra_info``
(``--benchmark-json`` keeps them). Defaults: M ∈ {1024, 4096, 8192}, D = 128, fp32, CPU (CUDA if present).
"""
from __future__ import annotations

import os

import pytest
import torch

from fastcl.profiler.cases import DTYPES, LOSSES, Case, ImplUnavailable, build_loss_fn, flops, make_inputs
from fastcl.profiler.measure import run_case, step
from fastcl.profiler.runner import default_mem_limit

SIZES = [int(m) for m in os.environ.get("FASTCL_BENCH_SIZES", "1024,4096,8192").split(",")]
IMPLS = os.environ.get("FASTCL_BENCH_IMPLS", "torch,naive,compile,pml").split(",")
DIM = int(os.environ.get("FASTCL_BENCH_DIM", "128"))
ROUNDS = int(os.environ.get("FASTCL_BENCH_ROUNDS", "3"))
DTYPE = "fp32"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", LOSSES)
def test_fwd_bwd(benchmark, loss, impl, m):
    try:
        fn = build_loss_fn(loss, impl, None, DEVICE)
    except ImplUnavailable as why:
        pytest.skip(str(why))
    memory = run_case(Case(loss, impl, m, DIM, None, DTYPE, DEVICE, repeats=0, warmup=1,
                           mem_limit=default_mem_limit(DEVICE)))
    if memory["status"] != "ok":
        pytest.skip(f"{memory['status']}: {memory['note']}")
    inputs = make_inputs(loss, m, DIM, DTYPES[DTYPE], DEVICE)
    leaves = [t for t in inputs if t.requires_grad]
    device = torch.device(DEVICE)
    benchmark.group = f"{loss} M={m}"
    benchmark.pedantic(step, args=(fn, inputs, leaves, device), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    model_flops = flops(loss, m, DIM)
    benchmark.extra_info.update(
        peak_mem_bytes=memory["peak_mem_bytes"], flops=model_flops,
        tflops=model_flops / benchmark.stats.stats.median / 1e12, device=DEVICE, dim=DIM, dtype=DTYPE,
    )
