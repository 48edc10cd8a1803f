"""Runs a grid of cases and turns raw measurements into records (ratios, TFLOP/s, matmul ceiling).

    >>> meta, records = run_bench(["infonce"], ["naive", "infcl"], [64], dim=16, repeats=1, progress=False)
    >>> [(r["impl"], r["status"]) for r in records]
    [('naive', 'ok'), ('infcl', 'skipped')]
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from fastcl.profiler.cases import GEMM_UNITS, Case, ImplUnavailable, build_loss_fn, check_size, flops
from fastcl.profiler.measure import run_case
from fastcl.profiler.report import RECORD_FIELDS

__all__ = ["run_bench", "environment", "default_mem_limit"]

SIZE_MAPPING = (
    "M = rows of the similarity matrix; ntxent: z1, z2 of [M/2, D]; infonce: q, k of [M, D] (M×M logits); "
    "supcon: features [M/2, 2, D] with labels from 10 classes"
)
FLOP_MODEL = (
    "SPEC §6: GEMM-unit = 2·M·M·D'; ntxent and supcon 3 units, infonce 4 units per fwd+bwd; "
    "TFLOP/s = model FLOPs / median fwd+bwd time"
)
MEMORY_METHOD = {
    "cpu": "peak RSS of one fwd+bwd minus RSS right before it (fresh subprocess per case, VmHWM reset via "
    "/proc/self/clear_refs, malloc mmap threshold 64 KiB + malloc_trim before the call)",
    "cuda": "torch.cuda.max_memory_allocated during the call minus memory_allocated before it",
}
_PEERS = ("pytorch-metric-learning", "triton", "inf-cl")


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Provenance of a run: device, versions, date."""
    import fastcl

    peers = {}
    for name in _PEERS:
        try:
            peers[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    is_cuda = device.startswith("cuda")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if is_cuda else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if is_cuda else None,
        "fastcl": getattr(fastcl, "__version__", "unknown"),
        "platform": platform.platform(),
        "peers": peers,
        "size_mapping": SIZE_MAPPING,
        "flop_model": FLOP_MODEL,
        "memory_method": MEMORY_METHOD["cuda" if is_cuda else "cpu"],
    }


def default_mem_limit(device: str) -> Optional[int]:
    """Half of the memory available now (Linux CPU runs), so a runaway case fails as OOM in its own process
    instead of waking the kernel's OOM killer, which may pick any process on the machine."""
    meminfo = Path("/proc/meminfo")
    if device != "cpu" or not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // 2
    return None


def run_bench(
    losses: Sequence[str],
    impls: Sequence[str],
    sizes: Sequence[int],
    *,
    dim: int = 128,
    sub_dim: Optional[int] = None,
    dtype: str = "fp32",
    device: str = "cpu",
    repeats: int = 10,
    warmup: int = 1,
    mem_limit: Optional[int] = -1,
    profile_dir: Optional[str] = None,
    timeout: Optional[float] = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Measures every (loss, M, impl); returns (meta, records) with every key of RECORD_FIELDS.

    ``mem_limit``: bytes per case; -1 (default) = :func:`default_mem_limit`, None = no limit.
    """
    if mem_limit == -1:
        mem_limit = default_mem_limit(device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for loss in losses:
        for m in sizes:
            check_size(loss, m)
    effective_dim = sub_dim or dim
    grid = [(loss, m, impl) for loss in losses for m in sizes for impl in impls]
    records = []
    for loss, m, impl in tqdm(grid, desc="fastcl bench", disable=not progress, file=sys.stderr):
        trace = None if profile_dir is None else str(Path(profile_dir) / f"{loss}-{impl}-M{m}.json")
        case = Case(loss, impl, m, dim, sub_dim, dtype, device, repeats, warmup, mem_limit, trace)
        try:
            build_loss_fn(loss, impl, sub_dim, device)  # cheap; saves a worker start for impls that cannot run
            measured = run_case(case, timeout=timeout)
        except ImplUnavailable as why:
            measured = {"status": "skipped", "note": str(why)}
        record = dict.fromkeys(RECORD_FIELDS)
        record.update(loss=loss, impl=impl, M=m, D=dim, sub_dim=sub_dim, dtype=dtype, device=device)
        record.update(measured)
        record["flops"] = flops(loss, m, effective_dim)
        if record.get("total_ms"):
            record["tflops"] = record["flops"] / (record["total_ms"] * 1e9)
        if trace is not None and record["status"] == "ok":
            record["trace"] = trace
        records.append(record)
    _add_ratios(records)
    meta = environment(device)
    meta.update(dim=dim, sub_dim=sub_dim, dtype=dtype, repeats=repeats, warmup=warmup, mem_limit=mem_limit,
                gemm_units=GEMM_UNITS, matmul_tflops=_median_ceilings(records),
                # Other work on the machine slows every case; the 1-minute load average says how much there was.
                loadavg_1min_before=round(load_before[0], 2) if load_before else None,
                loadavg_1min_after=round(os.getloadavg()[0], 2) if load_before else None)
    return meta, records


def _median_ceilings(records: list[dict]) -> dict[int, Optional[float]]:
    """Per M, the median matmul rate over the cases (each worker times it next to its own case)."""
    rates: dict[int, list[float]] = {}
    for r in records:
        if r.get("matmul_tflops"):
            rates.setdefault(r["M"], []).append(r["matmul_tflops"])
    return {m: statistics.median(v) for m, v in sorted(rates.items())}


def _add_ratios(records: list[dict]) -> None:
    naive = {(r["loss"], r["M"]): r for r in records if r["impl"] == "naive" and r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        base = naive.get((r["loss"], r["M"]))
        if base is not None and r.get("total_ms") and base.get("total_ms"):
            r["ratio_vs_naive"] = r["total_ms"] / base["total_ms"]
        if base is not None and base["peak_mem_bytes"] > 0:
            r["mem_ratio_vs_naive"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]
        if r.get("matmul_tflops") and r.get("tflops"):
            r["fraction_of_matmul"] = r["tflops"] / r["matmul_tflops"]
