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
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
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
    spec = next(s for s in compile_specs(getattr(torch, dtype_name), precision, task["D"])
                if s.name == task["kernel"])
    config = tile_configs(spec.kind, task["arch_name"], getattr(torch, dtype_name),
                          spec.constexprs)[task["config_index"]]
    row = dict(kernel=spec.name, arch=task["arch_name"], dtype=task["dtype"], precision=precision, D=task["D"],
               config=_config_name(config), num_warps=config.num_warps, num_stages=config.num_stages,
               **{k.lower(): v for k, v in config.kwargs.items() if k.startswith("BLOCK")})
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
            sass = subprocess.run([_nvdisasm(), "-c", str(cubin)], check=True, capture_output=True,
                                  text=True).stdout
        measured = {**_ptxas_resources(compiled.asm["ptx"], arch), **analyze_sass(sass),
                    "shared_bytes": compiled.metadata.shared}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(measured))
    row.update(measured)
    row["shared_limit"] = SHARED_LIMIT[arch]
    row["fits"] = row["shared_bytes"] <= SHARED_LIMIT[arch]
    row["address_check"] = layout_address_check(task, compiled.asm["ttir"])
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


# --- the address check: a def-use walk over TTIR text ------------------------------------------------------

_VALUE = re.compile(r"%[\w.$-]+(?:#\d+)?")
_LOCATION_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_ARGUMENT = re.compile(r"(%[\w.$-]+): ([^\s,{)]+)")
_FOR = re.compile(r"scf\.for (%[\w.$-]+) = ")
_ITER_ARGS = re.compile(r"iter_args\(([^)]*)\)")
_I32 = re.compile(r":\s*(?:tensor<[\dx]*x)?i32>?$")
# Ops that only move, reshape or widen a value: a constant / an argument stays one through them.
_PASS_THROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "arith.extsi", "arith.extui",
                 "arith.trunci", "arith.index_cast")
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
        last, line = line[begin + 5:end], line[:begin] + line[end + 1:]
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
            reference = reference[len("callsite("):].split(" at ")[0]
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
            result_ids = [define(name, _Node(op, line, location, [inits[k]]))
                          for k, name in enumerate(result_names(lhs))]
            scopes.append({})
            define(_FOR.search(rhs).group(1), _Node("iv", line, location, []))
            iter_ids = [define(name.strip(), _Node("block-arg", line, location, [inits[k]]))
                        for k, (name, _) in enumerate(pairs)]
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
