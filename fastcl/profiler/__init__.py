"""Kernel profiler behind ``fastcl bench``: time, peak memory and TFLOP/s of each loss implementation.

Compares the fastcl backends with the naive materialising loss, ``torch.compile`` of it,
pytorch-metric-learning and inf-cl, next to the matmul ceiling: the loss's own similarity GEMMs timed
alone in the same run. See ``docs/bench.md``.

    >>> from fastcl.profiler import run_bench
    >>> meta, records = run_bench(["nt_xent"], ["naive"], [32], dim=8, repeats=1, isolate="none")
    >>> [(r["impl"], r["status"]) for r in records], records[1]["peak_mem_bytes"] >= 0
    ([('matmul', 'ok'), ('naive', 'ok')], True)
"""

from fastcl.profiler.cli import main
from fastcl.profiler.runner import run_bench

__all__ = ["main", "run_bench"]
