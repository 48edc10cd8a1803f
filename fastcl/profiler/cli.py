"""``fastcl bench``: kernel profiler for the contrastive losses (``python -m fastcl.profiler`` works too).

    $ fastcl bench --quick                       # the demo's run: seconds on a laptop CPU
    $ fastcl bench --device cpu --impl torch,naive,compile,pml --sizes 1024,4096,8192 --out bench/results/cpu
    $ fastcl bench --compile-only --quick        # compile-time kernel report (registers, spills, ...)

Rows are printed as cases finish (at most 120 columns; implementations that cannot run here are listed
once below the table, with the reason); the JSON, the markdown and (with matplotlib) the plot are always
written to a results folder, ``runs/bench/<UTC time>/`` unless ``--out`` names one (refused when it holds a
previous run, unless ``--overwrite``), and rewritten after every row. Exit status: 0 when at least one
implementation ran, 1 when none did, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from fastcl.profiler.cases import CEILING, DTYPES, FUSED, IMPLS, LOSSES, Case, unavailable_reason
from fastcl.profiler.report import (
    format_header,
    format_notes,
    format_row,
    format_summary,
    write_json,
    write_markdown,
    write_plot,
)
from fastcl.profiler.runner import CEILING_METHOD, FLOP_MODEL, ISOLATION, run_bench

__all__ = ["main", "build_parser", "parse_bytes", "QUICK", "DEFAULTS"]

_AUGMENT_SECONDS_PER_CASE = 1.0
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# Settings of an ordinary run and of --quick (the demo's); flags given on the command line win over both.
DEFAULTS = {
    "loss": list(LOSSES),
    "impl": list(IMPLS),
    "sizes": [1024, 4096, 8192],
    "dim": 128,
    "repeats": 10,
    "isolate": "impl",
}
QUICK = {"loss": list(LOSSES), "impl": None, "sizes": [256, 1024], "dim": 128, "repeats": 3, "isolate": "run"}
_QUICK_CUDA_SIZES = [4096, 16384]


def parse_bytes(text: str) -> int:
    """'512M' / '1.5GiB' / '4096' → bytes.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a size.

    Example:
        >>> parse_bytes("64M"), parse_bytes("1.5GiB"), parse_bytes("4096")
        (67108864, 1610612736, 4096)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"--mem-limit: expected a size such as 512M or 2G, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _names(allowed: Sequence[str], flag: str):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if names == ["all"]:
            return list(allowed)
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{flag}: expected a comma list of {list(allowed)} or all, got {text!r}")
        return list(dict.fromkeys(names))

    return parse


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"--sizes: expected a comma list of integers >= 2, got {text!r}")
    return sorted(set(sizes))


def _positive(flag: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag}: expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fastcl bench`` (``fastcl bench --help`` prints it)."""
    parser = argparse.ArgumentParser(
        prog="fastcl bench",
        description="Time, memory and TFLOP/s of the contrastive losses, side by side with the naive loss, "
        "torch.compile, peers and the matmul ceiling of the same GEMMs. Rows stream as cases finish; JSON and "
        "markdown always go to a results folder.",
        epilog=f"M is the number of rows of the similarity matrix. FLOP model: {FLOP_MODEL}. "
        f"Ceiling: {CEILING_METHOD}.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the demo's run: every loss, the fused backends that run here and naive, M in "
        f"{QUICK['sizes']} (CUDA: {_QUICK_CUDA_SIZES}), {QUICK['repeats']} repeats, one worker "
        "process; flags given explicitly still win",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="instead of timing, compile the Triton kernels for GPU targets and report registers, "
        "spills and shared memory (no GPU needed); the other flags are that report's, see "
        "fastcl bench --compile-only --help",
    )
    parser.add_argument(
        "--loss",
        "--losses",
        dest="loss",
        type=_names(LOSSES, "--loss"),
        help=f"comma list of {','.join(LOSSES)} or all (default)",
    )
    parser.add_argument(
        "--impl",
        type=_names(IMPLS, "--impl"),
        help=f"comma list of {','.join(IMPLS)} or all (default); one that cannot run here is reported "
        "as skipped with the reason",
    )
    parser.add_argument("--sizes", type=_sizes, help=f"M values (default {','.join(map(str, DEFAULTS['sizes']))})")
    parser.add_argument("--dim", type=_positive("--dim"), help=f"D (default {DEFAULTS['dim']})")
    parser.add_argument("--sub-dim", type=_positive("--sub-dim"), default=None, help="DirectCLR prefix D' (default: D)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype (default fp32)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda where a CUDA device exists, else cpu",
    )
    parser.add_argument(
        "--repeats",
        type=_positive("--repeats", 0),
        help=f"timed fwd+bwd runs per case, median reported; more while they total under 0.1 s, fewer (at least "
        f"one) once they reach 10 s (default {DEFAULTS['repeats']}; 0 = memory only)",
    )
    parser.add_argument("--warmup", type=_positive("--warmup"), default=1, help="untimed runs first (default 1)")
    parser.add_argument(
        "--mem-limit",
        type=parse_bytes,
        default=-1,
        help="memory budget per case, e.g. 512M: allocations beyond it fail and the case is "
        "reported as OOM (default on CPU: half of the available memory; 0 = no limit)",
    )
    parser.add_argument(
        "--isolate",
        choices=ISOLATION,
        help="impl (default): one worker process per implementation; run (--quick's default): "
        "one worker for the whole run; case: one per case; none: all in this process",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=600.0,
        help="seconds per case in a worker before it is an error (default 600)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="results folder for bench.json, bench.md and bench.png (default runs/bench/<UTC time>); one "
        "that holds a previous run is refused unless --overwrite",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    parser.add_argument("--json", metavar="PATH", help="write the JSON here instead of DIR/bench.json")
    parser.add_argument("--markdown", metavar="PATH", help="write the markdown here instead of DIR/bench.md")
    parser.add_argument(
        "--plot", metavar="PATH", help="write the plot here instead of DIR/bench.png (needs matplotlib)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler chrome trace per case into DIR")
    parser.add_argument(
        "--augment",
        action="store_true",
        help="measure MultiViewAugment throughput (views/s) instead of losses; uses --device, --json, --markdown",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser


def _compile_only(argv: Sequence[str]) -> int:
    if importlib.util.find_spec("fastcl.profiler.compile_report") is None:
        print(
            "fastcl bench --compile-only: this install has no compile report (fastcl.profiler.compile_report); "
            "it comes with fastcl versions that ship the Triton kernel report",
            file=sys.stderr,
        )
        return 2
    from fastcl.profiler import compile_report

    return compile_report.main(list(argv))


class _Progress:
    """One progress line on stderr naming the running case (a line per case when stderr is not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.live, self.shown = enabled, enabled and sys.stderr.isatty(), False

    def start(self, case: Case, number: int, total: int) -> None:
        if not self.enabled:
            return
        text = f"[{number}/{total}] {case.label()} …"
        if self.live:
            sys.stderr.write("\r\033[K" + text)
            self.shown = True
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def _settings(args: argparse.Namespace) -> None:
    """Fills the flags not given from --quick's or the ordinary defaults."""
    preset = dict(QUICK if args.quick else DEFAULTS)
    if args.quick:
        on_cuda = torch.device(args.device).type == "cuda"
        # Off CUDA, Triton runs only through its interpreter (TRITON_INTERPRET=1): semantics, not speed.
        fused = [
            b for b in FUSED if unavailable_reason(b, LOSSES[0], args.device) is None and (on_cuda or b != "triton")
        ]
        preset["impl"] = ["naive", *fused]
        if on_cuda:
            preset["sizes"] = _QUICK_CUDA_SIZES
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _paths(args: argparse.Namespace) -> dict:
    out = (
        Path(args.out)
        if args.out
        else Path("runs/bench") / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    )
    return {
        "json": Path(args.json) if args.json else out / "bench.json",
        "markdown": Path(args.markdown) if args.markdown else out / "bench.md",
        "plot": Path(args.plot) if args.plot else out / "bench.png",
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fastcl bench``; returns the exit status (2 with a message on bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compile-only" in argv:
        return _compile_only([a for a in argv if a != "--compile-only"])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda requested but torch.cuda.is_available() is False")
    if args.augment:
        return _augment(args)
    _settings(args)
    if args.sub_dim is not None and args.sub_dim > args.dim:
        parser.error(f"--sub-dim: expected 1 <= sub_dim <= --dim ({args.dim}), got {args.sub_dim}")
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if args.plot and args.no_plot:
        parser.error("--plot: cannot be combined with --no-plot")
    if args.plot and not has_matplotlib:
        parser.error("--plot: needs matplotlib (pip install 'fastcl[plot]')")
    paths = _paths(args)
    if args.out and (Path(args.out) / "bench.json").exists() and not args.overwrite:
        parser.error(
            f"--out {args.out} holds a previous run (bench.json): pass --overwrite to replace it, or another --out"
        )
    progress = _Progress(not args.no_progress)
    command = "fastcl bench " + " ".join(shlex.quote(a) for a in argv)

    def on_record(record: dict, meta: dict, records: list) -> None:
        progress.clear()
        meta["command"] = command
        write_json(paths["json"], meta, records)
        write_markdown(paths["markdown"], meta, records)
        if record["status"] == "skipped":  # listed once below the table
            return
        if not any(r["status"] != "skipped" for r in records[:-1]):
            print(
                f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads), torch {meta['torch']}, "
                f"D={args.dim}, dtype={args.dtype}, median of ~{args.repeats} runs; {meta['date']}"
            )
            print(format_header())
        print(format_row(record), flush=True)

    try:
        meta, records = run_bench(
            args.loss,
            args.impl,
            args.sizes,
            dim=args.dim,
            sub_dim=args.sub_dim,
            dtype=args.dtype,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            mem_limit=args.mem_limit or None,
            isolate=args.isolate,
            profile_dir=args.profile,
            timeout=args.timeout,
            on_start=progress.start,
            on_record=on_record,
        )
    except ValueError as err:
        progress.clear()
        parser.error(str(err))
    meta["command"] = command
    print("\nside by side: fwd+bwd ms, × naive, % of the matmul ceiling (the same GEMMs alone)")
    print(format_summary(records))
    above = [r for r in records if r.get("above_ceiling")]
    if above:
        print(
            f"note: {len(above)} row(s) ran faster than the matmul ceiling (marked !): "
            + ", ".join(f"{r['loss']} {r['impl']} M={r['M']}" for r in above)
        )
    for line in format_notes(records):
        print(line)
    write_json(paths["json"], meta, records)
    write_markdown(paths["markdown"], meta, records)
    written = [paths["json"], paths["markdown"]]
    if has_matplotlib and not args.no_plot:
        write_plot(paths["plot"], records, f"fastcl bench — {meta['device_name']} — D={args.dim}, {args.dtype}")
        written.append(paths["plot"])
    elif not args.no_plot:
        print("plot: not drawn, matplotlib is not installed (pip install 'fastcl[plot]')")
    print(f"results ({meta['elapsed_s']} s): " + ", ".join(map(str, written)))
    if not any(r["status"] == "ok" and r["impl"] != CEILING for r in records):
        print("fastcl bench: no implementation ran (see the skipped and failed ones above)", file=sys.stderr)
        return 1
    return 0


def _augment(args: argparse.Namespace) -> int:
    helper = importlib.import_module("fastcl.augment.bench")
    device = torch.device(args.device)
    rows = helper.run(device, False, _AUGMENT_SECONDS_PER_CASE)
    env = helper.environment(device)
    markdown = helper.to_markdown(env, rows)
    print(markdown)
    if args.json:
        write_json(args.json, env, rows)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown)
    return 0
