"""Compile check of the CUDA extension without a GPU (``make cuda-check``).

1. nvcc compiles every kernel of csrc/block_kernels.cu for each architecture (sm_80, sm_90) with
   ``-Xptxas -v``; the log names the architecture and, per kernel, registers, shared memory and the ptxas
   spill line. Any spill (store or load) in these shipped configurations fails the check.
2. The torch binding csrc/block_ops.cpp is compiled (syntax only) against the installed torch's headers,
   when torch is importable — a CPU build of torch lacks one generated CUDA header, stubbed here.

Exit status 0 when everything compiled without spills; 1 otherwise; 0 with a "skipped" line when nvcc is
not installed (set FASTCL_REQUIRE_NVCC=1 to make that an error). ``--markdown`` also prints the resource
table that csrc/README.md records. Resources are compile-time facts, not measurements.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent
BUILD = CSRC.parent / "build" / "cuda-check"
ARCHES = ("80", "90")
# The flags torch.utils.cpp_extension gives nvcc (the AOT and JIT builds), so the check compiles what ships.
NVCC_FLAGS = (
    "-std=c++20",
    "-O3",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-Xptxas",
    "-v",
)

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def short_name(mangled: str) -> str:
    """`block_forward_kernel<__nv_bfloat16, wmma16>` from the mangled entry name (c++filt when present).

    Example:
        >>> short_name("plain_kernel")
        'plain_kernel'
    """
    name = mangled
    if shutil.which("c++filt"):
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    name = name.replace("fastcl::(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name).removeprefix("void ")
    paths = ("fma", "wmma16", "wmma-tf32", "wmma-tf32x3")  # the MathPath enum of block_kernels.cu
    name = re.sub(r"Config<([\w:]+), (\d)>", lambda m: f"{m.group(1)}, {paths[int(m.group(2))]}", name)
    return name.replace(" >", ">")


def ptxas_report(log: str) -> list[dict]:
    """One entry per kernel: name, arch, registers, smem bytes, spill stores / loads (bytes)."""
    kernels, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {
                "kernel": short_name(m.group(1)),
                "arch": m.group(2),
                "spill_stores": 0,
                "spill_loads": 0,
                "registers": 0,
                "smem": 0,
                "spill_line": "",
            }
            kernels.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current.update(spill_stores=int(m.group(2)), spill_loads=int(m.group(3)), spill_line=line.strip())
        elif current is not None and (m := _USED.search(line)):
            smem = _SMEM.search(line)
            current.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    return kernels


def compile_kernels(nvcc: str, arch: str) -> tuple[int, str, str]:
    """(exit status, the command line, nvcc's output with the ptxas report) for one architecture."""
    command = [
        nvcc,
        *NVCC_FLAGS,
        f"-arch=sm_{arch}",
        "-c",
        str(CSRC / "block_kernels.cu"),
        "-o",
        str(BUILD / f"block_kernels_sm{arch}.o"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, f"== sm_{arch}: {' '.join(command)}", result.stdout + result.stderr


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (CUDA_HOME, CUDA_PATH, or /usr/local/cuda)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


def check_binding() -> bool | None:
    """Syntax-only compile of block_ops.cpp against torch's headers; None when torch, g++ or the CUDA headers
    are missing (the line says which)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    cuda_include = cuda_include_dir()
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        include_paths = None
    if compiler is None or cuda_include is None or include_paths is None:
        print("== binding: skipped (needs g++, torch and the CUDA headers; set CUDA_HOME)", flush=True)
        return None
    stub = BUILD / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"  # generated in CUDA torch builds only
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    command = [
        compiler,
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-DTORCH_EXTENSION_NAME=_C",
        *(f"-I{p}" for p in include_paths()),
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{cuda_include}",
        f"-idirafter{BUILD / 'stub'}",
        str(CSRC / "block_ops.cpp"),
    ]
    print("== binding: g++ -fsyntax-only csrc/block_ops.cpp (torch headers)", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    print("\n".join(errors) if errors else "binding compiles", flush=True)
    return result.returncode == 0


def markdown(kernels: list[dict]) -> str:
    """One row per kernel: registers and shared memory per architecture, spill bytes over all of them."""
    arches = sorted({k["arch"] for k in kernels})
    head = " | ".join(f"{arch} registers / smem (B)" for arch in arches)
    lines = [f"| kernel | {head} | spill stores / loads (B) |", "|---" * (len(arches) + 2) + "|"]
    for name in sorted({k["kernel"] for k in kernels}):
        rows = {k["arch"]: k for k in kernels if k["kernel"] == name}
        cells = " | ".join(f"{rows[a]['registers']} / {rows[a]['smem']}" if a in rows else "-" for a in arches)
        stores = sum(r["spill_stores"] for r in rows.values())
        loads = sum(r["spill_loads"] for r in rows.values())
        lines.append(f"| `{name}` | {cells} | {stores} / {loads} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the resource table for csrc/README.md")
    parser.add_argument("--no-binding", action="store_true", help="skip the torch-header compile of block_ops.cpp")
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))
    if nvcc is None:
        print("cuda-check skipped: nvcc is not installed (install the CUDA toolkit to run it)")
        return 1 if os.environ.get("FASTCL_REQUIRE_NVCC") == "1" else 0
    start, failed, kernels = time.monotonic(), False, []
    BUILD.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor() as pool:  # the architectures and the binding compile side by side
        binding = None if args.no_binding else pool.submit(check_binding)
        builds = [pool.submit(compile_kernels, nvcc, arch) for arch in ARCHES]
        results = [build.result() for build in builds]
        if binding is not None and binding.result() is False:
            print("FAIL: csrc/block_ops.cpp does not compile against torch's headers")
            failed = True
    for arch, (status, header, log) in zip(ARCHES, results):
        print(header)
        (BUILD / f"ptxas_sm{arch}.log").write_text(log)
        if status != 0:
            print(log)
            print(f"FAIL: nvcc exited with {status} for sm_{arch}")
            failed = True
            continue
        report = ptxas_report(log)
        kernels += report
        for k in report:
            print(
                f"  {k['arch']}  {k['kernel']:<56} {k['registers']:>3} registers  {k['smem']:>6} B smem  "
                f"{k['spill_line']}"
            )
        spilling = [k for k in report if k["spill_stores"] or k["spill_loads"]]
        for k in spilling:
            print(f"FAIL: {k['kernel']} spills on {k['arch']}: {k['spill_line']}")
        failed |= bool(spilling) or not report
    if args.markdown:
        print(markdown(kernels))
    print(
        f"cuda-check {'FAILED' if failed else 'passed'}: {len(kernels)} kernel builds, archs "
        f"{', '.join('sm_' + a for a in ARCHES)} ({time.monotonic() - start:.0f} s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
