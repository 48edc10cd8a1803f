"""Kernel profiler behind ``fastcl bench``: time, peak memory and TFLOP/s of each loss implementation.

Compares the fastcl backends with the naive materialising loss (:mod:`fastcl.profiler.naive`),
``torch.compile`` of it, pytorch-metric-learning and inf-cl, next to the rate of a plain matmul of the
same FLOPs measured in the same run. See ``docs/bench.md``.

    >>> from fastcl.profiler import run_bench
    >>> meta, records = run_bench(["ntxent"], ["naive"], [32], dim=8, repeats=1, progress=False)
    >>> records[0]["status"], records[0]["peak_mem_bytes"] >= 0
    ('ok', True)
"""
from fastcl.profiler.cli import main
from fastcl.profiler.runner import run_bench

__all__ = ["main", "run_bench"]
