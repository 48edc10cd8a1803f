"""Compile-only kernel report: what the shipped Triton kernels cost on a GPU, read without one.

Every shipped tile kernel (``fastcl.kernels.compile_specs()``) × tile config (the autotune table of each
architecture) × dtype is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90,
32))``: the same specialization the JIT would use for contiguous rows (16-byte aligned pointers, unit
feature stride), the same ptxas. No GPU is needed. Each row reports, all **compile-time, not measured**:

- ``registers`` per thread and ``spill_stores`` / ``spill_loads`` bytes (``ptxas -v`` on the kernel's PTX,
  with Triton's own ptxas flags);
- ``shared_bytes`` (Triton's metadata) against the architecture's per-block limit (``fits``: a config
  whose shared memory passes the limit can never launch);
- ``mma``: ``wgmma`` (SASS ``HGMMA``), ``mma.sync`` (``HMMA``), ``dmma`` (fp64) or ``fma`` (no tensor
  core instruction at all);
- whole passes (``fastcl.kernels.compile_only.whole_pass``), per similarity element: every trip of the
  feature-chunk loop (⌈D'/BLOCK_D⌉, checked by ``gemm_units``), every output slice of a backward
  (⌈D'/BLOCK_DO⌉ programs walk each tile) — ``dynamic_instructions_per_element``,
  ``dynamic_ex2_per_element`` (``dynamic_mufu_per_element``: every MUFU op), ``l2_bytes_per_element``
  (cp.async.cg / LDGSTS, which bypass L1, and 128-bit tile LDGs, × trips; per-row / column vector LDGs
  that lanes share are left out and shown as ``vector_load_lane_bytes_per_element``),
  ``mma_flops_per_element`` and ``gemm_units`` (MMA FLOPs / 2·D'). A warp instruction does the work of
  32 threads; a tile has BLOCK_M × BLOCK_N elements;
- the static counts beside them, one element-loop body with nested loops once and one output slice, not
  totals: ``static_loop_instructions``, ``static_instructions_per_element``, ``static_ex2_per_element``;
- ``address_check``: ``"ok"`` when no pointer offset of the kernel is an int32 product of runtime values
  (row × stride, feature × stride, view × N, ...) that could wrap past 2³¹ — a def-use walk over the
  kernel's TTIR (``fastcl.kernels.compile_only.address_check``) for each input layout: contiguous rows (as
  compiled for the other columns), column-major (transposed) rows and every other column of a wider
  buffer (``_common.LAYOUTS``; those two are compiled to TTIR only). Otherwise the layout and the first
  offending op with its source line. A fault fails the report (exit status 1).

and from the rows a **MODEL** (``fastcl.profiler.kernel_model``, labelled as such in the JSON and markdown):
per loss × arch × dtype × D' the four bounds at M = 65 536 (tensor, MUFU, issue, L2 — rates stated with
their sources, L2 bandwidth an assumption), ``predicted_ms``, a naive-loss model and the ratio to it, and
#22's targets with their numbers (``targets``).

Usage (``fastcl bench --compile-only`` calls :func:`main`)::

    python -m fastcl.profiler.compile_report --arch sm80,sm90 --json report.json --markdown report.md
    python -m fastcl.profiler.compile_report --quick          # a small set, for CI
    python -m fastcl.profiler.compile_report --losses ntxent,supcon,infonce --dtypes bf16,fp32  # the model's kernels

Results are cached per compiled kernel (Triton's hash) next to Triton's cache, so a second run is fast.

Example:
    >>> args = parse_args(["--quick"])
    >>> args.arch, args.dtypes, args.losses
    (['sm90'], ['bf16'], ['ntxent'])
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

from fastcl.kernels.compile_only import ARCHES, DTYPES, compile_one, init_worker, list_tasks
from fastcl.profiler import kernel_model

COLUMNS = (
    "kernel",
    "arch",
    "dtype",
    "config",
    "D",
    "registers",
    "spill_stores",
    "spill_loads",
    "shared_bytes",
    "fits",
    "mma",
    "output_slices",
    "dynamic_instructions_per_element",
    "dynamic_ex2_per_element",
    "l2_bytes_per_element",
    "gemm_units",
    "static_loop_instructions",
    "static_instructions_per_element",
    "static_ex2_per_element",
    "address_check",
)
KIND = "compile-time (not measured): ptxas and SASS figures, static and whole-pass counts; no kernel ran"
MODEL_COLUMNS = (
    "title",
    "arch",
    "dtype",
    "D",
    "tensor_bound_ms",
    "mufu_bound_ms",
    "issue_bound_ms",
    "l2_bound_ms",
    "predicted_ms",
    "predicted_ms_at_half_l2",
    "naive_predicted_ms",
    "predicted_ratio_vs_naive",
    "fraction_of_tensor_bound",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The report's command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="fastcl bench --compile-only", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm80,sm90", help="comma-separated: sm80, sm90")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,fp32-tf32", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--dims", default="128,512", help="comma-separated feature widths D'")
    parser.add_argument("--kernels", default="", help="comma-separated substrings; only kernels whose name has one")
    parser.add_argument(
        "--losses",
        default="",
        help=f"comma-separated, of {', '.join(kernel_model.LOSSES)}: only the kernels these losses run (the model's)",
    )
    parser.add_argument("--configs", type=int, default=0, help="only the first N configs of each table (0: all)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI set: sm90, bf16, D' = 128, the first config of the kernels NT-Xent runs (or --losses / --kernels)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    parser.add_argument(
        "--rows-from",
        help="compile nothing: take the rows and metadata of this report's JSON, recompute the model and targets",
    )
    parser.add_argument("--json", dest="json_path", help="write the rows and metadata as JSON")
    parser.add_argument("--markdown", dest="markdown_path", help="write a markdown table")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.dtypes, args.dims, args.configs = "sm90", "bf16", "128", args.configs or 1
        args.losses = args.losses or ("" if args.kernels else "ntxent")
    args.arch = _split(args.arch, ARCHES, "--arch")
    args.dtypes = _split(args.dtypes, DTYPES, "--dtypes")
    args.dims = [int(d) for d in args.dims.split(",") if d]
    args.kernels = [k for k in args.kernels.split(",") if k]
    args.losses = _split(args.losses, kernel_model.LOSSES, "--losses") if args.losses else []
    return args


def _split(text: str, allowed: dict, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {list(allowed)}, got {text!r}")
    return items


# --- driver ----------------------------------------------------------------------------------------------


def loss_kernels(losses: list[str]) -> list[str]:
    """The kernels ``losses`` run (``kernel_model.LOSSES``: the first plan whose kernels all ship)."""
    import torch

    from fastcl.kernels import compile_specs

    shipped = {spec.name for spec in compile_specs(torch.bfloat16, "ieee", 128)}
    names = []
    for loss in losses:
        plan = kernel_model.plan(loss, shipped)
        if plan is None:
            raise SystemExit(f"--losses: no plan of {loss!r} in kernel_model.LOSSES has all its kernels shipped")
        names += [kernel for kernel, _ in plan["forward"] + plan["backward"] if kernel not in names]
    return names


def run_report(args: argparse.Namespace, progress=None) -> list[dict]:
    """Report rows for the selection in ``args``, in task order. Compiles in ``args.jobs`` fresh processes
    (spawned, ``TRITON_INTERPRET=0``): the kernels must be compiled, not interpreted."""
    # Spawned workers inherit the environment: compiled kernels, not interpreted ones (the worker imports
    # fastcl before its initializer runs, so the variable must be set here, for the pool's lifetime).
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max(1, args.jobs), mp_context=context, initializer=init_worker
        ) as pool:
            # Listed in a worker too: this process may have imported the kernels in interpreter mode.
            kernels = args.kernels + (pool.submit(loss_kernels, args.losses).result() if args.losses else [])
            tasks = pool.submit(list_tasks, args.arch, args.dtypes, args.dims, kernels, args.configs).result()
            rows = []
            for row in pool.map(compile_one, tasks):
                rows.append(row)
                if progress:
                    progress(row)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return rows


def metadata() -> dict:
    """What produced the report: versions of Triton, ptxas, torch; the date; the evidence kind."""
    import platform

    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    versions = {
        name: subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
        for name, arch in ARCHES.items()
    }
    return dict(
        kind=KIND,
        date=datetime.date.today().isoformat(),
        triton=triton.__version__,
        torch=torch.__version__,
        ptxas=versions,
        host=platform.node() and "cpu-only",
        model_assumptions=kernel_model.assumptions(),
    )


def _cell(value) -> str:
    return "" if value is None else str(value)


def to_markdown(rows: list[dict], meta: dict, models: list[dict] = (), targets: list[dict] = ()) -> str:
    """The rows as a markdown table under a header saying what kind of evidence they are, then the MODEL
    records and the targets (each labelled a model)."""
    lines = [
        f"# Compile-only kernel report ({meta['date']})",
        "",
        *([f"Command: `{meta['command']}` (on a CPU machine, no GPU).", ""] if meta.get("command") else []),
        f"**{meta['kind']}.** Triton {meta['triton']}, ptxas {meta['ptxas']['sm90']}. "
        "`dynamic_*` and `l2_bytes_per_element` count whole passes per similarity element (every trip of the "
        "feature-chunk loop, every output slice); `static_*` one element-loop body (not totals); `gemm_units` "
        "= MMA FLOPs / 2·D' (1 for a forward); address_check walks the TTIR of contiguous, transposed and strided "
        "inputs for 32-bit offset products (see `fastcl/profiler/compile_report.py`).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        if "error" in row:
            cells = [str(row.get(c, "")) for c in COLUMNS[:5]] + [f"error: {row['error']}"] + [""] * (len(COLUMNS) - 6)
        else:
            cells = [_cell(row.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if models:
        assumptions = meta["model_assumptions"]
        lines += [
            "",
            f"## {assumptions['label']}: fwd + bwd per loss at M = {assumptions['M']:,}",
            "",
            "Bounds (ms) = whole-pass work per element × M² × visits / rate; a pass is predicted at its largest "
            "bound, a loss at the sum of its passes; per kernel the config with the smallest prediction. "
            f"Naive: {assumptions['naive']}. Rates and sources: `fastcl/profiler/kernel_model.py` "
            "(L2 bandwidth is an assumption: "
            + "; ".join(f"{a['gpu']} {a['l2_tbs']} TB/s" for a in assumptions["architectures"].values())
            + "; `predicted_ms_at_half_l2` at half of it). The passes, configs and naive kernels of each "
            "record are in the JSON.",
            "",
            "| " + " | ".join(MODEL_COLUMNS) + " | passes (kernel × visits: config, bound) |",
            "|" + "---|" * (len(MODEL_COLUMNS) + 1),
        ]
        for record in models:
            passes = "; ".join(f"{p['kernel']} × {p['visits']}: {p['config']}, {p['bound']}" for p in record["passes"])
            lines.append("| " + " | ".join(_cell(record[c]) for c in MODEL_COLUMNS) + f" | {passes} |")
        lines += [
            "",
            "Whole-pass counts per loss (forward / backward / total, per similarity element):",
            "",
            "| title | arch | dtype | D | instructions | ex2 | L2 bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for record in models:
            counts = [
                " / ".join(str(record[key][phase]) for phase in ("forward", "backward", "total"))
                for key in ("dynamic_instructions_per_element", "dynamic_ex2_per_element", "l2_bytes_per_element")
            ]
            cells = [record["title"], record["arch"], record["dtype"], str(record["D"]), *counts]
            lines.append("| " + " | ".join(cells) + " |")
    if targets:
        lines += [
            "",
            "## Targets of issue #22 (sm90, bf16, D' = 128 unless named; the ratios are MODEL figures)",
            "",
            "| target | value | holds |",
            "|---|---|---|",
        ]
        for target in targets:
            verdict = "no record" if target["holds"] is None else "yes" if target["holds"] else "**no**"
            lines.append(f"| {target['what']} | {_cell(target['value'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> list[str]:
    """One line per finding that misses a target: spills, shared memory over the limit, no tensor cores."""
    findings = []
    for row in rows:
        where = f"{row['kernel']} {row['arch']} {row['dtype']} D={row['D']} {row['config']}"
        if "error" in row:
            findings.append(f"{where}: compile error {row['error']}")
            continue
        if row["spill_stores"] or row["spill_loads"]:
            findings.append(f"{where}: spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
        if not row["fits"]:
            findings.append(f"{where}: shared memory {row['shared_bytes']} B > {row['shared_limit']} B")
        if row["mma"] == "fma" and row["precision"] != "ieee":
            findings.append(f"{where}: no tensor-core instruction")
        if row["address_check"] != "ok":
            findings.append(f"{where}: 32-bit address offset: {row['address_check']}")
    return findings


def main(argv: list[str]) -> int:
    """Runs the report; prints one line per kernel and the findings; 0 when every row compiled and passed
    the address check.

    Args:
        argv: command-line arguments without the program name (see :func:`parse_args`).

    Returns:
        The exit status: 0, or 1 when a kernel failed to compile or a row's address check failed.
    """
    args = parse_args(argv)

    def progress(row):
        if "error" in row:
            print(
                f"{row['kernel']:<28} {row['arch']} {row['dtype']:<9} D={row['D']:<5} {row['config']:<22} "
                f"ERROR {row['error']}",
                flush=True,
            )
        else:
            print(
                f"{row['kernel']:<28} {row['arch']} {row['dtype']:<9} D={row['D']:<5} {row['config']:<22} "
                f"regs {row['registers']:>3} spill {row['spill_stores']:>5} smem {row['shared_bytes']:>6} "
                f"{row['mma']:<8} dynamic instr/elem {row.get('dynamic_instructions_per_element')} "
                f"ex2/elem {row.get('dynamic_ex2_per_element')} L2 B/elem {row.get('l2_bytes_per_element')} "
                f"address {row['address_check']}",
                flush=True,
            )

    if args.rows_from:
        previous = json.loads(Path(args.rows_from).read_text())
        rows, meta = previous["rows"], dict(previous["meta"], kind=KIND, model_assumptions=kernel_model.assumptions())
    else:
        rows, meta = run_report(args, progress), metadata()
        meta["command"] = " ".join(["python -m fastcl.profiler.compile_report", *argv])
    models = kernel_model.models(rows)
    targets = kernel_model.evaluate_targets(models, rows)
    if args.json_path:
        report = dict(meta=meta, rows=rows, model=models, targets=targets)
        Path(args.json_path).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if args.markdown_path:
        Path(args.markdown_path).write_text(to_markdown(rows, meta, models, targets))
    findings = summarize(rows)
    print(f"{len(rows)} kernels compiled (compile-time figures, not measured); {len(findings)} findings")
    for record in models:
        print(
            f"MODEL {record['title']} {record['arch']} {record['dtype']} D={record['D']}: predicted "
            f"{record['predicted_ms']} ms, naive {record['naive_predicted_ms']} ms, ratio "
            f"{record['predicted_ratio_vs_naive']}, fraction of tensor bound {record['fraction_of_tensor_bound']}"
        )
    for line in findings:
        print("  " + line)
    return 1 if any("error" in row or row["address_check"] != "ok" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
