"""``fastcl repro``: one command per paper that fastcl is built from, with verdicts computed from numbers.

``fastcl repro --list`` names the experiments; ``fastcl repro NAME`` (or ``all``) runs one at a size:
``--smoke`` (seconds, for CI), ``--quick`` (CPU minutes; the default without a GPU) or ``--full`` (the
paper-sized configuration for a GPU; the default with one). Each writes ``OUT/NAME/results.json`` (every
number, the configuration, versions, machine, seeds), ``results.md`` (tables and verdicts) and PNG figures,
and prints each claim with the comparison it made and its verdict. See docs/repro.md.

Example:
    >>> sorted(EXPERIMENTS)
    ['cosentino', 'directclr', 'foster', 'xue']
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastcl.repro.common import (
    SIZES,
    SMOKE_NOTE,
    Context,
    Progress,
    environment,
    markdown_table,
    render_markdown,
    write_outputs,
)

EXPERIMENTS = {name: f"fastcl.repro.{name}" for name in ("directclr", "foster", "xue", "cosentino")}


def load(name: str):
    """The experiment module ``name``.

    Raises:
        ValueError: ``name`` is not one of ``EXPERIMENTS``.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {sorted(EXPERIMENTS)} or 'all', got {name!r}")
    return importlib.import_module(EXPERIMENTS[name])


def run_experiment(
    name: str, size: str, out: str | Path, device: str = "auto", data_dir: str | None = None, progress: bool = True
) -> dict:
    """Run experiment ``name`` at ``size``, write its files to ``out/name`` and print its claims.

    Args:
        name: one of ``EXPERIMENTS``.
        size: ``"smoke"``, ``"quick"`` or ``"full"``.
        out: parent directory of the experiment's output directory.
        device: ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ...
        data_dir: directory with CIFAR-10 for the ``--full`` image experiments.
        progress: show a progress bar.

    Returns:
        The record written to results.json (``claims``, ``results``, ``config``, ``environment``, ...).

    Raises:
        ValueError: unknown experiment or size, or a CIFAR configuration without ``data_dir``.
    """
    from fastcl.train import resolve_device

    experiment = load(name)
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    config = experiment.CONFIGS[size]
    if config.get("dataset", "").startswith("cifar") and data_dir is None:
        raise ValueError(
            f"{name} --{size} trains on {config['dataset']}: pass --data-dir DIR with the python-pickle "
            "archive extracted in it (nothing is downloaded)"
        )
    target = Path(out) / name
    dev = resolve_device(device)
    bar = Progress(experiment.units(config), f"{name} --{size}", enabled=progress)
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix=f"fastcl-repro-{name}-") as work:
        results = experiment.run(config, Context(dev, Path(work), bar, data_dir))
    bar.close()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    claims = experiment.claims(results, config)
    env = dict(environment(dev), load_average=[load_before, os.getloadavg()[0]])
    write_outputs(target, experiment, size, config, results, claims, env, wall, cpu)
    print(f"\n{experiment.TITLE} (--{size}, {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU); files in {target}/")
    if size == "smoke":
        print(SMOKE_NOTE.replace("**", ""))
    for claim in claims:
        print(f"  [{claim.verdict}] {claim.statement}\n      {claim.comparison}")
    return json.loads((target / "results.json").read_text())


def _marker(name: str) -> tuple[str, str]:
    return f"<!-- {name}: generated from results.json by `fastcl repro --doc` -->", f"<!-- /{name} -->"


def render_doc(text: str, out: str | Path, doc_dir: str | Path) -> str:
    """``text`` (docs/repro.md) with its generated sections replaced from ``out/NAME/results.json``.

    Each experiment's section sits between the markers of :func:`_marker`; ``cost`` is the table of
    measured run times. An experiment without a gated results.json (one whose claims carry no ``gate``)
    gets a line saying no gated run is committed, never its old verdicts. ``doc_dir``: the directory of the
    document, so figure links resolve.

    Raises:
        ValueError: a marker is missing from ``text``.
    """
    out, doc_dir = Path(out), Path(doc_dir)
    cost = []
    for name in EXPERIMENTS:
        path = out / name / "results.json"
        record = json.loads(path.read_text()) if path.is_file() else None
        if record is None or not all("gate" in c for c in record["claims"]):
            body = f"No gated `--quick` run of `{name}` is committed yet (`make repro` writes it)."
        else:
            prefix = Path(os.path.relpath(out / name, doc_dir)).as_posix() + "/"
            body = render_markdown(record, load(name), figure_prefix=prefix)
            env = record["environment"]
            load_average, threads = env.get("load_average"), env.get("torch_threads")
            cost.append(
                [
                    f"`{name}`",
                    f"{record['wall_s'] / 60:.1f}",
                    f"{record['cpu_s'] / 60:.1f}",
                    str(threads) if threads else "not recorded",
                    f"{record['cpu_s'] / threads / 60:.1f}" if threads else "-",
                    f"{load_average[0]:.1f} → {load_average[1]:.1f}" if load_average else "not recorded",
                    env["date"],
                ]
            )
        text = _replace(text, name, body)
    table = markdown_table(
        [
            "experiment",
            "wall, min",
            "CPU, min (user + system, all threads)",
            "torch threads",
            "CPU ÷ threads, min (a quiet run takes at least this)",
            "load average (1 min) at start → end",
            "run",
        ],
        cost,
    )
    return _replace(text, "cost", table)


def _replace(text: str, name: str, body: str) -> str:
    begin, end = _marker(name)
    if begin not in text or end not in text:
        raise ValueError(f"the document has no generated section {name!r}: add the lines\n{begin}\n{end}")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcl repro", description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", help=f"one of {', '.join(EXPERIMENTS)}, or all")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    sizes = p.add_mutually_exclusive_group()
    for size, help_ in (
        ("smoke", "seconds: checks that it runs end to end"),
        ("quick", "CPU minutes (default without a GPU)"),
        ("full", "the paper-sized configuration for a GPU (default with one)"),
    ):
        sizes.add_argument(f"--{size}", dest="size", action="store_const", const=size, help=help_)
    p.add_argument("--out", default="runs/repro", help="results go to OUT/NAME/")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python-pickle directory (the --full image runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--doc", default=None, help="then regenerate this document's measured sections from OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastcl repro``; bad arguments exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name in EXPERIMENTS:
            experiment = load(name)
            print(f"{name:<10} {experiment.TITLE}\n{'':<10} {experiment.SUMMARY}")
        return 0
    if args.name is None and args.doc is None:
        parser.error("name an experiment (or all), or pass --list or --doc")
    names = list(EXPERIMENTS) if args.name == "all" else [args.name] if args.name else []
    if args.name not in ("all", None) and args.name not in EXPERIMENTS:
        parser.error(f"experiment must be one of {sorted(EXPERIMENTS)} or 'all', got {args.name!r}")
    size = args.size or ("full" if torch.cuda.is_available() else "quick")
    for name in names:
        try:
            run_experiment(name, size, args.out, args.device, args.data_dir, progress=not args.no_progress)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    if args.doc is not None:
        doc = Path(args.doc)
        try:
            doc.write_text(render_doc(doc.read_text(), args.out, doc.parent))
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
        print(f"regenerated the measured sections of {doc} from {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
