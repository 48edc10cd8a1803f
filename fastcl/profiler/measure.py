"""Timing and memory of one case, each in its own subprocess, plus the matmul ceiling.

Why a subprocess per case: on the CPU the only honest peak-memory figure is the process's resident set,
and a fresh process keeps one case's allocations (and torch.compile caches) from skewing the next. The
worker (``python -m fastcl.profiler._worker``) runs :func:`measure_in_process` and prints one JSON line.

Order in the worker: warm-up runs, timed runs (default allocator settings), then one memory run.

Memory on the CPU: before the memory run the worker (glibc) fixes malloc's mmap threshold at 64 KiB, so
every large buffer is its own mmap that goes back to the OS when freed, and calls ``malloc_trim(0)``, so
freed heap pages from earlier runs are no longer resident and reusing them shows up as new RSS. It then
resets the kernel's high-water mark (``/proc/self/clear_refs`` ← 5) and reads VmRSS as the baseline; the
peak is VmHWM after the call. Where that file does not exist (macOS), the peak is ``ru_maxrss`` minus the
RSS before the first run (an upper bound). On CUDA it is ``max_memory_allocated`` minus
``memory_allocated`` before the call.

``mem_limit`` makes an out-of-memory case real: on the CPU the worker lowers ``RLIMIT_AS`` to its current
address space plus the limit, so an allocation past it fails inside the allocator; on CUDA it sets
``torch.cuda.set_per_process_memory_fraction``. Either way the failure is reported as ``status="oom"``.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fastcl.profiler.cases import DTYPES, Case, ImplUnavailable, build_loss_fn, make_inputs

__all__ = ["measure_in_process", "run_case", "matmul_ceiling", "is_oom_error", "step"]

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


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


_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


def _release_free_memory() -> None:
    """glibc only: large buffers via mmap from now on, and free heap pages handed back to the OS."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return


class _CpuPeak:
    """Peak resident memory of one call above the RSS right before it."""

    def __init__(self) -> None:
        self.resettable = _CLEAR_REFS.exists()
        self.first_baseline = _proc_status_kib("VmRSS") * 1024 if self.resettable else _ru_maxrss_bytes()

    def start(self) -> None:
        if self.resettable:
            _CLEAR_REFS.write_text("5")
            self.baseline = _proc_status_kib("VmRSS") * 1024

    def peak_extra(self) -> int:
        if self.resettable:
            return _proc_status_kib("VmHWM") * 1024 - self.baseline
        return _ru_maxrss_bytes() - self.first_baseline


def _limit_memory(device: torch.device, limit: int) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated(device) + limit) / total), device)
        return
    address_space = _proc_status_kib("VmSize") * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space + limit, hard))


def step(fn: Callable, inputs: list, leaves: list, device: torch.device) -> tuple[float, float]:
    """One forward + backward; returns (fwd_ms, bwd_ms)."""
    for leaf in leaves:
        leaf.grad = None
    if device.type == "cuda":
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        loss = fn(*inputs)
        mid.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(mid), mid.elapsed_time(end)
    t0 = time.perf_counter()
    loss = fn(*inputs)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def _spin_up(device: torch.device) -> None:
    # Creates the BLAS / OpenMP thread pools and the autograd engine before any limit or baseline is set.
    x = torch.randn(64, 64, device=device, requires_grad=True)
    (x @ x).sum().backward()


def measure_in_process(case: Case) -> dict:
    """Runs ``case`` here; returns status, note, fwd_ms, bwd_ms, total_ms, peak_mem_bytes, matmul_tflops."""
    device = torch.device(case.device)
    torch.manual_seed(case.seed)
    try:
        fn = build_loss_fn(case.loss, case.impl, case.sub_dim, case.device)
    except ImplUnavailable as why:
        return {"status": "skipped", "note": str(why)}
    _spin_up(device)
    try:
        # The ceiling is timed here, next to the case, so both see the same load on a shared machine.
        ceiling = matmul_ceiling(case.m, case.sub_dim or case.dim, case.dtype, case.device, max(case.repeats, 3))
        inputs = make_inputs(case.loss, case.m, case.dim, DTYPES[case.dtype], case.device, case.seed)
        leaves = [t for t in inputs if t.requires_grad]
        cpu_peak = None if device.type == "cuda" else _CpuPeak()
        if case.mem_limit is not None:
            _limit_memory(device, case.mem_limit)
        for _ in range(case.warmup):
            step(fn, inputs, leaves, device)
        times = [step(fn, inputs, leaves, device) for _ in range(case.repeats)]
        for leaf in leaves:  # the measured call allocates fresh gradients, so none count in the baseline
            leaf.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(fn, inputs, leaves, device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            _release_free_memory()
            cpu_peak.start()
            step(fn, inputs, leaves, device)
            peak = cpu_peak.peak_extra()
        if case.profile_path:
            _chrome_trace(fn, inputs, leaves, device, case.profile_path)
    except Exception as err:  # noqa: BLE001 - one failing case must not end the run; it is reported.
        if is_oom_error(err):
            return {"status": "oom", "note": _oom_note(err, case.mem_limit)}
        return {"status": "error", "note": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
    result = {"status": "ok", "note": "", "peak_mem_bytes": int(peak), "matmul_tflops": ceiling,
              "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if times:
        result.update(
            fwd_ms=statistics.median(t[0] for t in times),
            bwd_ms=statistics.median(t[1] for t in times),
            total_ms=statistics.median(t[0] + t[1] for t in times),
        )
    return result


def _oom_note(err: BaseException, limit: Optional[int]) -> str:
    tried = re.search(r"allocate (\d+) bytes", str(err))
    what = f"allocating {int(tried.group(1)) / 2**30:.2f} GiB failed" if tried else str(err).splitlines()[0][:200]
    return what + (f" (limit {limit / 2**30:.2f} GiB)" if limit else "")


def _chrome_trace(fn: Callable, inputs: list, leaves: list, device: torch.device, path: str) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
        step(fn, inputs, leaves, device)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(path)


def _worker_env() -> dict:
    env = dict(os.environ)
    # The worker imports fastcl from the same tree as this process, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return env


def run_case(case: Case, timeout: Optional[float] = None) -> dict:
    """Measures ``case`` in a fresh worker process; a killed or crashed worker becomes a result, not a raise."""
    cmd = [sys.executable, "-m", "fastcl.profiler._worker", json.dumps(case.to_dict())]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": f"timed out after {timeout:.0f} s"}
    if proc.returncode == -signal.SIGKILL:
        return {"status": "oom", "note": "worker killed by SIGKILL (the kernel's OOM killer, most likely)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "note": f"worker exited with {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def matmul_ceiling(m: int, dim: int, dtype: str, device: str, repeats: int) -> Optional[float]:
    """TFLOP/s of a plain [m, dim] @ [dim, m] matmul (BLAS / cuBLAS) here; None if it does not fit in memory."""
    dev = torch.device(device)
    try:
        a = torch.randn(m, dim, device=dev).to(DTYPES[dtype])
        b = torch.randn(dim, m, device=dev).to(DTYPES[dtype])
        seconds = []
        for i in range(repeats + 2):
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                torch.cuda.synchronize(dev)
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                a @ b
                elapsed = time.perf_counter() - t0
            if i >= 2:  # the first two are warm-up
                seconds.append(elapsed)
    except Exception as err:  # noqa: BLE001
        if is_oom_error(err):
            return None
        raise
    return 2 * m * m * dim / statistics.median(seconds) / 1e12
