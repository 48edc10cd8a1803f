"""Compiling the shipped kernels for a GPU target without a GPU (the engine of the compile-only report,
``fastcl.profiler.compile_report``; see its docstring for what each figure means).

:func:`compile_one` compiles one (kernel, config, dtype, D', arch) task with ``triton.compile(ASTSource,
target=GPUTarget("cuda", arch, 32))`` under the JIT's own specialization of the launch arguments, runs
ptxas -v and nvdisasm on the result, and returns the report row. It must run in a process where Triton
is not in interpreter mode (the report spawns fresh workers). :func:`analyze_sass` reads the SASS;
:func:`address_check` walks a kernel's TTIR for 32-bit pointer offsets (:func:`layout_address_check`: in
every input layout of ``_common.LAYOUTS``, the other layouts compiled to TTIR only by :func:`ttir`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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
            [
                get_ptxas(arch).path,
                "-lineinfo",
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                str(source),
                "-o",
                str(source.with_suffix(".o")),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(registers.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
# mma.sync shapes (m, n, k) by their SASS suffix; HGMMA names its own (m x n x k, one warpgroup = 4 warps).
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32)}
_WIDTH_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# Per-region totals of the SASS (per warp; see :func:`analyze_sass`).
REGION_FIELDS = (
    "instructions",
    "ex2",
    "mufu",
    "mma",
    "mma_flops",
    "async_bytes",
    "tile_ldg_bytes",
    "vector_ldg_bytes",
    "tma_loads",
)


def _mma_flops(op: str) -> float:
    """FLOPs one warp's instance of an MMA instruction does (0 for other instructions). A warpgroup's HGMMA
    appears in each of its 4 warps' streams, so each instance carries a quarter of m·n·k·2."""
    match = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if match:
        m, n, k = (int(g) for g in match.groups())
        return m * n * k * 2 / 4
    match = re.match(r"[HD]MMA\.(\d+)", op)
    if match and match.group(1) in _HMMA_SHAPES:
        m, n, k = _HMMA_SHAPES[match.group(1)]
        return m * n * k * 2
    return 0.0


def _load_bytes(op: str) -> int:
    """Bytes per lane of a global load (LDG / LDGSTS): its width suffix, 4 without one."""
    return next((_WIDTH_BYTES[part] for part in op.split(".")[1:] if part in _WIDTH_BYTES), 4)


def _region(opcodes: list[str]) -> dict:
    """Totals of a run of SASS opcodes, per warp: instructions (NOPs excluded), MUFU.EX2 and all MUFU ops,
    MMA instructions and their FLOPs, and global-load lane bytes by kind — ``async_bytes``: LDGSTS
    (cp.async; ``.BYPASS`` = cp.async.cg, L1 bypassed), ``tile_ldg_bytes``: 128-bit LDG (vectorized tile
    operands, distinct addresses per lane), ``vector_ldg_bytes``: narrower LDG (per-row / per-column
    vectors, replicated across lanes, L1-cached), ``tma_loads``: TMA copies (UTMALDG / UBLKCP: their size
    is in a descriptor, not the instruction)."""
    totals = dict.fromkeys(REGION_FIELDS, 0)
    for op in opcodes:
        if op == "NOP":
            continue
        totals["instructions"] += 1
        totals["ex2"] += op.startswith("MUFU.EX2")
        totals["mufu"] += op.startswith("MUFU.")
        flops = _mma_flops(op)
        totals["mma"] += flops > 0
        totals["mma_flops"] += flops
        if op.startswith("LDGSTS"):
            totals["async_bytes"] += 32 * _load_bytes(op)
        elif op.startswith("LDG."):
            width = _load_bytes(op)
            totals["tile_ldg_bytes" if width >= 16 else "vector_ldg_bytes"] += 32 * width
        elif op.startswith(("UTMALDG", "UBLKCP")):
            totals["tma_loads"] += 1
    return totals


def _subtract(total: dict, parts: list[dict]) -> dict:
    return {key: total[key] - sum(part[key] for part in parts) for key in total}


def analyze_sass(sass: str) -> dict:
    """MMA kind and the element loop's structure from ``nvdisasm -c`` output (see module docstring).

    The element loop is the innermost SASS loop (a backward branch and its target) holding a
    ``MUFU.EX2``: the walk over similarity tiles. Returned: its static counts (``loop_instructions``,
    ``loop_ex2``, ``loop_mma``, nested loops counted once), and for the whole-pass counts ``loop_outside``
    (the totals of :func:`_region` of the element loop without the loops nested in it) and ``loop_nested``
    (one :func:`_region` per loop nested directly in it: the feature-chunk loops, whose trips the caller
    supplies). All counts are per warp.

    Example:
        >>> sass = '''
        ... .L_x_1:
        ...         /*0000*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        ...         /*0010*/                   MUFU.EX2 R5, R5 ;
        ...         /*0020*/              @!P0 BRA `(.L_x_1) ;
        ...         /*0030*/                   EXIT ;
        ... '''
        >>> found = analyze_sass(sass)
        >>> found["mma"], found["loop_instructions"], found["loop_ex2"], found["loop_nested"]
        ('wgmma', 3, 1, [])
        >>> found["loop_outside"]["mma_flops"]  # 64·128·16·2 per warpgroup, a quarter per warp
        65536.0
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
        return dict(mma=mma, loop_instructions=None, loop_ex2=None, loop_mma=None, loop_outside=None, loop_nested=None)
    start, end = min(holding, key=lambda loop: loop[1] - loop[0])
    inside = sorted({loop for loop in loops if start <= loop[0] and loop[1] <= end and loop != (start, end)})
    direct = [loop for loop in inside if not any(o != loop and o[0] <= loop[0] and loop[1] <= o[1] for o in inside)]
    body = _region(opcodes[start : end + 1])
    nested = [_region(opcodes[a : b + 1]) for a, b in direct]
    return dict(
        mma=mma,
        loop_instructions=body["instructions"],
        loop_ex2=body["ex2"],
        loop_mma=body["mma"],
        loop_outside=_subtract(body, nested),
        loop_nested=nested,
    )


def whole_pass(measured: dict, config, D: int, precision: str) -> dict:
    """The whole-pass figures of a compiled kernel per similarity element (everything a program does for
    one element, over every trip and every output slice), from :func:`analyze_sass`'s element loop:

    - trips: the loops nested in the element loop are the feature-chunk loops
      (``for d0 in range(0, D, BLOCK_D)``): ⌈D'/BLOCK_D⌉ trips each — the formula, from the kernel's loop
      structure; ``gemm_units`` checks it against the SASS (the first unit must come out exactly 1);
    - slices: a config with ``BLOCK_DO`` is a backward whose grid has ⌈D'/BLOCK_DO⌉ output slices, each
      walking every tile again: the per-visit figures times the slices;
    - per element: per-warp counts × num_warps (× 32 lanes for instructions) / (BLOCK_M × BLOCK_N).

    ``l2_bytes_per_element`` counts the loads that reach L2: LDGSTS (cp.async.cg bypasses L1) minus the
    (num_stages − 1) chunks the pipeliner's prologue issued ahead of the loop and its body then issues
    again predicated off past the end, plus 128-bit LDG tile loads; narrower LDG (per-row / column vectors
    that lanes share, L1 hits after the first) are ``vector_load_lane_bytes_per_element``, not counted.
    ``gemm_units``: SASS MMA FLOPs per element / (2·D'), tf32x3's three products counted once — 1 for a
    forward, 1 + BLOCK_DO·slices/D' for a backward pass that recomputes the tile and multiplies it into one
    operand slice per slice."""
    outside, nested = measured.get("loop_outside"), measured.get("loop_nested")
    if outside is None:
        return {}
    kwargs = config.kwargs
    trips = -(-D // kwargs["BLOCK_D"])
    slices = -(-D // kwargs["BLOCK_DO"]) if "BLOCK_DO" in kwargs else 1
    dynamic = {key: outside[key] + trips * sum(loop[key] for loop in nested) for key in outside}
    prologue = (config.num_stages - 1) * sum(loop["async_bytes"] for loop in nested)
    if 0 < prologue <= outside["async_bytes"]:
        dynamic["async_bytes"] -= prologue
    per_element = config.num_warps * slices / (kwargs["BLOCK_M"] * kwargs["BLOCK_N"])
    products = 3 if precision == "tf32x3" else 1
    return dict(
        feature_trips=trips if nested else 1,
        output_slices=slices,
        dynamic_instructions_per_element=round(32 * dynamic["instructions"] * per_element, 2),
        dynamic_ex2_per_element=round(32 * dynamic["ex2"] * per_element, 3),
        dynamic_mufu_per_element=round(32 * dynamic["mufu"] * per_element, 3),
        l2_bytes_per_element=round((dynamic["async_bytes"] + dynamic["tile_ldg_bytes"]) * per_element, 3),
        vector_load_lane_bytes_per_element=round(dynamic["vector_ldg_bytes"] * per_element, 3),
        tma_loads=dynamic["tma_loads"],
        mma_flops_per_element=round(dynamic["mma_flops"] * per_element, 2),
        gemm_units=round(dynamic["mma_flops"] * per_element / (2 * D * products), 3),
    )


def _cache_path(kernel_hash: str) -> Path:
    from triton import knobs

    return Path(knobs.cache.dir) / "fastcl-compile-report-v2" / f"{kernel_hash}.json"


def _source(spec, config, arch: int):
    """(ASTSource, compile options, target) of ``spec`` under ``config`` (a ``triton.Config``), with the JIT's own
    specialization of the launch arguments (and the meta-parameters of any ``triton.heuristics``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

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
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__, target


def ttir(spec, config, arch: int = 90) -> str:
    """The TTIR of ``spec`` under ``config``: only Triton's first stage (a fraction of a second; no ptxas)."""
    from triton._C.libtriton import ir
    from triton.compiler import make_backend

    source, options, target = _source(spec, config, arch)
    backend = make_backend(target)
    options = backend.parse_options(options)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    stages = {}
    backend.add_stages(stages, options, source.language)
    module = source.make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context
    )
    return str(stages["ttir"](module, {}))


def spec_configs(spec, arch_name: str, dtype) -> list:
    """The configs a spec is compiled under: its autotune table (``_common.tile_configs``), or for a
    ``"launch"`` spec (``kernels.auxiliary_specs``) the launch's own (its constexprs, 4 warps)."""
    import triton

    from fastcl.kernels._common import LAUNCH_OPTIONS, tile_configs

    if spec.kind == "launch":
        return [triton.Config(dict(LAUNCH_OPTIONS), num_warps=4, num_stages=3)]
    return tile_configs(spec.kind, arch_name, dtype, spec.constexprs)


def layout_address_check(task: dict, contiguous_ttir: str | None = None) -> str:
    """:func:`address_check` of the task's kernel for every input layout (``_common.LAYOUTS``): "ok", or the
    first fault prefixed with its layout. ``contiguous_ttir``: the contiguous layout's TTIR, if compiled."""
    import torch

    from fastcl.kernels import compile_specs
    from fastcl.kernels._common import LAYOUTS

    dtype_name, precision = DTYPES[task["dtype"]]
    dtype = getattr(torch, dtype_name)
    for layout in LAYOUTS:
        spec = next(s for s in compile_specs(dtype, precision, task["D"], layout=layout) if s.name == task["kernel"])
        if layout == "contiguous" and contiguous_ttir is not None:
            text = contiguous_ttir
        else:
            config = spec_configs(spec, task["arch_name"], dtype)[task["config_index"]]
            text = ttir(spec, config, ARCHES[task["arch_name"]])
        verdict = address_check(text)
        if verdict != "ok":
            return f"{layout}: {verdict}"
    return "ok"


def compile_one(task: dict) -> dict:
    """Compiles one (kernel, config, dtype, D, arch) and returns its report row (or its error)."""
    import torch
    import triton

    from fastcl.kernels import compile_specs
    from fastcl.kernels._common import tile_configs

    dtype_name, precision = DTYPES[task["dtype"]]
    spec = next(s for s in compile_specs(getattr(torch, dtype_name), precision, task["D"]) if s.name == task["kernel"])
    config = tile_configs(spec.kind, task["arch_name"], getattr(torch, dtype_name), spec.constexprs)[
        task["config_index"]
    ]
    row = dict(
        kernel=spec.name,
        arch=task["arch_name"],
        dtype=task["dtype"],
        precision=precision,
        D=task["D"],
        config=_config_name(config),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **{k.lower(): v for k, v in config.kwargs.items() if k.startswith("BLOCK")},
    )
    arch = ARCHES[task["arch_name"]]
    source, options, target = _source(spec, config, arch)
    started = time.perf_counter()
    try:
        compiled = triton.compile(source, target=target, options=options)
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
            sass = subprocess.run([_nvdisasm(), "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
        measured = {
            **_ptxas_resources(compiled.asm["ptx"], arch),
            **analyze_sass(sass),
            "shared_bytes": compiled.metadata.shared,
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(measured))
    row.update(measured)
    row["shared_limit"] = SHARED_LIMIT[arch]
    row["fits"] = row["shared_bytes"] <= SHARED_LIMIT[arch]
    row["address_check"] = layout_address_check(task, compiled.asm["ttir"])
    elements = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]
    threads = 32 * config.num_warps
    # Static: one element-loop body, nested loops once, one output slice (not a total; see whole_pass).
    row["static_loop_instructions"] = row.pop("loop_instructions")
    for key, count in (
        ("static_instructions_per_element", "static_loop_instructions"),
        ("static_ex2_per_element", "loop_ex2"),
    ):
        row[key] = None if row[count] is None else round(row[count] * threads / elements, 2)
    row.update(whole_pass(row, config, task["D"], precision))
    del row["loop_outside"], row["loop_nested"]
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
                    tasks += [
                        dict(kernel=spec.name, arch_name=arch_name, dtype=dtype, D=d, config_index=i)
                        for i in range(count)
                    ]
    return tasks


# --- the address check: a def-use walk over TTIR text ------------------------------------------------------

_VALUE = re.compile(r"%[\w.$-]+(?:#\d+)?")
_LOCATION_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_ARGUMENT = re.compile(r"(%[\w.$-]+): ([^\s,{)]+)")
_FOR = re.compile(r"scf\.for (%[\w.$-]+) = ")
_ITER_ARGS = re.compile(r"iter_args\(([^)]*)\)")
_I32 = re.compile(r":\s*(?:tensor<[\dx]*x)?i32>?$")
# Ops that only move, reshape or widen a value: a constant / an argument stays one through them.
_PASS_THROUGH = (
    "tt.splat",
    "tt.broadcast",
    "tt.expand_dims",
    "tt.reshape",
    "arith.extsi",
    "arith.extui",
    "arith.trunci",
    "arith.index_cast",
)
# Integer products (shli: a product by a power of two).
_PRODUCTS = ("arith.muli", "arith.shli")


def _strip_locations(line: str) -> tuple[str, str | None]:
    """(the line without its `` loc(...)`` annotations, the last one's contents: the op's own location)."""
    last = None
    while (begin := line.find(" loc(")) >= 0:
        depth, end = 0, begin + 4
        for end in range(begin + 4, len(line)):
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            if depth == 0:
                break
        last, line = line[begin + 5 : end], line[:begin] + line[end + 1 :]
    return line.rstrip(), last


def _source_line(reference: str | None, locations: dict) -> str:
    """``file:line`` of the innermost source line behind a location reference (callee of a callsite)."""
    seen = 0
    while reference is not None and seen < 64:
        seen += 1
        reference = reference.strip()
        if reference.startswith("#loc"):
            reference = locations.get(reference)
        elif reference.startswith("callsite("):
            reference = reference[len("callsite(") :].split(" at ")[0]
        elif reference.startswith('"'):
            name, _, rest = reference[1:].partition('"')
            if rest.startswith(":"):
                return f"{Path(name).name}:{rest[1:].split(':')[0]}"
            reference = rest.strip("()") or None
        else:
            return ""
    return ""


class _Node(NamedTuple):
    op: str  # "arg", "iv", "block-arg" or the op name
    text: str
    location: str | None
    sources: list


def _parse_ttir(ttir: str) -> tuple[list[_Node], list[int], dict]:
    """(nodes, the tt.addptr nodes, locations) of a TTIR module's text: one node per SSA value, its
    sources the values it is computed from (scf.for iter_args: the initial and the yielded value; results
    of an op with regions: their yields). Names are resolved in MLIR's region scopes."""
    nodes: list[_Node] = []
    addptrs: list[int] = []
    locations: dict = {}
    scopes: list[dict] = [{}]
    owners: list = []  # per open region: (op kind, result node ids, iter_arg node ids)

    def define(name, node):
        nodes.append(node)
        scopes[-1][name] = len(nodes) - 1
        return len(nodes) - 1

    def resolve(name):
        return next((scope[name] for scope in reversed(scopes) if name in scope), None)

    def result_names(lhs):  # "%x" or "%x:2" (then used as %x#0, %x#1); "" for an op without results
        name, _, count = lhs.partition(":")
        return [] if not name else [name] if not count else [f"{name}#{k}" for k in range(int(count))]

    for raw in ttir.splitlines():
        match = _LOCATION_DEF.match(raw.strip())
        if match:
            locations[match.group(1)] = match.group(2)
            continue
        line, location = _strip_locations(raw)
        line = line.strip()
        if line.startswith("tt.func"):
            for name, kind in _ARGUMENT.findall(line):
                define(name, _Node("arg", f"{name}: {kind}", location, []))
            scopes.append({})
            owners.append(("tt.func", [], []))
            continue
        if line.startswith("}"):
            scopes.pop()
            owner = owners.pop()
            if line.endswith("{"):  # } else {
                scopes.append({})
                owners.append(owner)
            continue
        if line.startswith("^"):  # a block's arguments (reduce / scan bodies)
            for name, kind in _ARGUMENT.findall(line):
                define(name, _Node("block-arg", f"{name}: {kind}", location, []))
            continue
        lhs, _, rhs = line.partition(" = ") if line.startswith("%") else ("", "", line)
        op = rhs.split(" ", 1)[0].split("(", 1)[0].strip('"')
        if op == "scf.yield" and owners:
            kind, result_ids, iter_ids = owners[-1]
            for k, name in enumerate(_VALUE.findall(rhs)):
                source = resolve(name)
                for ids in (result_ids, iter_ids):
                    if k < len(ids) and source is not None:
                        nodes[ids[k]].sources.append(source)
            continue
        if op == "scf.for":
            iterated = _ITER_ARGS.search(rhs)
            pairs = [p.split(" = ") for p in iterated.group(1).split(", ")] if iterated else []
            inits = [resolve(init.strip()) for _, init in pairs]
            result_ids = [
                define(name, _Node(op, line, location, [inits[k]])) for k, name in enumerate(result_names(lhs))
            ]
            scopes.append({})
            define(_FOR.search(rhs).group(1), _Node("iv", line, location, []))
            iter_ids = [
                define(name.strip(), _Node("block-arg", line, location, [inits[k]]))
                for k, (name, _) in enumerate(pairs)
            ]
            owners.append((op, result_ids, iter_ids))
            continue
        operands = [i for i in (resolve(n) for n in _VALUE.findall(rhs)) if i is not None]
        if op == "arith.select":
            operands = operands[1:]  # the condition only picks between the values
        ids = [define(name, _Node(op, line, location, list(operands))) for name in result_names(lhs)]
        if op == "tt.addptr":
            addptrs.append(ids[0])
        if line.endswith("{") or line.endswith("({"):
            scopes.append({})
            owners.append((op, ids, []))
    return nodes, addptrs, locations


def address_check(ttir: str) -> str:
    """``"ok"`` when no ``tt.addptr`` offset of the kernel is built from a 32-bit product that can pass 2³¹,
    else the first offending op (text and source line).

    The walk goes from each ``tt.addptr`` offset back through the integer ops that compute it (scf.for
    iter_args and yields included) to the kernel's arguments, and flags every i32 ``arith.muli`` /
    ``arith.shli`` on the way (even one widened to i64 afterwards: it wraps before the widening) that is
    - index × runtime value: neither operand a compile-time constant (row × stride, view × N, ...), or
    - constant × argument: an operand that is a kernel argument as passed (a runtime stride or size; e.g.
      BLOCK_D × stride).
    A row index times a compile-time constant (program_id × BLOCK_M) is fine: it stays below the row
    count plus a tile. Loaded values, compares and loop counters are leaves. Triton passes integer
    arguments ≥ 2³¹ as i64 and specializes arguments equal to 1 away, so check the layouts whose strides
    are runtime values (transposed, strided), not only contiguous rows.

    Example:
        >>> narrow = '''
        ... tt.func public @k(%x: !tt.ptr<f32>, %stride: i32) {
        ...   %pid = tt.get_program_id x : i32
        ...   %off = arith.muli %pid, %stride : i32
        ...   %p = tt.addptr %x, %off : !tt.ptr<f32>, i32
        ...   tt.return
        ... }'''
        >>> address_check(narrow)
        'i32 product reaches tt.addptr: %off = arith.muli %pid, %stride : i32'
        >>> wide = '''
        ... tt.func public @k(%x: !tt.ptr<f32>, %stride: i32) {
        ...   %pid = tt.get_program_id x : i32
        ...   %row = arith.extsi %pid : i32 to i64
        ...   %stride64 = arith.extsi %stride : i32 to i64
        ...   %off = arith.muli %row, %stride64 : i64
        ...   %p = tt.addptr %x, %off : !tt.ptr<f32>, i64
        ...   tt.return
        ... }'''
        >>> address_check(wide)
        'ok'
    """
    faults = address_faults(ttir)
    return faults[0] if faults else "ok"


def address_faults(ttir: str) -> list[str]:
    """Every fault :func:`address_check` would name (each offending op once, with its source line)."""
    nodes, addptrs, locations = _parse_ttir(ttir)

    def through(index, kinds):
        while nodes[index].op in _PASS_THROUGH and nodes[index].sources:
            index = nodes[index].sources[0]
        return nodes[index].op in kinds

    faults, seen = [], set()
    for start in addptrs:
        stack = [s for s in nodes[start].sources[1:2] if s not in seen]
        seen.update(stack)
        while stack:
            node = nodes[stack.pop()]
            if node.op in _PRODUCTS and _I32.search(node.text) and len(node.sources) == 2:
                constant = [through(s, ("arith.constant",)) for s in node.sources]
                argument = [through(s, ("arg",)) for s in node.sources]
                if not any(constant) or any(argument):
                    where = _source_line(node.location, locations)
                    faults.append(f"i32 product reaches tt.addptr: {node.text}" + (f" ({where})" if where else ""))
            if node.op in ("tt.load", "arith.cmpi", "iv"):
                continue
            for source in node.sources:
                if source not in seen:
                    seen.add(source)
                    stack.append(source)
    return faults
