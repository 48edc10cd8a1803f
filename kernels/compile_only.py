"""Compiling the shipped kernels for a GPU target without a GPU (the engine of the compile-only report,
``fastcl.profiler.compile_report``; see its docstring for what each figure means).

:func:`compile_one` compiles one (kernel, config, dtype, D', arch) task with ``triton.compile(ASTSource,
target=GPUTarget("cuda", arch, 32))`` under the JIT's own specialization of the launch arguments, runs
ptxas -v and nvdisasm on the result, and returns the report row. It must run in a process where Triton
is not in interpreter mode (the report spawns fresh workers). :func:`analyze_sass` reads the SASS.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

# report dtype name → (torch dtype name, tl.dot input precision)
DTYPES = {
    "bf16": ("bfloat16", "ieee"),
    "fp16": ("float16", "ieee"),
    "fp32": ("float32", "tf32x3"),  # the default for fp32 rows
    "fp32-tf32": ("float32", "tf32"),
    "fp32-ieee": ("float32", "ieee"),  # on request only; FMA, slow to compile
}
ARCHES = {"sm80": 80, "sm90": 90}
# Largest shared memory one block may use (opt-in): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}
REGISTER_LIMIT = 255  # per thread


def init_worker() -> None:
    """Process initializer: compiled kernels, not interpreted ones (before triton is imported)."""
    os.environ["TRITON_INTERPRET"] = "0"


def _nvdisasm() -> str:
    """Triton's bundled nvdisasm (next to its ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return str(Path(get_ptxas(90).path).with_name("nvdisasm"))


def _ptxas_resources(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ptx")
        source.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", str(source), "-o", str(source.with_suffix(".o"))],
            check=True, capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(registers.group(1)), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)))


_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def analyze_sass(sass: str) -> dict:
    """MMA kind and the element loop's static counts from ``nvdisasm -c`` output (see module docstring).

    Example:
        >>> sass = '''
        ... .L_x_1:
        ...         /*0000*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        ...         /*0010*/                   MUFU.EX2 R5, R5 ;
        ...         /*0020*/              @!P0 BRA `(.L_x_1) ;
        ...         /*0030*/                   EXIT ;
        ... '''
        >>> analyze_sass(sass)
        {'mma': 'wgmma', 'loop_instructions': 3, 'loop_ex2': 1, 'loop_mma': 1}
    """
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"\.L_x_\d+:", stripped):
            pending.append(stripped[:-1])
            continue
        match = _INSTRUCTION.search(line)
        if match:
            index = len(instructions)
            for label in pending:
                labels[label] = index
            pending = []
            instructions.append((match.group(2), match.group(3)))
    opcodes = [op for op, _ in instructions]
    if any(op.startswith("HGMMA") for op in opcodes):
        mma = "wgmma"
    elif any(op.startswith("HMMA") for op in opcodes):
        mma = "mma.sync"
    elif any(op.startswith("DMMA") for op in opcodes):
        mma = "dmma"
    else:
        mma = "fma"
    # Loops: backward branches [target, branch]; the element loop is the innermost one holding an ex2.
    loops = []
    for index, (op, operands) in enumerate(instructions):
        target = _BRANCH_TARGET.search(operands)
        if op.startswith("BRA") and target and labels.get(target.group(1), index + 1) <= index:
            loops.append((labels[target.group(1)], index))
    ex2 = [i for i, op in enumerate(opcodes) if op.startswith("MUFU.EX2")]
    holding = [(start, end) for start, end in loops if any(start <= i <= end for i in ex2)]
    if not holding:
        return dict(mma=mma, loop_instructions=None, loop_ex2=None, loop_mma=None)
    start, end = min(holding, key=lambda loop: loop[1] - loop[0])
    body = [op for op in opcodes[start:end + 1] if op != "NOP"]
    return dict(mma=mma, loop_instructions=len(body), loop_ex2=sum(op.startswith("MUFU.EX2") for op in body),
                loop_mma=sum(op.startswith(("HGMMA", "HMMA", "DMMA")) for op in body))


def _cache_path(kernel_hash: str) -> Path:
    from triton import knobs
    return Path(knobs.cache.dir) / "fastcl-compile-report" / f"{kernel_hash}.json"


def compile_one(task: dict) -> dict:
    """Compiles one (kernel, config, dtype, D, arch) and returns its report row (or its error)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from fastcl.kernels import compile_specs
    from fastcl.kernels._common import tile_configs

    dtype_name, precision = DTYPES[task["dtype"]]
    spec = next(s for s in compile_specs(getattr(torch, dtype_name), precision, task["D"])
                if s.name == task["kernel"])
    config = tile_configs(spec.kind, task["arch_name"], getattr(torch, dtype_name),
                          spec.constexprs)[task["config_index"]]
    row = dict(kernel=spec.name, arch=task["arch_name"], dtype=task["dtype"], precision=precision, D=task["D"],
               config=_config_name(config), num_warps=config.num_warps, num_stages=config.num_stages,
               **{k.lower(): v for k, v in config.kwargs.items() if k.startswith("BLOCK")})
    arch = ARCHES[task["arch_name"]]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = spec.fn
    meta = {**spec.constexprs, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    while not isinstance(fn, JITFunction):  # triton.heuristics: the meta-parameters it computes at launch
        named = {**dict(zip(fn.arg_names, spec.args)), **meta}
        meta.update({name: rule(named) for name, rule in fn.values.items()})
        fn = fn.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*spec.args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
    started = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as error:  # a config the compiler rejects is a finding, not a crash of the report
        return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    row["compile_seconds"] = round(time.perf_counter() - started, 2)
    cache = _cache_path(compiled.metadata.hash)
    if cache.exists():
        measured = json.loads(cache.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp, "kernel.cubin")
            cubin.write_bytes(compiled.asm["cubin"])
            sass = subprocess.run([_nvdisasm(), "-c", str(cubin)], check=True, capture_output=True,
                                  text=True).stdout
        measured = {**_ptxas_resources(compiled.asm["ptx"], arch), **analyze_sass(sass),
                    "shared_bytes": compiled.metadata.shared}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(measured))
    row.update(measured)
    row["shared_limit"] = SHARED_LIMIT[arch]
    row["fits"] = row["shared_bytes"] <= SHARED_LIMIT[arch]
    elements = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]
    threads = 32 * config.num_warps
    for key, count in (("instructions_per_element", "loop_instructions"), ("ex2_per_element", "loop_ex2")):
        row[key] = None if row[count] is None else round(row[count] * threads / elements, 2)
    return row


def _config_name(config) -> str:
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks}/w{config.num_warps}/s{config.num_stages}"


def list_tasks(arches: list[str], dtypes: list[str], dims: list[int], kernels: list[str], configs: int) -> list[dict]:
    """The tasks of a report: every spec whose name contains one of ``kernels`` (all if empty) × the first
    ``configs`` entries of its table (all if 0) × ``arches`` × ``dtypes`` × ``dims``."""
    import torch

    from fastcl.kernels import compile_specs
    from fastcl.kernels._common import tile_configs

    tasks = []
    for arch_name in arches:
        for dtype in dtypes:
            dtype_name, precision = DTYPES[dtype]
            for d in dims:
                for spec in compile_specs(getattr(torch, dtype_name), precision, d):
                    if kernels and not any(k in spec.name for k in kernels):
                        continue
                    table = tile_configs(spec.kind, arch_name, getattr(torch, dtype_name), spec.constexprs)
                    count = min(len(table), configs) if configs else len(table)
                    tasks += [dict(kernel=spec.name, arch_name=arch_name, dtype=dtype, D=d, config_index=i)
                              for i in range(count)]
    return tasks


