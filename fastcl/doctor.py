"""``fastcl doctor``: what this machine runs, and the self-check of every fused backend on it.

    $ fastcl doctor                        # environment, backends, then every check on each CUDA device
    $ fastcl doctor --dtypes bfloat16 --losses nt_xent,supcon --json doctor.json

Prints the environment (Python, torch, triton, CUDA and the NVIDIA driver, the devices, fastcl), which
backends run here and why the others do not, the CUDA extension's build state, and then runs
:func:`fastcl.selfcheck.check` for every (fused backend, device, dtype, loss) with a pass/fail table.
The results also go to the self-check's disk cache, so ``backend="auto"`` uses them (docs/gpu.md).
Without a CUDA device it says so, lists the backends and exits 0 (``--device cpu`` with
``TRITON_INTERPRET=1`` checks the interpreted Triton kernels instead). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import fastcl
from fastcl import dispatch, selfcheck
from fastcl.profiler.cli import _names  # comma lists of names or `all`, as fastcl bench reads them

__all__ = ["main", "environment_lines", "extension_state"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_DEFAULT_DTYPES = ("float32", "bfloat16", "float16")
_FUSED = tuple(b for b in dispatch.BACKENDS if b != "torch")


def extension_state() -> str:
    """The CUDA extension (csrc/, ``backend="cuda"``): prebuilt, to be built just in time, or why not."""
    reason = dispatch.unavailable_reason("cuda")  # through the one dispatch point, as every caller above it
    if reason is not None:
        return f"not usable: {reason}"
    if importlib.util.find_spec("fastcl._C") is not None:
        return "built ahead of time (fastcl._C)"
    from torch.utils import cpp_extension

    return (
        f"not built in this install; built just in time on first use (nvcc from {cpp_extension.CUDA_HOME}, "
        "ninja; about a minute, cached under TORCH_EXTENSIONS_DIR)"
    )


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return importlib.import_module(module).__version__
    except Exception as error:  # a broken install is worth reporting, not a crash of the doctor
        return f"cannot be imported ({type(error).__name__}: {error})"


def environment_lines() -> list[tuple[str, str]]:
    """(label, value) rows describing this machine, in print order."""
    cuda = torch.version.cuda
    rows = [
        ("fastcl", f"{fastcl.__version__} ({Path(fastcl.__file__).parent})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} ({'CUDA ' + cuda if cuda else 'no CUDA'} build)"),
        ("triton", f"{_version('triton')}" + (" (TRITON_INTERPRET=1)" if dispatch.triton_interpreted() else "")),
        ("NVIDIA driver", selfcheck.nvidia_driver() or "none found"),
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append(
                (
                    f"cuda:{index}",
                    f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                    f"{props.total_memory / 2**30:.1f} GiB)",
                )
            )
    else:
        rows.append(("devices", "no CUDA device (torch.cuda.is_available() is False)"))
    rows.append(("CUDA extension", extension_state()))
    rows.append(("self-check", "on" if selfcheck.enabled() else "off (FASTCL_SELFCHECK=0)"))
    rows.append(("self-check cache", str(selfcheck.cache_dir())))
    return rows


def build_parser() -> argparse.ArgumentParser:
    from fastcl import registry

    parser = argparse.ArgumentParser(
        prog="fastcl doctor",
        description="Print the environment and the backends that run here, then self-check every fused backend "
        "against the float64 torch backend on each CUDA device (exit status 1 when a check fails).",
    )
    parser.add_argument(
        "--device",
        help="check this device only (default: every CUDA device; 'cpu' checks the Triton interpreter and "
        "needs TRITON_INTERPRET=1)",
    )
    parser.add_argument(
        "--backends", type=_names(_FUSED, "--backends"), help="comma list or all (default: the fused ones that run)"
    )
    parser.add_argument(
        "--dtypes",
        type=_names(list(_DTYPES), "--dtypes"),
        default=list(_DEFAULT_DTYPES),
        help="comma list or all (default: %(default)s)",
    )
    parser.add_argument(
        "--losses",
        type=_names(list(registry.LOSSES), "--losses"),
        default=list(registry.LOSSES),
        help="comma list or all (default: all)",
    )
    parser.add_argument("--no-check", action="store_true", help="print the environment and backends only")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="run each check a second time and report that time too: the check's own cost, without the "
        "first run's kernel compilation and autotuning",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the environment and every result as JSON")
    return parser


def _devices(requested: Optional[str]) -> list[torch.device]:
    if requested is not None:
        return [torch.device(requested)]
    if not torch.cuda.is_available():
        return []
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _row(result: selfcheck.CheckResult, warm: Optional[selfcheck.CheckResult]) -> str:
    worst = max(result.errors.values(), default=float("nan"))
    status = "pass" if result.passed else "FAIL"
    line = f"  {result.backend:<7} {result.device:<7} {result.dtype:<9} {result.loss:<9} {status:<5} "
    line += f"{worst:>10.2e} {result.seconds:>8.2f}"
    if warm is not None:
        line += f" {warm.seconds * 1e3:>8.1f}" + ("" if warm.passed == result.passed else " (warm run differs)")
    return line + ("" if result.passed else f"  {result.detail}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    print("fastcl doctor")
    rows = environment_lines()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")

    devices = _devices(args.device)
    print("backends")
    for backend in dispatch.BACKENDS:
        reasons = {str(d): dispatch.unavailable_reason(backend, d) for d in devices} or {
            "": dispatch.unavailable_reason(backend)
        }
        reason = next((r for r in reasons.values() if r is not None), None)
        print(f"  {backend:<7} {'runs' if reason is None else 'cannot run: ' + reason}")

    report = {"environment": dict(rows), "results": []}
    status = 0
    if args.no_check:
        pass
    elif not devices:
        print(
            "self-check: no CUDA device here, so there is nothing to check: backend='auto' runs the torch "
            "backend on CPU tensors (--device cpu with TRITON_INTERPRET=1 checks the Triton interpreter)"
        )
    else:
        status = _check(args, devices, report)
    _write(args.json, report)
    return status


def _write(path: Optional[str], report: dict) -> None:
    if path:
        with open(path, "w") as out:
            json.dump(report, out, indent=1)


def _check(args, devices: list[torch.device], report: dict) -> int:
    bars = ", ".join(f"{selfcheck.dtype_name(d)} {t:g}" for d, t in selfcheck.TOLERANCE.items())
    print(f"self-check: each fused backend vs the torch backend in float64 (relative error bars: {bars})")
    header = f"  {'backend':<7} {'device':<7} {'dtype':<9} {'loss':<9} {'':<5} {'worst err':>10} {'seconds':>8}"
    print(header + (f" {'warm ms':>8}" if args.warm else ""))
    failed = total = 0
    for device in devices:
        backends = args.backends or [b for b in _FUSED if dispatch.unavailable_reason(b, device) is None]
        if not backends:
            print(f"  {device}: no fused backend runs here")
        results = []
        for backend in backends:
            for dtype in args.dtypes:
                for loss in args.losses:
                    result = selfcheck.check(backend, device, _DTYPES[dtype], loss)
                    warm = selfcheck.check(backend, device, _DTYPES[dtype], loss) if args.warm else None
                    print(_row(result, warm), flush=True)
                    results.append(result)
                    extra = {"case": result.case} | ({"warm_seconds": warm.seconds} if warm else {})
                    report["results"].append(vars(result) | extra)
                    _write(args.json, report)  # each row as it comes: a run stopped by a time limit keeps them
                    total += 1
                    failed += not result.passed
        if results:
            path = selfcheck.record(device, results)
            print(f"  recorded in {path}")
    print(f"self-check: {total - failed} of {total} passed" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
