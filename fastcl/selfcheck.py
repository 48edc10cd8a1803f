"""Self-check before trust: ``backend="auto"`` uses a fused backend for a (device, dtype, loss) only after
that backend has matched the torch backend there once.

On the first ``auto`` call of a loss for CUDA tensors of a dtype, the fused backend (``triton``) runs the
loss once on a tiny fresh input (M ≈ 38 rows, D = 40, the loss's default options, ``distributed="local"``)
and its value, input gradients and dL/dτ are compared with the torch backend in float64 on the same input
(relative error, see :data:`TOLERANCE`). A pass is remembered for the process and on disk; a mismatch or an
exception warns once (:class:`SelfCheckWarning`, naming the case and the numbers) and ``auto`` runs that
case on the torch backend. An explicit ``backend="triton"`` is never checked. ``fastcl doctor`` runs every
case and prints the table.

- ``FASTCL_SELFCHECK=0`` skips the check (``auto`` trusts the fused backend, as before the check existed).
- The disk cache is one JSON file per environment: the GPU's name and compute capability, the NVIDIA
  driver, CUDA, torch, triton and fastcl versions and a digest of fastcl's sources (an edited kernel is
  checked again). It lives in ``FASTCL_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastcl``, else
  ``~/.cache/fastcl``; writes are atomic, an unreadable or corrupt file is ignored (and rewritten), an
  unwritable folder only loses the cache.
- Cost: the check launches the loss once forward and backward per (device, dtype, loss) and reads the
  results back (one device synchronization, on the first call only); later calls do a dictionary lookup.
  The first process on a machine also compiles the Triton kernels for the tiny shape.
- Under ``torch.compile`` the decision is a constant of the traced graph: Dynamo calls :func:`trusted`
  eagerly (it is marked as a constant function), so the check runs outside the graph. During CUDA-graph
  capture (it synchronizes) or under a tracing dispatch mode (make_fx, fake tensors) no check can run: a
  case without a decision yet uses the fused backend unchecked for that call, caches nothing, and is
  checked on the next ordinary call.

Example:
    >>> import torch
    >>> from fastcl import selfcheck
    >>> selfcheck.applies(torch.device("cpu"))  # CPU tensors never use a fused backend under "auto"
    False
    >>> selfcheck.TOLERANCE[torch.bfloat16]  # relative error bar against the float64 torch backend
    0.04
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from fastcl import dispatch, registry

__all__ = [
    "CheckResult",
    "SelfCheckWarning",
    "TOLERANCE",
    "applies",
    "auto_uses_triton",
    "cache_path",
    "check",
    "dtype_name",
    "enabled",
    "trusted",
]

# Relative error bars against the float64 torch backend (||got - want|| / ||want||; dL/dτ against
# max(|dL/dτ|, 1/τ)). float32 admits TF32 (about 3e-4 where PyTorch allows it); bf16/fp16 admit the
# rounding of 8/11-bit operands. A wrong kernel misses by orders of magnitude; NaN never passes.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-3, torch.bfloat16: 4e-2, torch.float16: 1e-2}

# The check's input: M ≈ 38 similarity rows (no multiple of the 16-row tiles), D = 40 (no power of two).
CHECK_ROWS, CHECK_DIM, CHECK_SEED = 38, 40, 12345
_FORMAT = 1
_SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h")


class SelfCheckWarning(RuntimeWarning):
    """A fused backend failed its self-check; ``backend="auto"`` uses the torch backend for that case."""


@dataclass(frozen=True)
class CheckResult:
    """One (backend, device, dtype, loss) check.

    Attributes:
        backend, device, dtype, loss: the case (``dtype`` as its short name, e.g. ``"float32"``).
        passed: value, input gradients and dL/dτ within :data:`TOLERANCE`, and no exception.
        errors: relative error per quantity (``loss``, ``grad0``…, ``dtau``); empty after an exception.
        detail: what failed (the worst quantity or the exception), ``""`` on a pass.
        seconds: wall time of the check, compilation included.
        cached: read from the disk cache rather than run in this process.
    """

    backend: str
    device: str
    dtype: str
    loss: str
    passed: bool
    errors: dict
    detail: str
    seconds: float
    cached: bool = False

    @property
    def case(self) -> str:
        return f"{self.backend}/{self.dtype}/{self.loss}"


def enabled() -> bool:
    """False when ``FASTCL_SELFCHECK=0`` (or ``false`` / ``no`` / ``off``)."""
    return os.environ.get("FASTCL_SELFCHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def applies(device: torch.device) -> bool:
    """Whether ``auto`` considers a fused backend for tensors on ``device`` (CUDA only). Tests widen it to
    the CPU, where the Triton kernels run through the interpreter."""
    return device.type == "cuda"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _relative_error(got: Tensor, want: Tensor, floor: float = 0.0) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = max(float(want.norm()), floor)
    return float((got - want).norm()) / scale if scale > 0 else float((got - want).norm())


def _run(entry, tensors, targets, tau: float, backend: str, dtype: torch.dtype):
    """(loss, input grads, dL/dτ) of ``entry``'s functional on ``backend`` with the inputs cast to ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    temperature = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    temperature = temperature.to(tensors[0].device).requires_grad_(True)
    loss = entry.functional(*leaves, temperature=temperature, backend=backend, distributed="local", **targets)
    loss.backward()
    return loss, [leaf.grad for leaf in leaves], temperature.grad


def check(backend: str, device: torch.device, dtype: torch.dtype, loss: str) -> CheckResult:
    """Runs one check now (no cache): ``loss`` on ``backend`` vs the torch backend in float64.

    Args:
        backend: the fused backend, ``"triton"`` or ``"cuda"``.
        device: where the tensors live.
        dtype: the embeddings' dtype.
        loss: a registry name (``fastcl.registry.LOSSES``).

    Returns:
        A :class:`CheckResult`; an exception in the fused backend is a failed result, not raised.

    Example:
        >>> import torch
        >>> result = check("torch", torch.device("cpu"), torch.float32, "nt_xent")  # the reference itself
        >>> result.passed, sorted(result.errors)
        (True, ['dtau', 'grad0', 'grad1', 'loss'])
    """
    entry = registry.get(loss)
    start = time.perf_counter()
    errors: dict = {}
    detail = ""
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    # The caller's context must not change the check: a first call may come from an eval loop (no grad,
    # inference mode), under autocast, or with torch.set_default_device("cuda") (CPU generators then fail).
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        with torch.device("cpu"):  # PyTorch's default while the check runs
            tensors, targets = entry.make_inputs(CHECK_ROWS, CHECK_DIM, dtype=torch.float64, seed=CHECK_SEED)
            tensors = tuple(t.to(device) for t in tensors)
            targets = {name: t.to(device) for name, t in targets.items()}
            tau = entry.default_temperature
        try:
            with torch.device("cpu"):
                got = _run(entry, tensors, targets, tau, backend, dtype)
                want = _run(entry, tensors, targets, tau, "torch", torch.float64)
            errors["loss"] = _relative_error(got[0], want[0])
            for i, (g, g_ref) in enumerate(zip(got[1], want[1])):
                errors[f"grad{i}"] = _relative_error(g, g_ref)
            errors["dtau"] = _relative_error(got[2], want[2], floor=1.0 / tau)
        except Exception as error:  # a fused backend that raises is as untrustworthy as a wrong one
            detail = f"raised {type(error).__name__}: {error}"
    if not detail:
        failed = {k: v for k, v in errors.items() if not v <= tolerance}  # NaN fails
        if failed:
            worst = max(failed, key=lambda k: failed[k] if failed[k] == failed[k] else float("inf"))
            detail = f"{worst} relative error {failed[worst]:.3g} > {tolerance:g}"
    return CheckResult(
        backend=backend,
        device=str(device),
        dtype=dtype_name(dtype),
        loss=loss,
        passed=not detail,
        errors=errors,
        detail=detail,
        seconds=time.perf_counter() - start,
    )


# --- the disk cache -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``FASTCL_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastcl``, else ``~/.cache/fastcl``."""
    explicit = os.environ.get("FASTCL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastcl"


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    """sha256 over fastcl's Python sources, the Triton kernels and the CUDA sources (not their mtimes)."""
    roots = []  # fastcl, fastcl.kernels and fastcl.csrc: inside the package in a wheel, beside it in a checkout
    for name in ("fastcl", "fastcl.kernels", "fastcl.csrc"):
        spec = importlib.util.find_spec(name)
        roots += [Path(location).resolve() for location in (spec.submodule_search_locations or [])] if spec else []
    files = {path for root in roots for path in root.rglob("*") if path.suffix in _SOURCE_SUFFIXES}
    digest = hashlib.sha256()
    for path in sorted(f for f in files if "__pycache__" not in f.parts):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def nvidia_driver() -> Optional[str]:
    """The NVIDIA kernel driver's version (e.g. ``"580.159.04"``), or None where it cannot be read."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def environment(device: torch.device) -> dict:
    """What a cached decision depends on: the device, the driver, CUDA, torch, triton, fastcl, its sources."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": str(device.type),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastcl": importlib.metadata.version("fastcl"),
        "sources": _sources_digest(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env.update(
            device=torch.cuda.get_device_name(device),
            capability=f"{major}.{minor}",
            driver=nvidia_driver(),
            cuda_driver_api=torch._C._cuda_getDriverVersion(),
            cuda_runtime=torch.version.cuda,
        )
    return env


def cache_path(device: torch.device) -> Path:
    """The cache file for ``device``'s environment (see :func:`environment`)."""
    key = json.dumps(environment(device), sort_keys=True)
    return cache_dir() / f"selfcheck-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _read_cache(path: Path) -> dict:
    """The cached cases, {} when the file is missing, unreadable, corrupt or of another format."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("cases"), dict):
        return {}
    return data["cases"]


def _write_cache(path: Path, device: torch.device, results: list[CheckResult]) -> None:
    """Merges ``results`` into the cache file with an atomic replace; an unwritable folder is not an error."""
    cases = _read_cache(path)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for result in results:
        record = asdict(result)
        record.update(checked_at=now, cached=False)
        cases[result.case] = record
    data = {"format": _FORMAT, "environment": environment(device), "cases": cases}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(data, out, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError:
        pass


def _cached_result(path: Path, case: str) -> Optional[CheckResult]:
    record = _read_cache(path).get(case)
    try:
        fields = {name: record[name] for name in CheckResult.__dataclass_fields__ if name != "cached"}
        return CheckResult(**fields, cached=True)
    except (KeyError, TypeError):
        return None


def record(device: torch.device, results: list[CheckResult]) -> Path:
    """Writes ``results`` (run on ``device``) to the disk cache and this process's decisions; returns the file."""
    path = cache_path(device)
    _write_cache(path, device, results)
    with _LOCK:
        for result in results:
            _DECISIONS[(result.backend, device, result.dtype, result.loss)] = (result, path)
    return path


# --- the decision ---------------------------------------------------------------------------------------

_DECISIONS: dict = {}  # (backend, device, dtype name, loss) -> (CheckResult, its cache file), this process
_WARNED: set = set()
_LOCK = threading.RLock()


def _warn(result: CheckResult, path: Path) -> None:
    """Once per case and process."""
    if (result.case, result.device) in _WARNED:
        return
    _WARNED.add((result.case, result.device))
    when = " (cached result)" if result.cached else ""
    warnings.warn(
        f"fastcl: backend={result.backend!r} failed its self-check{when} for {result.loss} with {result.dtype} "
        f"tensors on {result.device}: {result.detail}. backend='auto' runs this case on the torch backend "
        f"(correct, slower). `fastcl doctor` prints every check; the result is cached in {path}; "
        "FASTCL_SELFCHECK=0 skips the check.",
        SelfCheckWarning,
        stacklevel=2,
    )


def _cannot_check_now(device: torch.device) -> bool:
    """A check runs real kernels and reads their results back: not during CUDA-graph capture, nor under a
    dispatch mode (make_fx, FakeTensorMode, non-strict export trace with fake tensors)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return capturing or bool(_get_current_dispatch_mode_stack())


def trusted(backend: str, device: torch.device, dtype: torch.dtype, loss: str) -> bool:
    """Whether ``auto`` may run ``loss`` on ``backend`` for ``dtype`` tensors on ``device``.

    True without a check when :func:`enabled` is False. Otherwise the process's decision, else the disk
    cache's, else the result of :func:`check` (recorded in both). ``auto``'s first fallback to the torch
    backend for a case warns (once per process).

    Example:
        >>> import torch
        >>> trusted("torch", torch.device("cpu"), torch.float32, "nt_xent")  # CPU: nothing to check
        True
    """
    if not enabled() or not applies(device):
        return True
    key = (backend, device, dtype_name(dtype), loss)
    decision = _DECISIONS.get(key)
    if decision is None:
        with _LOCK:
            decision = _DECISIONS.get(key)
            if decision is None:
                path = cache_path(device)
                result = _cached_result(path, f"{backend}/{dtype_name(dtype)}/{loss}")
                if result is None:
                    if _cannot_check_now(device):  # unchecked this once, not cached: the next call checks
                        return True
                    result = check(backend, device, dtype, loss)
                    _write_cache(path, device, [result])
                decision = _DECISIONS[key] = (result, path)
    result, path = decision
    if not result.passed:
        _warn(result, path)
    return result.passed


# torch.compile: Dynamo calls the function eagerly and bakes its answer into the graph (this attribute is
# what torch.compiler.assume_constant_result sets; fastcl.dispatch explains why it is set by hand).
trusted._dynamo_marked_constant = True


@dispatch.constant_for_compile  # under torch.compile the choice (and a first check) runs eagerly, outside the graph
def auto_uses_triton(device: torch.device, dtype: Optional[torch.dtype], loss: Optional[str]) -> bool:
    """ "auto"'s choice for CUDA tensors (fastcl.dispatch asks it): triton where it runs and, for a named
    (dtype, loss), once it has passed its self-check there (a failure warns once and the torch backend runs)."""
    if not applies(device) or dispatch.unavailable_reason("triton", device) is not None:
        return False
    return dtype is None or loss is None or trusted("triton", device, dtype, loss)


dispatch.set_auto_choice(auto_uses_triton)


def forget() -> None:
    """Drops this process's decisions and warnings (the disk cache stays); tests and ``fastcl doctor``."""
    with _LOCK:
        _DECISIONS.clear()
        _WARNED.clear()
