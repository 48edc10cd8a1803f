"""``fastcl bench``: kernel profiler for the contrastive losses (``python -m fastcl.profiler`` works too).

    $ fastcl bench --device cpu --loss all --impl torch,naive,compile,pml --sizes 1024,4096,8192 \\
          --json bench/results/cpu.json --plot bench/results/cpu.png
"""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from fastcl.profiler.cases import DTYPES, IMPLS, LOSSES
from fastcl.profiler.report import format_table, write_json, write_markdown, write_plot
from fastcl.profiler.runner import FLOP_MODEL, run_bench

__all__ = ["main", "build_parser", "parse_bytes"]

_AUGMENT_SECONDS_PER_CASE = 1.0
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'512M' / '1.5GiB' / '4096' → bytes.

    >>> parse_bytes("64M"), parse_bytes("1.5GiB"), parse_bytes("4096")
    (67108864, 1610612736, 4096)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"--mem-limit: expected a size such as 512M or 2G, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _names(allowed: Sequence[str], flag: str, everything: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if names == ["all"]:
            return list(everything)
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{flag}: expected a comma list of {list(allowed)}, got {text!r}")
        return names

    return parse


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"--sizes: expected a comma list of integers >= 2, got {text!r}")
    return sizes


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcl bench",
        description="Time, memory and TFLOP/s of contrastive losses, side by side with the naive loss, "
        "torch.compile, peers and the matmul ceiling.",
        epilog=f"M is the number of rows of the similarity matrix. {FLOP_MODEL}.",
    )
    parser.add_argument("--loss", type=_names(LOSSES, "--loss", LOSSES), default=list(LOSSES),
                        help="ntxent, infonce, supcon, a comma list, or all (default)")
    parser.add_argument("--impl", type=_names(IMPLS, "--impl", IMPLS), default=list(IMPLS),
                        help=f"comma list of {','.join(IMPLS)} or all (default); impls that cannot run are "
                        "reported as skipped")
    parser.add_argument("--sizes", type=_sizes, default=[1024, 4096, 8192], help="M values (default 1024,4096,8192)")
    parser.add_argument("--dim", type=_positive("--dim"), default=128, help="D (default 128)")
    parser.add_argument("--sub-dim", type=_positive("--sub-dim"), default=None, help="DirectCLR prefix D' (default: D)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=_positive("--repeats", 0), default=10,
                        help="timed fwd+bwd runs per case, median reported (default 10; 0 = memory only)")
    parser.add_argument("--warmup", type=_positive("--warmup"), default=1, help="untimed runs first (default 1)")
    parser.add_argument("--mem-limit", type=parse_bytes, default=-1,
                        help="memory budget per case, e.g. 512M: allocations beyond it fail and the case is "
                        "reported as OOM (default on CPU: half of the available memory; 0 = no limit)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case before it is an error")
    parser.add_argument("--json", metavar="PATH", help="write {meta, records} JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table with provenance as markdown")
    parser.add_argument("--plot", metavar="PATH", help="write a log-log plot of time and memory vs M (PNG)")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler chrome trace per case into DIR")
    parser.add_argument("--augment", action="store_true",
                        help="measure MultiViewAugment throughput (views/s) instead of losses; uses --device, "
                        "--json, --markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fastcl bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sub_dim is not None and args.sub_dim > args.dim:
        parser.error(f"--sub-dim: expected 1 <= sub_dim <= --dim ({args.dim}), got {args.sub_dim}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda requested but torch.cuda.is_available() is False")
    if args.augment:
        return _augment(args)
    try:
        meta, records = run_bench(
            args.loss, args.impl, args.sizes, dim=args.dim, sub_dim=args.sub_dim, dtype=args.dtype,
            device=args.device, repeats=args.repeats, warmup=args.warmup, mem_limit=args.mem_limit or None,
            profile_dir=args.profile, timeout=args.timeout, progress=not args.no_progress,
        )
    except ValueError as err:
        parser.error(str(err))
    command = "fastcl bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta["command"] = command
    print(f"{meta['device_name']} ({meta['device']}, {meta['threads']} threads), torch {meta['torch']}, "
          f"D={args.dim}, dtype={args.dtype}, median of {args.repeats}; {meta['date']}")
    print(format_table(records))
    print("matmul ceiling (TFLOP/s of [M,D']@[D',M], median over cases): "
          + ", ".join(f"M={m}: {t:.4f}" if t else f"M={m}: —" for m, t in meta["matmul_tflops"].items()))
    if args.json:
        write_json(args.json, meta, records)
    if args.markdown:
        write_markdown(args.markdown, meta, records, command)
    if args.plot:
        write_plot(args.plot, records, f"fastcl bench — {meta['device_name']} — D={args.dim}, {args.dtype}")
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
