"""`fastcl bench` on the CPU with tiny sizes: JSON columns, plot, skipped impls, real OOM, real memory.

Timing and memory figures are produced here, never asserted against targets (that is bench/'s job); the
assertions check that the records are complete and self-consistent, that the naive losses compute the
SPEC values, and that the memory measurement sees at least the M×M logits the naive loss must allocate.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from fastcl.profiler import main
from fastcl.profiler.cases import GEMM_UNITS, build_loss_fn, make_inputs
from fastcl.profiler.report import RECORD_FIELDS

NUMERIC_FIELDS = ("fwd_ms", "bwd_ms", "total_ms", "peak_mem_bytes", "tflops", "ratio_vs_naive", "matmul_tflops")


def _run_cli(tmp_path, *args):
    out = tmp_path / "bench.json"
    status = main([*args, "--json", str(out), "--no-progress"])
    assert status == 0
    return json.loads(out.read_text())


def test_cli_records_every_column_for_every_available_impl(tmp_path, capsys):
    # Small M: pytorch-metric-learning's NTXentLoss allocates (#positive pairs)×(#negative pairs), i.e. O(M³).
    m, dim, sub_dim = 96, 16, 8
    plot = tmp_path / "bench.png"
    result = _run_cli(
        tmp_path, "--loss", "all", "--impl", "torch,naive,pml,cuda,infcl", "--sizes", str(m),
        "--dim", str(dim), "--sub-dim", str(sub_dim), "--repeats", "2", "--device", "cpu", "--plot", str(plot),
    )
    records = result["records"]
    losses, impls = ("ntxent", "infonce", "supcon"), ("torch", "naive", "pml", "cuda", "infcl")
    assert {(r["loss"], r["impl"]) for r in records} == {(loss, impl) for loss in losses for impl in impls}
    for r in records:
        assert set(RECORD_FIELDS) <= set(r), r
        assert (r["M"], r["D"], r["sub_dim"], r["dtype"], r["device"]) == (m, dim, sub_dim, "fp32", "cpu")
        if r["impl"] in ("torch", "naive", "pml"):
            assert r["status"] == "ok", r
            for field in NUMERIC_FIELDS:
                assert isinstance(r[field], (int, float)) and math.isfinite(r[field]) and r[field] > 0, (field, r)
            assert r["flops"] == GEMM_UNITS[r["loss"]] * 2 * m * m * sub_dim
            assert r["tflops"] == pytest.approx(r["flops"] / (r["total_ms"] * 1e9))
            assert r["fraction_of_matmul"] == pytest.approx(r["tflops"] / r["matmul_tflops"])
    by_key = {(r["loss"], r["impl"]): r for r in records}
    for loss in losses:
        base, fused = by_key[(loss, "naive")], by_key[(loss, "torch")]
        assert base["ratio_vs_naive"] == 1.0 and base["mem_ratio_vs_naive"] == 1.0
        assert fused["ratio_vs_naive"] == pytest.approx(fused["total_ms"] / base["total_ms"])
        assert fused["mem_ratio_vs_naive"] == pytest.approx(fused["peak_mem_bytes"] / base["peak_mem_bytes"])
        # Every naive loss holds at least one M×(M−1) float32 logit matrix: the RSS measurement must see it.
        assert base["peak_mem_bytes"] >= m * (m - 1) * 4, base
        # Not runnable here: skipped, with the reason, never a crash or a number.
        for impl in ("cuda", "infcl"):
            r = by_key[(loss, impl)]
            assert r["status"] == "skipped" and r["note"] and r["total_ms"] is None, r
    assert "CUDA" in by_key[("ntxent", "cuda")]["note"]
    assert "CLIP" in by_key[("ntxent", "infcl")]["note"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["meta"]["torch"] == torch.__version__ and result["meta"]["date"]
    stdout = capsys.readouterr().out
    assert "time ×naive" in stdout and "skipped" in stdout


def test_size_past_the_memory_limit_is_oom_not_a_crash(tmp_path):
    # Naive NT-Xent at M = 4096 needs M×(M−1)×4 B ≈ 64 MiB of logits alone: 32 MiB cannot hold it.
    result = _run_cli(tmp_path, "--loss", "ntxent", "--impl", "naive", "--sizes", "4096", "--dim", "8",
                      "--repeats", "1", "--mem-limit", "32M")
    (record,) = result["records"]
    assert record["status"] == "oom", record
    assert "allocating" in record["note"] and "limit 0.03 GiB" in record["note"], record
    assert record["total_ms"] is None and record["ratio_vs_naive"] is None


def test_compile_impl_and_chrome_traces(tmp_path):
    pytest.importorskip("torch._inductor")
    traces = tmp_path / "traces"
    result = _run_cli(tmp_path, "--loss", "infonce", "--impl", "naive,compile", "--sizes", "256", "--dim", "8",
                      "--repeats", "1", "--profile", str(traces))
    by_impl = {r["impl"]: r for r in result["records"]}
    trace = json.loads((traces / "infonce-naive-M256.json").read_text())
    assert by_impl["naive"]["trace"] == str(traces / "infonce-naive-M256.json")
    assert any("mm" in event.get("name", "") for event in trace["traceEvents"])
    compiled = by_impl["compile"]
    if shutil.which("c++") or shutil.which("g++"):
        assert compiled["status"] == "ok", compiled
        assert compiled["total_ms"] > 0 and compiled["ratio_vs_naive"] > 0
    else:  # inductor needs a C++ compiler on the CPU: reported as an error record, never raised
        assert compiled["status"] == "error" and compiled["note"], compiled


@pytest.mark.parametrize("bad", [["--sizes", "63", "--loss", "ntxent"], ["--impl", "bogus"], ["--sizes", "x"],
                                 ["--dim", "8", "--sub-dim", "9"], ["--mem-limit", "lots"]])
def test_bad_arguments_exit_with_a_message(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*bad, "--no-progress"])
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def _spec_value(loss: str, inputs: list, tau: float) -> torch.Tensor:
    """SPEC §1–3 in float64, written directly from the formulas."""
    if loss == "ntxent":
        z = torch.nn.functional.normalize(torch.cat(inputs).double(), dim=1)
        m, n = z.shape[0], z.shape[0] // 2
        s = z @ z.T / tau
        pos = torch.arange(m).add(n).remainder(m)
        s_masked = s.masked_fill(torch.eye(m, dtype=torch.bool), -math.inf)
        return (torch.logsumexp(s_masked, 1) - s[torch.arange(m), pos]).mean()
    if loss == "infonce":
        q, k = (torch.nn.functional.normalize(t.double(), dim=1) for t in inputs)
        s = q @ k.T / tau
        one_way = lambda x: (torch.logsumexp(x, 1) - x.diagonal()).mean()  # noqa: E731
        return (one_way(s) + one_way(s.T)) / 2
    feats, labels = inputs
    n, v, _ = feats.shape
    z = torch.nn.functional.normalize(feats.double(), dim=2).transpose(0, 1).reshape(n * v, -1)
    y = labels.repeat(v)
    s = z @ z.T / tau
    eye = torch.eye(n * v, dtype=torch.bool)
    log_prob = s - torch.logsumexp(s.masked_fill(eye, -math.inf), 1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~eye
    return -(log_prob * positives).sum(1).div(positives.sum(1)).mean()  # τ/τ_b = 1 at the defaults


@pytest.mark.parametrize("loss", ["ntxent", "infonce", "supcon"])
@pytest.mark.parametrize("m", [6, 34])
def test_naive_and_peer_losses_equal_the_spec_and_fastcl(loss, m):
    inputs = make_inputs(loss, m, 7, torch.float32, "cpu", seed=m)
    tau = {"ntxent": 0.5, "infonce": 0.1, "supcon": 0.07}[loss]
    expected = _spec_value(loss, [t.detach() for t in inputs], tau).float()
    for impl in ("naive", "pml", "torch"):
        value = build_loss_fn(loss, impl, None, "cpu")(*inputs)
        torch.testing.assert_close(value.float(), expected, rtol=1e-5, atol=1e-6, msg=f"{loss} {impl}")
    # The naive gradient equals fastcl's torch backend (autograd of the formula vs the chunked backward).
    grads = {}
    for impl in ("naive", "torch"):
        leaves = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        build_loss_fn(loss, impl, None, "cpu")(*leaves).backward()
        grads[impl] = [t.grad for t in leaves if t.is_floating_point()]
    for got, want in zip(grads["torch"], grads["naive"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_naive_sub_dim_gives_zero_gradient_past_the_prefix():
    z1, z2 = make_inputs("ntxent", 10, 12, torch.float32, "cpu")
    build_loss_fn("ntxent", "naive", 5, "cpu")(z1, z2).backward()
    assert torch.count_nonzero(z1.grad[:, 5:]) == 0 and torch.count_nonzero(z1.grad[:, :5]) > 0

