"""Runs a grid of cases and turns measurements into records (TFLOP/s, ratios, the matmul ceiling).

Order of a run: the implementations that cannot run here are reported first (skipped, with the reason),
then the matmul ceiling of every (loss, M) is measured (``impl == "matmul"``), then the implementations one
after the other, ``naive`` first, so a row's ratios are known when it is reported. Where each
implementation runs (``isolate``):

- ``"impl"`` (default): one worker process per implementation (and one for the ceiling) measures all its
  cases, so a crash, an out-of-memory kill or a timeout costs one case (the worker is restarted for the
  rest), torch is imported once per implementation, and no implementation's caches or allocations affect
  another's. Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets a policy;
- ``"run"``: one worker for the whole run (one torch import; what ``--quick`` uses);
- ``"case"``: a fresh worker per case (slowest; nothing at all is shared between cases);
- ``"none"``: everything in this process (fewest imports; ``timeout`` cannot interrupt a case, a case
  killed by the kernel's OOM killer ends the run, and OpenMP runs with this process's policy).

    >>> meta, records = run_bench(["info_nce"], ["naive", "infcl"], [64], dim=16, repeats=1, isolate="none")
    >>> [(r["impl"], r["status"]) for r in records]
    [('infcl', 'skipped'), ('matmul', 'ok'), ('naive', 'ok')]
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from fastcl.profiler.cases import CEILING, Case, check_size, loss_entry, unavailable_reason
from fastcl.profiler.measure import loadavg, measure_case
from fastcl.profiler.report import RECORD_FIELDS

__all__ = ["run_bench", "measure_in_workers", "environment", "default_mem_limit", "ISOLATION", "FLOP_MODEL"]

ISOLATION = ("impl", "run", "case", "none")
FLOP_MODEL = (
    "one GEMM-unit = 2·M·M·D' FLOPs; each loss counts the similarity GEMMs of one forward + backward "
    "(its GEMM-units in the loss registry, e.g. NT-Xent 3, InfoNCE 4); TFLOP/s = model FLOPs / median "
    "fwd+bwd time"
)
CEILING_METHOD = (
    "matmul = the loss's own similarity GEMMs alone (2×[M,D']@[D',M] + the gradient [M,M]@[M,D'] products), "
    "the faster of whole M×M matrices and row blocks, timed in the same run; same FLOPs as the loss, so "
    "'% of matmul' above 100 is flagged"
)
MEMORY_METHOD = {
    "cpu": "peak RSS of one fwd+bwd minus RSS right before it (VmHWM reset via /proc/self/clear_refs; large "
    "buffers mmap'd and free heap trimmed for that call)",
    "cuda": "torch.cuda.max_memory_allocated during the call minus memory_allocated before it",
}
OMP_WAIT_POLICY = "PASSIVE"
_PEER_DISTRIBUTIONS = ("pytorch-metric-learning", "triton", "inf-cl", "open_clip_torch")
_RESULT_PREFIX = '{"index": '


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Provenance of a run: device, versions, date."""
    peers = {}
    for name in _PEER_DISTRIBUTIONS:
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
        "fastcl": importlib.metadata.version("fastcl"),
        "platform": platform.platform(),
        "peers": peers,
        "flop_model": FLOP_MODEL,
        "ceiling_method": CEILING_METHOD,
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


def _worker_env() -> dict:
    env = dict(os.environ)
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other work, spinning threads
    # make every parallel region wait for a descheduled peer (a 256×128 GEMM measured 51 ms instead of
    # 0.24 ms at a load of 11 on 2 cores). A policy set by the user is kept.
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    # The worker imports fastcl from the same tree as this process, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return env


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        if line.startswith(_RESULT_PREFIX):
            lines.put(line)
    lines.put(None)


def _dead_worker_result(returncode: int, stderr_text: str) -> dict:
    if returncode == -signal.SIGKILL:
        return {"status": "oom", "note": "worker killed by SIGKILL (the kernel's OOM killer, most likely)"}
    tail = (stderr_text.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "note": f"worker exited with {returncode}: {tail[:300]}"}


def measure_in_workers(
    cases: list[Case], timeout: Optional[float], on_start: Callable[[Case], None]
) -> Iterator[tuple[Case, dict]]:
    """Measures ``cases`` in order in one worker process, restarted after a crash, a kill or a timeout."""
    pending = list(enumerate(cases))
    while pending:
        with tempfile.TemporaryFile(mode="w+") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastcl.profiler._worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=_worker_env(),
            )
            alive = True
            try:
                proc.stdin.write(json.dumps([(i, c.to_dict()) for i, c in pending]))
                proc.stdin.close()
                lines: queue.Queue = queue.Queue()
                threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
                while pending and alive:
                    index, case = pending.pop(0)
                    on_start(case)
                    try:
                        line = lines.get(timeout=timeout)
                    except queue.Empty:
                        alive, result = False, {"status": "error", "note": f"timed out after {timeout:g} s"}
                    else:
                        if line is None:
                            proc.wait()
                            stderr.seek(0)
                            alive, result = False, _dead_worker_result(proc.returncode, stderr.read())
                        else:
                            message = json.loads(line)
                            if message["index"] != index:
                                raise RuntimeError(f"worker answered case {message['index']}, expected {index}")
                            result = message["result"]
                    yield case, result
            finally:  # also when the caller stops early: no worker outlives its run
                if proc.poll() is None and (pending or not alive):
                    proc.kill()
                proc.wait()


def _measured(
    cases: list[Case], isolate: str, timeout: Optional[float], on_start: Callable[[Case], None]
) -> Iterator[tuple[Case, dict]]:
    if isolate == "none":
        for case in cases:
            on_start(case)
            yield case, measure_case(case)
        return
    if isolate == "run":
        batches = [cases]
    elif isolate == "impl":
        batches = [[c for c in cases if c.impl == impl] for impl in dict.fromkeys(c.impl for c in cases)]
    else:
        batches = [[case] for case in cases]
    for batch in batches:
        yield from measure_in_workers(batch, timeout, on_start)


def _record(case: Case, measured: dict) -> dict:
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(
        loss=case.loss, impl=case.impl, M=case.m, D=case.dim, sub_dim=case.sub_dim, dtype=case.dtype, device=case.device
    )
    record.update(measured)
    record["flops"] = loss_entry(case.loss).flops(case.m, case.width)
    if record.get("total_ms"):
        record["tflops"] = record["flops"] / (record["total_ms"] * 1e9)
    if record["status"] == "ok" and case.profile_path:
        record["trace"] = case.profile_path
    return record


def _relate(record: dict, ceiling: Optional[dict], naive: Optional[dict]) -> None:
    """Fills the ratios to the naive loss and the fraction of the matmul ceiling; flags a fraction above 1."""
    if record["status"] != "ok":
        return
    if naive is not None and naive.get("total_ms") and record.get("total_ms"):
        record["ratio_vs_naive"] = record["total_ms"] / naive["total_ms"]
    if naive is not None and naive.get("peak_mem_bytes") and record.get("peak_mem_bytes") is not None:
        record["mem_ratio_vs_naive"] = record["peak_mem_bytes"] / naive["peak_mem_bytes"]
    if record["impl"] == CEILING or ceiling is None or not ceiling.get("tflops"):
        return
    record["matmul_tflops"] = ceiling["tflops"]
    if record.get("tflops"):
        record["fraction_of_matmul"] = record["tflops"] / ceiling["tflops"]
        record["above_ceiling"] = record["fraction_of_matmul"] > 1.0
        if record["above_ceiling"]:
            flag = "faster than the same GEMMs alone (timing noise or a memory-bound ceiling: check the load)"
            record["note"] = f"{record['note']}; {flag}" if record["note"] else flag


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
    isolate: str = "impl",
    profile_dir: Optional[str] = None,
    timeout: Optional[float] = None,
    on_start: Optional[Callable[[Case, int, int], None]] = None,
    on_record: Optional[Callable[[dict, dict, list], None]] = None,
) -> tuple[dict, list[dict]]:
    """Measures every (loss, M, impl) plus the matmul ceiling of every (loss, M).

    Args:
        losses: registry names.
        impls: implementation names (``cases.IMPLS``); ``naive`` runs first wherever it appears.
        sizes: values of M (rows of the similarity).
        dim, sub_dim, dtype, device, repeats, warmup: as in :class:`~fastcl.profiler.cases.Case`.
        mem_limit: bytes per case; -1 (default) = :func:`default_mem_limit`, None = no limit.
        isolate: ``"impl"``, ``"run"``, ``"case"`` or ``"none"`` (see the module docstring).
        profile_dir: write a chrome trace per case there (``<loss>-<impl>-M<M>.json``).
        timeout: seconds one case may take in a worker before it is reported as an error.
        on_start: called with (case, number, total) before each case runs (progress display).
        on_record: called with (record, meta, records so far) as soon as a record is complete (streaming
            output; ``meta["complete"]`` is False until the run ends).

    Returns:
        ``(meta, records)``: provenance, and one record per case with every key of ``RECORD_FIELDS``;
        ceiling records have ``impl == "matmul"``. Their ratios to the naive loss are filled in at the end.

    Raises:
        ValueError: an unknown loss, implementation or isolation, or a size the loss cannot take.
    """
    started_at = time.perf_counter()
    if isolate not in ISOLATION:
        raise ValueError(f"--isolate: expected one of {list(ISOLATION)}, got {isolate!r}")
    if mem_limit == -1:
        mem_limit = default_mem_limit(device)
    for loss in losses:
        for m in sizes:
            check_size(loss, m)
        for impl in impls:
            unavailable_reason(impl, loss, device)  # raises on an unknown name before anything runs
    order = [CEILING, *sorted(dict.fromkeys(impls), key=lambda impl: impl != "naive")]
    total = len(losses) * len(sizes) * len(order)
    started = 0
    records: list[dict] = []
    ceilings: dict = {}
    naive: dict = {}
    meta = environment(device)
    meta.update(
        dim=dim,
        sub_dim=sub_dim,
        dtype=dtype,
        repeats=repeats,
        warmup=warmup,
        mem_limit=mem_limit,
        isolate=isolate,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", None if isolate == "none" else OMP_WAIT_POLICY),
        gemm_units={loss: loss_entry(loss).gemm_units for loss in losses},
        temperatures={loss: loss_entry(loss).default_temperature for loss in losses},
        # Other work on the machine slows every case; the 1-minute load average says how much there was.
        loadavg_1min_before=loadavg(),
        elapsed_s=None,
        loadavg_1min_after=None,
        complete=False,
    )

    def start(case: Case) -> None:
        nonlocal started
        started += 1
        if on_start is not None:
            on_start(case, started, total)

    def keep(record: dict) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record, meta, records)

    runnable = []
    for impl in order:
        for loss in losses:
            reason = None if impl == CEILING else unavailable_reason(impl, loss, device)
            for m in sizes:
                trace = None if profile_dir is None else str(Path(profile_dir) / f"{loss}-{impl}-M{m}.json")
                case = Case(loss, impl, m, dim, sub_dim, dtype, device, repeats, warmup, mem_limit, trace)
                if reason is None:
                    runnable.append(case)
                else:  # reported at once; no worker is started for an implementation that cannot run
                    start(case)
                    keep(_record(case, {"status": "skipped", "note": reason}))
    for case, measured in _measured(runnable, isolate, timeout, start):
        record = _record(case, measured)
        if case.impl == CEILING:
            ceilings[(case.loss, case.m)] = record
        elif case.impl == "naive" and record["status"] == "ok":
            naive[(case.loss, case.m)] = record
        _relate(record, ceilings.get((case.loss, case.m)), naive.get((case.loss, case.m)))
        keep(record)
    for (loss, m), ceiling in ceilings.items():  # the ceiling ran before the naive loss it is compared with
        base = naive.get((loss, m))
        if ceiling["status"] == "ok" and base is not None and base.get("total_ms"):
            ceiling["ratio_vs_naive"] = ceiling["total_ms"] / base["total_ms"]
    meta.update(loadavg_1min_after=loadavg(), complete=True, elapsed_s=round(time.perf_counter() - started_at, 1))
    return meta, records
