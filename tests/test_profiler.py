"""`fastcl bench` on the CPU with tiny sizes: streamed rows, files, ratios, the matmul ceiling, errors.

Timing and memory figures are produced here, never asserted against targets; the assertions check that the
records are complete and self-consistent, that the ceiling times exactly the loss's own GEMMs, that every
implementation computes the registry's float64 formula, and that the memory measurement sees at least the
M×M logits the naive loss must allocate.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcl.profiler
from fastcl.profiler import main, measure, run_bench
from fastcl.profiler.cases import LOSSES, Case, ImplUnavailable, build_workload, loss_entry
from fastcl.profiler.measure import gemm_plan, matmul_ceiling
from fastcl.profiler.report import RECORD_FIELDS
from fastcl.profiler.runner import measure_in_workers

TIMED_FIELDS = ("fwd_ms", "bwd_ms", "total_ms", "tflops", "ratio_vs_naive", "matmul_tflops", "fraction_of_matmul")


def _json(path):
    return json.loads(path.read_text())


def test_cli_streams_rows_and_writes_every_file(tmp_path, capsys, monkeypatch):
    m, dim, sub_dim = 64, 16, 8
    out = tmp_path / "results"
    from fastcl.profiler import cli

    snapshots = []  # the JSON as written after each row: a run cut short still leaves its finished rows

    def write_json(path, meta, records):
        snapshots.append((meta["complete"], len(records)))
        real_write_json(path, meta, records)

    real_write_json = cli.write_json
    monkeypatch.setattr(cli, "write_json", write_json)
    status = main(
        [
            "--loss",
            "all",
            "--impl",
            "torch,naive,cuda,infcl",
            "--sizes",
            str(m),
            "--dim",
            str(dim),
            "--sub-dim",
            str(sub_dim),
            "--repeats",
            "1",
            "--isolate",
            "none",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    captured = capsys.readouterr()
    # Progress names each case; rows are printed one by one before the side-by-side summary.
    assert f"nt_xent · naive · M={m}" in captured.err and f"supcon · torch · M={m}" in captured.err
    table, summary = captured.out.split("side by side")
    rows = [line for line in table.splitlines() if line.strip().startswith(LOSSES)]
    # The ceiling first, then naive (so later rows have their ratios); what cannot run is listed once below.
    impls = [row.split()[1] for row in rows]
    assert impls == [impl for impl in ("matmul", "naive", "torch") for _ in LOSSES]
    assert all(len(line) <= 120 for line in table.splitlines()), max(table.splitlines(), key=len)
    skipped = {(r["impl"], r["note"]) for r in _json(out / "bench.json")["records"] if r["status"] == "skipped"}
    assert {impl for impl, _ in skipped} == {"cuda", "infcl"}
    for impl, note in skipped:  # each implementation and reason once, naming the losses it applies to
        assert summary.count(f": {note}\n") == 1 and f"skipped {impl} (" in summary, (impl, note)
    assert all(loss in summary for loss in LOSSES)
    result = _json(out / "bench.json")
    total = len(result["records"])
    assert snapshots == [(False, n) for n in range(1, total + 1)] + [(True, total)]
    assert result["meta"]["complete"] and result["meta"]["command"].startswith("fastcl bench --loss all")
    assert (out / "bench.md").read_text().startswith("# fastcl bench")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_key = {(r["loss"], r["impl"]): r for r in result["records"]}
    for r in result["records"]:
        assert set(RECORD_FIELDS) <= set(r), r
        assert (r["M"], r["D"], r["sub_dim"], r["dtype"], r["device"]) == (m, dim, sub_dim, "fp32", "cpu")
        assert r["flops"] == loss_entry(r["loss"]).gemm_units * 2 * m * m * sub_dim
    for loss in LOSSES:
        base, fused, ceiling = (by_key[(loss, impl)] for impl in ("naive", "torch", "matmul"))
        for r in (base, fused):
            assert r["status"] == "ok", r
            for field in TIMED_FIELDS:
                assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (field, r)
            assert r["tflops"] == pytest.approx(r["flops"] / (r["total_ms"] * 1e9))
            assert r["matmul_tflops"] == pytest.approx(ceiling["tflops"])
            assert r["fraction_of_matmul"] == pytest.approx(ceiling["total_ms"] / r["total_ms"])
            assert r["above_ceiling"] == (r["fraction_of_matmul"] > 1)
            assert ("faster than the same GEMMs alone" in r["note"]) == r["above_ceiling"]
        assert base["ratio_vs_naive"] == 1.0 and base["mem_ratio_vs_naive"] == 1.0
        assert fused["ratio_vs_naive"] == pytest.approx(fused["total_ms"] / base["total_ms"])
        assert fused["mem_ratio_vs_naive"] == pytest.approx(fused["peak_mem_bytes"] / base["peak_mem_bytes"])
        assert ceiling["ratio_vs_naive"] == pytest.approx(ceiling["total_ms"] / base["total_ms"])
        # Every naive loss holds at least one M×(M−1) float32 logit matrix: the RSS measurement must see it.
        assert base["peak_mem_bytes"] >= m * (m - 1) * 4, base
        for impl in ("cuda", "infcl"):  # not runnable here: skipped with the reason, never a crash or a number
            r = by_key[(loss, impl)]
            assert r["status"] == "skipped" and r["note"] and r["total_ms"] is None, r
    assert "CUDA" in by_key[("nt_xent", "cuda")]["note"]
    assert "only info_nce" in by_key[("nt_xent", "infcl")]["note"]


def test_run_bench_reports_each_record_as_it_completes(tmp_path):
    seen = []

    def on_record(record, meta, records):
        seen.append((record["impl"], len(records), meta["complete"]))

    starts = []
    meta, records = run_bench(
        ["info_nce"],
        ["torch", "naive"],
        [32, 48],
        dim=8,
        repeats=1,
        isolate="none",
        on_start=lambda case, number, total: starts.append((case.impl, number, total)),
        on_record=on_record,
        profile_dir=str(tmp_path),
    )
    # The ceiling first, then naive (so later rows have their ratios), each record reported once, in order.
    assert [impl for impl, _, _ in seen] == ["matmul"] * 2 + ["naive"] * 2 + ["torch"] * 2
    assert [n for _, n, _ in seen] == list(range(1, 7)) and not any(done for _, _, done in seen)
    assert starts == [(impl, n + 1, 6) for n, (impl, _, _) in enumerate(seen)]
    assert meta["complete"] and all(r["ratio_vs_naive"] for r in records)
    trace = tmp_path / "info_nce-naive-M48.json"
    assert records[3]["trace"] == str(trace)
    assert any("mm" in event.get("name", "") for event in _json(trace)["traceEvents"])


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.matmul):
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("loss", "m"), [(loss, 40) for loss in LOSSES] + [("info_nce", 2500)])
def test_ceiling_times_exactly_the_loss_gemms(loss, m):  # M = 2500: row blocks of 512 that do not divide M
    width = 3
    measure._ceiling.cache_clear()  # NT-Xent and SupCon share a plan: measure it again here
    with _MatmulShapes() as mode:
        result = matmul_ceiling(loss, m, width, "fp32", "cpu", repeats=1)
    assert result["status"] == "ok" and result["total_ms"] > 0
    products, reductions = gemm_plan(loss, m)
    assert products + reductions == loss_entry(loss).gemm_units
    flops = 0
    for a, b in mode.shapes:  # only the two GEMM kinds of the loss: S = Z Zᵀ and G @ Z, over all M columns
        assert (a[1], b) == (width, (width, m)) or (a[1], b) == (m, (m, width)), (a, b)
        flops += 2 * a[0] * a[1] * b[1]
    runs, rest = divmod(flops, loss_entry(loss).flops(m, width))
    assert rest == 0 and runs >= 2, (flops, runs)  # whole programs only: warm-up + timed runs, per variant


def test_a_rate_above_the_ceiling_is_flagged(monkeypatch):
    monkeypatch.setattr(measure, "matmul_ceiling", lambda *a: {"status": "ok", "note": "", "total_ms": 1e6})
    _, records = run_bench(["nt_xent"], ["naive"], [16], dim=4, repeats=1, isolate="none")
    naive = records[1]
    assert naive["above_ceiling"] and naive["fraction_of_matmul"] > 1 and "faster than" in naive["note"]


def test_workers_restart_after_a_timeout():
    cases = [Case("nt_xent", "naive", 16, 4, repeats=1), Case("supcon", "naive", 16, 4, repeats=1)]
    started = []
    results = list(measure_in_workers(cases, 0.05, started.append))  # 50 ms: no worker has imported torch by then
    assert started == cases and [c for c, _ in results] == cases
    assert all(r == {"status": "error", "note": "timed out after 0.05 s"} for _, r in results)


def test_size_past_the_memory_limit_is_oom_and_the_worker_goes_on():
    # Naive NT-Xent at M = 4096 needs M×(M−1)×4 B ≈ 64 MiB of logits alone: 32 MiB cannot hold it; the same
    # worker then measures M = 64 (the default isolation: one worker per implementation).
    cases = [Case("nt_xent", "naive", m, 8, repeats=1, mem_limit=32 << 20) for m in (4096, 64)]
    (_, big), (_, small) = measure_in_workers(cases, None, lambda case: None)
    assert big["status"] == "oom" and "limit 0.03 GiB" in big["note"], big
    assert "total_ms" not in big
    assert small["status"] == "ok" and small["total_ms"] > 0 and small["peak_mem_bytes"] >= 64 * 63 * 4, small


def test_compile_only_delegates_or_says_what_is_missing(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("fastcl.profiler.compile_report")
    fake.__spec__ = importlib.machinery.ModuleSpec(fake.__name__, None)
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(fastcl.profiler, "compile_report", fake, raising=False)
    assert main(["--compile-only", "--quick", "--arch", "sm90"]) == 0
    assert calls == [["--quick", "--arch", "sm90"]]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["--compile-only"]) == 2
    assert "fastcl.profiler.compile_report" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad",
    [
        ["--sizes", "63", "--loss", "nt_xent"],
        ["--impl", "bogus"],
        ["--sizes", "x"],
        ["--dim", "8", "--sub-dim", "9"],
        ["--mem-limit", "lots"],
        ["--loss", "ntxent"],
        ["--isolate", "thread"],
        ["--repeats", "-1"],
    ],
)
def test_bad_arguments_exit_with_a_message(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*bad, "--no-progress"])
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("m", [6, 34])
def test_every_implementation_computes_the_registry_formula(loss, m):
    # What the profiler times must be the loss itself: each implementation it builds against the registry's
    # float64 formula, and the naive gradient against fastcl's torch backend.
    entry = loss_entry(loss)
    tensors, targets = entry.make_inputs(m, 7, dtype=torch.float32, device="cpu", seed=m)
    expected = entry.reference(*(t.double() for t in tensors), temperature=entry.default_temperature, **targets)
    grads = {}
    for impl in ("naive", "torch", "pml"):
        try:
            call, leaves = build_workload(Case(loss, impl, m, 7, seed=m))
        except ImplUnavailable:
            continue
        value = call()
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=f"{loss} {impl}")
        value.backward()
        grads[impl] = [t.grad for t in leaves]
    for got, want in zip(grads["torch"], grads["naive"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_naive_sub_dim_gives_zero_gradient_past_the_prefix():
    call, (z1, _) = build_workload(Case("nt_xent", "naive", 10, 12, sub_dim=5))
    call().backward()
    assert torch.count_nonzero(z1.grad[:, 5:]) == 0 and torch.count_nonzero(z1.grad[:, :5]) > 0


def test_quick_picks_the_fused_backends_that_run_here_and_never_the_interpreter(monkeypatch):
    from fastcl.profiler.cli import _settings, build_parser

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = build_parser().parse_args(["--quick", "--device", "cpu", "--sizes", "64"])
    _settings(args)
    assert args.impl == ["naive", "torch"] and args.sizes == [64] and args.isolate == "run"


@pytest.mark.parametrize(
    ("seconds_per_run", "repeats", "runs"),
    [(0.001, 3, 100), (0.05, 3, 3), (4.0, 10, 3), (20.0, 10, 1), (1.0, 0, 0)],
)
def test_timed_runs_stretch_short_cases_and_cap_long_ones(seconds_per_run, repeats, runs):
    # At least `repeats` runs and 0.1 s in all (capped at 100 runs), but no more than ~10 s: then at least one.
    assert len(measure._runs(lambda: seconds_per_run, repeats, lambda t: t)) == runs


def test_workers_sleep_idle_openmp_threads_unless_told_otherwise(monkeypatch):
    from fastcl.profiler.runner import _worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert _worker_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert _worker_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_load_note_says_whether_other_processes_competed():
    from fastcl.profiler.report import _load_note

    quiet = {"loadavg_1min_before": 0.4, "loadavg_1min_after": 1.8, "threads": 2}
    assert _load_note(quiet) == "within the thread count"
    assert "competed" in _load_note(dict(quiet, loadavg_1min_before=19.0))
    assert _load_note({"threads": 2}) == "load unknown"
