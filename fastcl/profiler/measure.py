"""Timing and peak memory of one case in this process, and the matmul ceiling of the same GEMMs.

Order per case: warm-up runs, timed runs, then one memory run (and a chrome trace if asked).

Memory on the CPU is the peak resident set of one forward + backward above the resident set right before
it. Between cases the allocator runs in its steady state (glibc: buffers up to 32 MiB reused from the
heap, as a long training run sees them). For the memory run (glibc) every buffer of 64 KiB or more is its
own mmap, returned to the OS when freed, and ``malloc_trim(0)`` hands back the free heap pages first, so a
buffer the call allocates shows up as new resident memory even in a process that has run earlier cases;
the kernel's high-water mark is reset (``/proc/self/clear_refs`` ← 5) before the call and read (VmHWM)
after it. Where that file does not exist (macOS) the figure is ``ru_maxrss`` minus the resident set at the
first case, an upper bound. On CUDA it is ``max_memory_allocated`` minus ``memory_allocated`` before the call.

``mem_limit`` makes an out-of-memory case real: on the CPU the soft ``RLIMIT_AS`` is lowered to the
current address space plus the limit for the case (and restored after), so an allocation past it fails
inside the allocator; on CUDA ``torch.cuda.set_per_process_memory_fraction``. Either way the failure is
reported as ``status="oom"``.

    >>> result = measure_case(Case("nt_xent", "torch", m=64, dim=8, repeats=1))
    >>> result["status"], result["total_ms"] > 0, result["peak_mem_bytes"] >= 0
    ('ok', True, True)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from fastcl.profiler.cases import CEILING, DTYPES, Case, ImplUnavailable, build_workload, loss_entry

__all__ = ["measure_case", "matmul_ceiling", "gemm_plan", "is_oom_error", "step", "loadavg"]

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
# glibc mallopt parameters (malloc.h) and the allocator settings of the two modes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STEADY_MMAP, _STEADY_TRIM, _EXACT_MMAP = 32 << 20, 64 << 20, 64 << 10
# A ceiling GEMM over the whole M×M matrix is tried only when that matrix fits in this many bytes.
_WHOLE_MATRIX_BYTES = 1 << 30
# Timed runs: `repeats`, more while they add up to less than _MIN_TIMED_SECONDS (short cases on a shared
# machine: one preempted run then cannot move the median; at most _MAX_RUNS), fewer (at least one) once
# they add up to _MAX_TIMED_SECONDS (an O(M³) peer must not hold a run for minutes).
_MIN_TIMED_SECONDS, _MAX_TIMED_SECONDS, _MAX_RUNS = 0.1, 10.0, 100
# Rows per block of the blocked ceiling: a block of ~2M similarity elements, as the chunked torch backend uses.
_BLOCK_ELEMENTS = 1 << 21


def loadavg() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def is_oom_error(err: BaseException) -> bool:
    """True for an allocation failure (CUDA OOM, CPU allocator failure, MemoryError)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(msg in str(err).lower() for msg in _OOM_MESSAGES)


def _proc_status_kib(field: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _ru_maxrss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _mallopt(*settings: tuple[int, int], trim: bool = False) -> None:
    """glibc only; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        for param, value in settings:
            libc.mallopt(param, value)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        return


def _steady_allocator() -> None:
    _mallopt((_M_MMAP_THRESHOLD, _STEADY_MMAP), (_M_TRIM_THRESHOLD, _STEADY_TRIM))


class _CpuPeak:
    """Peak resident memory of one call above the resident set right before it."""

    _first_rss: Optional[int] = None

    def __init__(self) -> None:
        self.resettable = _CLEAR_REFS.exists()
        if _CpuPeak._first_rss is None:
            _CpuPeak._first_rss = _ru_maxrss_bytes()

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        _mallopt((_M_MMAP_THRESHOLD, _EXACT_MMAP), trim=True)
        if self.resettable:
            _CLEAR_REFS.write_text("5")
        self.baseline = _proc_status_kib("VmRSS") * 1024 if self.resettable else _CpuPeak._first_rss
        try:
            yield
            self.peak = (_proc_status_kib("VmHWM") * 1024 if self.resettable else _ru_maxrss_bytes()) - self.baseline
        finally:
            _steady_allocator()


@contextlib.contextmanager
def _memory_limit(device: torch.device, limit: Optional[int]) -> Iterator[None]:
    if limit is None:
        yield
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, (torch.cuda.memory_allocated(device) + limit) / total), device
        )
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    wanted = _proc_status_kib("VmSize") * 1024 + limit
    resource.setrlimit(resource.RLIMIT_AS, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(call: Callable[[], torch.Tensor], leaves: list, device: torch.device) -> tuple[float, float]:
    """One forward + backward; returns (fwd_ms, bwd_ms)."""
    for leaf in leaves:
        leaf.grad = None
    if device.type == "cuda":
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        loss = call()
        mid.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(mid), mid.elapsed_time(end)
    t0 = time.perf_counter()
    loss = call()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _runs(run: Callable[[], object], repeats: int, seconds: Callable[[object], float]) -> list:
    """``repeats`` results of ``run()``; more while their total time (``seconds(result)``) is under 0.1 s,
    fewer (at least one) once it reaches 10 s."""
    results, spent = [], 0.0
    while repeats and len(results) < _MAX_RUNS and spent < _MAX_TIMED_SECONDS:
        if len(results) >= repeats and spent >= _MIN_TIMED_SECONDS:
            break
        results.append(run())
        spent += seconds(results[-1])
    return results


def measure_case(case: Case) -> dict:
    """Runs ``case`` in this process (for ``impl == "matmul"``: :func:`matmul_ceiling` of its loss and M).

    Returns:
        ``status`` ("ok", "skipped", "oom" or "error"), ``note``, and when ok ``fwd_ms``, ``bwd_ms``,
        ``total_ms`` (medians of ``case.repeats`` runs, more while they total under 0.1 s, fewer once they
        reach 10 s; absent when ``case.repeats == 0``), ``runs``, ``peak_mem_bytes`` and ``loadavg_1min``.
        A failing case is a result, never a raise, so one case cannot end a run.
    """
    if case.impl == CEILING:
        try:
            return matmul_ceiling(case.loss, case.m, case.width, case.dtype, case.device, max(case.repeats, 3))
        except Exception as err:  # e.g. a dtype the device's BLAS lacks: reported like any case
            return _failure(err, None)
    device = torch.device(case.device)
    torch.manual_seed(case.seed)
    _steady_allocator()
    if device.type == "cuda":  # the previous case's cached blocks would count against this case's limit
        torch.cuda.empty_cache()
    try:
        call, leaves = build_workload(case)
    except ImplUnavailable as why:
        return {"status": "skipped", "note": str(why)}
    except Exception as err:  # e.g. a peer library that fails to import: this case's error, not the worker's
        return _failure(err, case.mem_limit)
    try:
        with _memory_limit(device, case.mem_limit):
            for _ in range(case.warmup):
                step(call, leaves, device)
            times = _runs(lambda: step(call, leaves, device), case.repeats, lambda t: (t[0] + t[1]) / 1e3)
            for leaf in leaves:  # the measured call allocates fresh gradients, so none count in the baseline
                leaf.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step(call, leaves, device)
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                meter = _CpuPeak()
                with meter.measure():
                    step(call, leaves, device)
                peak = meter.peak
            if case.profile_path:
                _chrome_trace(call, leaves, device, case.profile_path)
    except Exception as err:  # one failing case must not end the run; it is reported
        return _failure(err, case.mem_limit)
    result = {"status": "ok", "note": "", "peak_mem_bytes": int(peak), "loadavg_1min": loadavg()}
    if times:
        result.update(
            runs=len(times),
            fwd_ms=statistics.median(t[0] for t in times),
            bwd_ms=statistics.median(t[1] for t in times),
            total_ms=statistics.median(t[0] + t[1] for t in times),
        )
    return result


def _failure(err: Exception, limit: Optional[int]) -> dict:
    """The result of a case that raised: "oom" for an allocation failure, else "error" with the exception."""
    if is_oom_error(err):
        tried = re.search(r"allocate (\d+) bytes", str(err))
        what = f"allocating {int(tried.group(1)) / 2**30:.2f} GiB failed" if tried else str(err).splitlines()[0][:200]
        return {"status": "oom", "note": what + (f" (limit {limit / 2**30:.2f} GiB)" if limit else "")}
    first_line = str(err).splitlines()[0][:300] if str(err) else ""
    return {"status": "error", "note": f"{type(err).__name__}: {first_line}"}


def _chrome_trace(call: Callable, leaves: list, device: torch.device, path: str) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        step(call, leaves, device)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(path)


def gemm_plan(loss: str, m: int) -> tuple[int, int]:
    """The similarity GEMMs of one forward + backward of ``loss`` at M rows, as ``(products, reductions)``.

    A *product* is ``[M, D'] @ [D', M]`` (the forward's S, and the backward's recompute of it); a
    *reduction* is ``[M, M] @ [M, D']`` (a gradient ``G @ Z``). Every loss computes S twice (forward and
    recompute), so its FLOP model's remaining GEMM-units are reductions: NT-Xent and SupCon 2 + 1, InfoNCE
    2 + 2 (dQ and dK). Each GEMM is one GEMM-unit (2·M·M·D' FLOPs).

    Example:
        >>> gemm_plan("info_nce", 1024)
        (2, 2)
    """
    units = loss_entry(loss).gemm_units
    return 2, units - 2


def _median_seconds(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    def timed() -> float:
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        return time.perf_counter() - t0

    run()  # warm-up: BLAS / cuBLAS picks its kernels and workspaces here
    return statistics.median(_runs(timed, repeats, lambda t: t))


@functools.lru_cache(maxsize=None)
def _ceiling(plan: tuple[int, int], m: int, width: int, dtype: str, device: str, repeats: int) -> dict:
    products, reductions = plan
    dev, dt = torch.device(device), DTYPES[dtype]
    timed = {}
    try:
        z = torch.randn(m, width, device=dev).to(dt)
        out = torch.empty(m, width, device=dev, dtype=dt)
        rows = min(m, max(16, 1 << max(0, (_BLOCK_ELEMENTS // m).bit_length() - 1)))
        tile = torch.empty(rows, m, device=dev, dtype=dt)

        def blocked() -> None:
            for start in range(0, m, rows):
                stop = min(start + rows, m)
                block = tile[: stop - start]
                for _ in range(products):
                    torch.matmul(z[start:stop], z.T, out=block)
                for _ in range(reductions):
                    torch.matmul(block, z, out=out[start:stop])

        timed[f"row blocks of {rows}"] = _median_seconds(blocked, dev, repeats)
        if m * m * tile.element_size() <= _WHOLE_MATRIX_BYTES:
            full = torch.empty(m, m, device=dev, dtype=dt)

            def whole() -> None:
                for _ in range(products):
                    torch.matmul(z, z.T, out=full)
                for _ in range(reductions):
                    torch.matmul(full, z, out=out)

            timed["whole M×M"] = _median_seconds(whole, dev, repeats)
    except Exception as err:
        if not is_oom_error(err):
            raise
        if not timed:
            return {"status": "oom", "note": str(err).splitlines()[0][:200]}
        # else the whole-matrix variant did not fit; the blocked one stands
    way = min(timed, key=timed.get)
    note = f"{products}×[M,D']@[D',M] + {reductions}×[M,M]@[M,D']; fastest: {way}"
    return {"status": "ok", "note": note, "total_ms": timed[way] * 1e3, "loadavg_1min": loadavg()}


def matmul_ceiling(loss: str, m: int, width: int, dtype: str, device: str, repeats: int = 3) -> dict:
    """Time of the loss's own similarity GEMMs alone (``gemm_plan``), with nothing else in between.

    Two ways of running the same GEMMs are timed and the faster one is the ceiling: whole M×M matrices
    (when one fits in 1 GiB) and row blocks of about 2M elements, as the chunked backend computes them
    (a block stays in cache between its product and its reduction). The FLOPs are exactly the loss's FLOP
    model, so ``tflops / matmul_tflops`` is the fraction of plain-GEMM speed an implementation reaches.

    Returns:
        ``status``, ``note`` (which way was faster), ``total_ms`` and ``loadavg_1min``; status "oom" when
        not even the blocked GEMMs fit.
    """
    # Losses with the same GEMM plan (NT-Xent and SupCon) share one measurement per shape in a process.
    return dict(_ceiling(gemm_plan(loss, m), m, width, dtype, device, repeats))
