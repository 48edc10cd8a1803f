"""lightly's memory-bank NT-Xent: ``fastcl.compat.lightly.NTXentLoss`` beside lightly's own formula.

    python bench/bench_compat_bank.py --rows 4096 --bank 4096 --dim 128 --out bench/results/compat-bank-cpu.json

The memory bank is not a loss of the registry, so ``fastcl bench`` has no case for it; this script
measures it with the profiler's own step timing and peak-RSS measurement, each side in a fresh process
(``--side``), fp32 on CPU, forward + backward of a batch of ``--rows`` pairs against a bank of ``--bank``
entries. lightly 1.6.0's ``NTXentLoss`` cannot be imported here (its ``lightly.loss`` imports
torchvision), so the peer side is the bank branch of its ``forward`` (lightly/loss/ntx_ent_loss.py):
``cat([out0·out1, out0·bankᵀ]) / τ`` and a cross-entropy against index 0, the N × (bank + 1) logits
materialised as there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcl.compat import lightly
from fastcl.profiler.measure import _CpuPeak, loadavg, step
from fastcl.profiler.runner import environment

TAU = 0.1


def lightly_bank_loss(out0, out1, bank, temperature):
    """lightly 1.6.0's bank branch: out0 against its positive out1 and the bank's (normalized) entries."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
    sim_neg = torch.einsum("nc,ck->nk", out0, bank.T)
    logits = torch.cat([sim_pos, sim_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def measure(side: str, rows: int, bank: int, dim: int, repeats: int) -> dict:
    torch.manual_seed(0)
    out0, out1 = (torch.randn(rows, dim).requires_grad_() for _ in range(2))
    ours = lightly.NTXentLoss(TAU, memory_bank_size=(bank, dim))
    entries = ours.bank.clone()
    ours._enqueue = lambda batch: None  # the same bank on every run: measure the loss, not the queue

    def call():
        return ours(out0, out1) if side == "compat" else lightly_bank_loss(out0, out1, entries, TAU)

    device = torch.device("cpu")
    step(call, [out0, out1], device)  # warm-up
    times = [sum(step(call, [out0, out1], device)) for _ in range(repeats)]
    peak = _CpuPeak()
    with peak.measure():
        step(call, [out0, out1], device)
    return {"side": side, "total_ms": statistics.median(times), "runs": times, "peak_mem_bytes": peak.peak}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--bank", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--side", choices=["compat", "lightly"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(measure(args.side, args.rows, args.bank, args.dim, args.repeats)))
        return
    sizes = ["--rows", str(args.rows), "--bank", str(args.bank), "--dim", str(args.dim), "--repeats", str(args.repeats)]
    load_before = loadavg()
    results = {}
    for side in ("lightly", "compat"):
        done = subprocess.run([sys.executable, __file__, "--side", side, *sizes], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr)
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    ratios = {
        "time": results["compat"]["total_ms"] / results["lightly"]["total_ms"],
        "memory": results["compat"]["peak_mem_bytes"] / results["lightly"]["peak_mem_bytes"],
    }
    report = {
        "meta": {**environment("cpu"), "command": " ".join(["python", *sys.argv]), "tau": TAU},
        "rows": args.rows,
        "bank": args.bank,
        "dim": args.dim,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": loadavg(),
        "results": results,
        "compat_over_lightly": ratios,
    }
    print(json.dumps({"compat_over_lightly": ratios, "load": [load_before, report["loadavg_1min_after"]]}))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
