"""Every ``fastcl.compat`` drop-in beside its peer's own code: time and memory of one forward + backward.

    nice -n 0 python bench/bench_compat.py --rows 4096 --repeats 5 --out bench/results/compat-all-cpu-<date>

Each case is a swap a user makes: the compat module against the peer it replaces, on the same inputs
(fp32, D = 128, τ = 0.1, CPU). ``--rows`` is M, the rows of the similarity matrix, as in ``fastcl bench``:
two views of M/2 samples (SupContrast, lightly, pml, solo-learn), M pairs (open_clip, Inf-CL, DirectCLR),
M pairs against a bank of M entries (lightly's memory bank). The peers: pytorch-metric-learning as
installed; open_clip 3.3.0's own ``loss.py`` (kept in tests/peers, as the tests use it);
SupContrast, lightly, solo-learn, Inf-CL and DirectCLR as the transcriptions of their code that the tests
hold (tests/test_compat.py, tests/test_parity.py: lightly cannot be imported here, SupContrast and
DirectCLR are not packages, Inf-CL's kernels need CUDA — its transcription is its formula in PyTorch).

The machine is shared, so time is measured interleaved: one process per case builds and warms both
sides, measures each side's memory (the peak RSS of one forward + backward above the RSS right before
it, the profiler's measurement, peer first), then runs ``--repeats`` rounds, each timing both sides back
to back (the order alternating by round); the ratio is computed within each round and its median
reported with its range. The 1-minute load average is recorded before and after every case, and the
results are written after every case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TAU, DIM = 0.1, 128
SIDES = ("compat", "peer")


def _peers():
    sys.path.insert(0, str(ROOT / "tests"))
    import test_compat  # noqa: E402  (the tests' transcriptions of the peers' code)
    import test_parity  # noqa: E402
    from peers import open_clip_loss  # noqa: E402  (open_clip 3.3.0's own loss.py, kept in tests/peers)

    return test_compat, test_parity, open_clip_loss


def build(case: str, side: str, m: int):
    """``(call, leaves)`` for one side of one case; ``call()`` returns the 0-dim loss."""
    from pytorch_metric_learning import losses as pml_losses

    from fastcl.compat import directclr, inf_cl, lightly, open_clip, pml, solo_learn, supcontrast

    tc, tp, oc = _peers()
    gen = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()  # noqa: E731
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    n = m // 2
    ours = side == "compat"
    if case == "supcontrast":
        feats, labels = leaf(n, 2, DIM), torch.randint(0, 100, (n,), generator=gen)
        if ours:
            loss = supcontrast.SupConLoss(TAU)
            return (lambda: loss(unit(feats), labels)), [feats]
        return (lambda: tp.supcontrast(unit(feats), labels, temperature=TAU)), [feats]
    if case in ("open_clip-ClipLoss", "open_clip-SigLipLoss"):
        img, txt = leaf(m, DIM), leaf(m, DIM)
        module = open_clip if ours else oc
        if case.endswith("ClipLoss") and "Sig" not in case:
            loss = module.ClipLoss()
            return (lambda: loss(unit(img), unit(txt), 1 / TAU)), [img, txt]
        loss = module.SigLipLoss()
        return (lambda: loss(unit(img), unit(txt), 1 / TAU, -10.0)), [img, txt]
    if case.startswith("lightly"):
        out0, out1 = leaf(n, DIM), leaf(n, DIM)
        if case == "lightly-NTXentLoss":
            loss = lightly.NTXentLoss(TAU) if ours else (lambda a, b: tc.lightly_reference(a, b, TAU))
        elif case == "lightly-DCLLoss":
            loss = lightly.DCLLoss(TAU) if ours else (lambda a, b: tc.lightly_dcl_reference(a, b, TAU))
        elif case == "lightly-DCLWLoss":
            weights = tc.lightly_mises_fisher_weights
            loss = lightly.DCLWLoss(TAU) if ours else (lambda a, b: tc.lightly_dcl_reference(a, b, TAU, weights))
        else:  # lightly-bank: M pairs against a bank of M entries, the same bank on every call
            out0, out1 = leaf(m, DIM), leaf(m, DIM)
            torch.manual_seed(0)
            bank = tc.LightlyMemoryBank((m, DIM))
            if ours:
                loss = lightly.NTXentLoss(TAU, memory_bank_size=(m, DIM))
                loss.bank.copy_(bank.bank)
                loss._enqueue = lambda batch: None  # measure the loss, not the queue (nor on the peer's side)
            else:
                bank.forward = lambda output, update=False, forward=bank.forward: forward(output, False)
                loss = lambda a, b: tc.lightly_bank_reference(bank, a, b, TAU)  # noqa: E731
        return (lambda: loss(out0, out1)), [out0, out1]
    if case.startswith("pml"):
        z1, z2 = leaf(n, DIM), leaf(n, DIM)
        lib = pml if ours else pml_losses
        if case == "pml-SelfSupervisedLoss":
            loss = lib.SelfSupervisedLoss(lib.NTXentLoss(TAU))
            return (lambda: loss(z1, z2)), [z1, z2]
        labels = torch.randint(0, 100, (n,), generator=gen).repeat(2)
        loss = lib.NTXentLoss(TAU) if case == "pml-NTXentLoss-classes" else lib.SupConLoss(TAU)
        return (lambda: loss(torch.cat([z1, z2]), labels)), [z1, z2]
    if case.startswith("solo_learn"):
        crops = 4 if case.endswith("4-crops") else 2
        z = leaf(m, DIM)
        indexes = torch.arange(m // crops).repeat(crops)
        fn = solo_learn.simclr_loss_func if ours else tc.solo_reference
        return (lambda: fn(z, indexes, TAU)), [z]
    if case == "inf_cl-cal_inf_loss":
        q, k = leaf(m, DIM), leaf(m, DIM)
        if ours:
            return (lambda: inf_cl.cal_inf_loss(unit(q), unit(k), scale=1 / TAU, head_dim=DIM)), [q, k]
        return (lambda: tc.inf_cl_reference(unit(q), unit(k), None, 1 / TAU).mean()), [q, k]
    if case == "directclr-infoNCE":
        q, k = leaf(m, DIM), leaf(m, DIM)
        fn = directclr.infoNCE if ours else tc.directclr_reference
        return (lambda: fn(q, k, TAU)), [q, k]
    raise ValueError(f"unknown case {case!r}")


CASES = (
    "supcontrast",
    "open_clip-ClipLoss",
    "open_clip-SigLipLoss",
    "lightly-NTXentLoss",
    "lightly-DCLLoss",
    "lightly-DCLWLoss",
    "lightly-bank",
    "pml-SelfSupervisedLoss",
    "pml-NTXentLoss-classes",
    "pml-SupConLoss",
    "solo_learn-2-crops",
    "solo_learn-4-crops",
    "inf_cl-cal_inf_loss",
    "directclr-infoNCE",
)


def _step_ms(call, leaves) -> float:
    from fastcl.profiler.measure import step

    return sum(step(call, leaves, torch.device("cpu")))


def worker(case: str, m: int, repeats: int) -> dict:
    from fastcl.profiler.measure import _CpuPeak, is_oom_error

    built, errors, memory = {}, {}, {}
    for side in SIDES[::-1]:
        try:
            built[side] = build(case, side, m)
            _step_ms(*built[side])  # warm-up
            peak = _CpuPeak()
            with peak.measure():
                _step_ms(*built[side])
            memory[side] = {"peak_mem_bytes": peak.peak}
        except Exception as error:  # the peer may not run at this size (pml's pair matrices): reported
            message = f"{'OOM: ' if is_oom_error(error) else ''}{type(error).__name__}: {str(error)[:160]}"
            errors[side], memory[side] = message, {"error": message}
            built.pop(side, None)
    runs = {side: [] for side in built}
    for r in range(repeats):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            if side in built:
                runs[side].append(_step_ms(*built[side]))
    return {"runs_ms": runs, "errors": errors, "memory": memory}


def _worker(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="M, rows of the similarity matrix")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", help="write OUT.json and OUT.md")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.rows, args.repeats)))
        return
    from fastcl.profiler.measure import loadavg
    from fastcl.profiler.runner import environment

    started = time.time()
    results = []
    for case in args.cases.split(","):
        load_before = loadavg()
        timing = _worker(["--rows", str(args.rows), "--repeats", str(args.repeats), "--worker", case])
        runs = timing.get("runs_ms", {})
        memory = timing.get("memory", {side: {"error": timing.get("error")} for side in SIDES})
        row = {"case": case, "memory": memory, "runs_ms": runs, "errors": timing.get("errors", timing.get("error"))}
        if all(runs.get(side) for side in SIDES):
            ratios = [c / p for c, p in zip(runs["compat"], runs["peer"])]
            row["time_ratio_per_round"] = ratios
            row["time_ratio_median"] = statistics.median(ratios)
            row["median_ms"] = {side: statistics.median(runs[side]) for side in SIDES}
        if all("peak_mem_bytes" in memory[side] for side in SIDES):
            row["memory_ratio"] = memory["compat"]["peak_mem_bytes"] / max(1, memory["peer"]["peak_mem_bytes"])
        row["loadavg_1min"] = [load_before, loadavg()]
        results.append(row)
        print(json.dumps({k: row.get(k) for k in ("case", "time_ratio_median", "memory_ratio", "loadavg_1min")}))
        report = {
            "meta": {**environment("cpu"), "command": " ".join(["python", *sys.argv]), "tau": TAU, "dim": DIM},
            "rows": args.rows,
            "repeats": args.repeats,
            "run_seconds": round(time.time() - started, 1),
            "results": results,
        }
        if args.out:  # after every case: a run cut short keeps what it measured
            Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
            Path(args.out + ".md").write_text(markdown(report))


def _mib(row: dict, side: str) -> str:
    got = row["memory"][side]
    return f"{got['peak_mem_bytes'] / 2**20:.1f}" if "peak_mem_bytes" in got else got.get("error", "?")


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"# fastcl.compat beside the peers — CPU, M = {report['rows']}, fp32",
        "",
        f"- command: `{meta['command']}`; run time {report['run_seconds']} s",
        f"- versions: {json.dumps(meta.get('versions', meta))[:400]}",
        f"- D = {meta['dim']}, τ = {meta['tau']}; time: {report['repeats']} interleaved rounds per case, the "
        "compat/peer ratio taken within each round, its median and range reported; memory: peak RSS of one "
        "forward + backward above the RSS before it, both sides in the case's own process, the peer first",
        "",
        "| case | compat ms | peer ms | time ratio (median; range) | compat MiB | peer MiB | memory ratio | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        ms = row.get("median_ms", {})
        ratios = row.get("time_ratio_per_round")
        span = f"{row['time_ratio_median']:.2f} ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else str(row["errors"])
        mem = f"{row['memory_ratio']:.2f}" if "memory_ratio" in row else "—"
        load = "/".join(str(x) for x in row["loadavg_1min"])
        lines.append(
            f"| {row['case']} | {ms.get('compat', float('nan')):.0f} | {ms.get('peer', float('nan')):.0f} | {span} | "
            f"{_mib(row, 'compat')} | {_mib(row, 'peer')} | {mem} | {load} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
