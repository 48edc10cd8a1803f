"""The compile-only kernel report (``fastcl.profiler.compile_report``): the shipped Triton kernels compiled
for sm90 / sm80 without a GPU, read back from ptxas and the SASS, whole passes and the cost MODEL. A small
set (the kernels NT-Xent runs, one config), since every compile costs seconds of CPU; #22's budget is
checked on the committed report (bench/results/compile-*.json with a model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")
from fastcl.kernels.compile_only import REGION_FIELDS, REGISTER_LIMIT, analyze_sass, whole_pass  # noqa: E402
from fastcl.profiler import compile_report, kernel_model  # noqa: E402


def test_quick_report_rows_json_and_markdown(tmp_path):
    json_path, markdown_path = tmp_path / "report.json", tmp_path / "report.md"
    status = compile_report.main(["--quick", "--json", str(json_path), "--markdown", str(markdown_path)])
    assert status == 0
    report = json.loads(json_path.read_text())
    assert "not measured" in report["meta"]["kind"]
    rows = {row["kernel"]: row for row in report["rows"]}
    (record,) = report["model"]  # NT-Xent, sm90, bf16, D' = 128
    assert record["kind"].startswith("MODEL") and record["loss"] == "ntxent"
    assert {p["kernel"] for p in record["passes"]} == set(rows)
    for row in rows.values():
        assert row["arch"] == "sm90" and row["dtype"] == "bf16" and row["D"] == 128
        assert row["mma"] == "wgmma"  # bf16 on Hopper tensor cores
        assert 0 < row["registers"] <= REGISTER_LIMIT
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0
        assert row["fits"] and 0 < row["shared_bytes"] <= row["shared_limit"]
        assert row["address_check"] == "ok"  # contiguous, column-major and strided inputs (tests/test_addressing.py)
        # Whole passes: the feature-chunk loop's trips come out of the SASS MMA FLOPs exactly (one GEMM of
        # 2·D' per element to recompute the tile, plus 2·BLOCK_DO per output slice in a backward).
        slices = row["output_slices"]
        assert slices == (128 // row["block_do"] if "block_do" in row else 1)
        assert row["gemm_units"] == pytest.approx(slices * (1 + row.get("block_do", 0) / 128))
        assert row["dynamic_instructions_per_element"] >= slices * row["static_instructions_per_element"]
        assert row["dynamic_ex2_per_element"] == pytest.approx(slices * row["static_ex2_per_element"], abs=0.01)
        # Every visit of a tile loads at least its BLOCK_N key rows: BLOCK_N·D'·2 bytes per BLOCK_M·BLOCK_N elements.
        assert row["l2_bytes_per_element"] >= 128 * 2 / row["block_m"] * slices
    table = markdown_path.read_text()
    assert "not measured" in table and "| address_check |" in table and "MODEL" in table
    assert "dynamic_instructions_per_element" in table and "predicted_ratio_vs_naive" in table


def test_address_fault_is_a_finding_and_fails_the_report(monkeypatch, capsys):
    """A row whose address check names a 32-bit offset is listed among the findings and the exit status is 1."""
    row = dict(
        kernel="k",
        arch="sm90",
        dtype="bf16",
        precision="ieee",
        D=128,
        config="64x64x32/w4/s3",
        registers=96,
        spill_stores=0,
        spill_loads=0,
        shared_bytes=1024,
        shared_limit=232448,
        fits=True,
        mma="wgmma",
        dynamic_instructions_per_element=10.0,
        dynamic_ex2_per_element=1.0,
        address_check="transposed: i32 product reaches tt.addptr: %x = arith.muli %a, %b : i32 (k.py:3)",
    )
    (finding,) = compile_report.summarize([row])
    assert "32-bit address offset" in finding and "k.py:3" in finding
    monkeypatch.setattr(compile_report, "run_report", lambda args, progress=None: [row])
    monkeypatch.setattr(compile_report, "metadata", lambda: {})
    assert compile_report.main(["--quick"]) == 1
    assert "32-bit address offset" in capsys.readouterr().out


@pytest.mark.slow
def test_fp32_default_uses_tensor_cores_on_sm80(tmp_path):
    """fp32 rows compile to tf32x3 MMA (mma.sync on Ampere) by default, not FMA."""
    json_path = tmp_path / "report.json"
    assert (
        compile_report.main(
            [
                "--arch",
                "sm80",
                "--dtypes",
                "fp32",
                "--dims",
                "128",
                "--configs",
                "1",
                "--kernels",
                "block_index_forward",
                "--json",
                str(json_path),
            ]
        )
        == 0
    )
    (row,) = json.loads(json_path.read_text())["rows"]
    assert row["precision"] == "tf32x3" and row["mma"] == "mma.sync"


def test_bad_arguments_name_the_flag():
    with pytest.raises(SystemExit, match="--arch"):
        compile_report.parse_args(["--arch", "sm75"])


def test_sass_element_loop_is_the_innermost_loop_with_ex2():
    sass = """
    /*0000*/                   MOV R1, R2 ;
.L_x_1:
    /*0010*/                   FMUL R3, R3, R4 ;
    /*0018*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR4][R10.64], P0 ;
.L_x_2:
    /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
    /*0028*/                   LDGSTS.E.BYPASS.128 [R9], desc[UR4][R10.64], P1 ;
    /*0030*/              @!P1 BRA `(.L_x_2) ;
    /*0038*/                   LDG.E.64 R14, desc[UR4][R16.64] ;
    /*0040*/                   MUFU.EX2 R5, R5 ;
    /*0050*/                   MUFU.EX2 R6, R6 ;
    /*0060*/              @!P0 BRA `(.L_x_1) ;
    /*0070*/                   EXIT ;
    /*0080*/                   NOP ;
"""
    found = analyze_sass(sass)
    assert (found["mma"], found["loop_instructions"], found["loop_ex2"], found["loop_mma"]) == ("mma.sync", 9, 2, 1)
    (nested,) = found["loop_nested"]
    assert nested["instructions"] == 3 and nested["mma_flops"] == 16 * 8 * 16 * 2 and nested["async_bytes"] == 32 * 16
    assert found["loop_outside"]["instructions"] == 6 and found["loop_outside"]["vector_ldg_bytes"] == 32 * 8
    assert analyze_sass("    /*0000*/                   FFMA R1, R2, R3, R1 ;\n")["mma"] == "fma"


def test_whole_pass_counts_every_trip_and_slice():
    """Per element: the nested (feature-chunk) loop × ⌈D'/BLOCK_D⌉ trips, the rest once, × ⌈D'/BLOCK_DO⌉ output
    slices; the pipeliner's prologue chunks (num_stages − 1, issued again predicated off) are not L2 bytes twice."""
    import triton

    region = dict.fromkeys(REGION_FIELDS, 0)
    nested = dict(region, instructions=10, ex2=0, mma_flops=4096.0, async_bytes=512)
    outside = dict(
        region,
        instructions=30,
        ex2=2,
        mufu=3,
        mma_flops=2048.0,
        async_bytes=2 * 512,
        tile_ldg_bytes=512,
        vector_ldg_bytes=256,
    )
    config = triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, BLOCK_DO=64), num_warps=1, num_stages=3)
    figures = whole_pass(dict(loop_outside=outside, loop_nested=[nested]), config, 256, "ieee")
    per_element = 4 / 256  # 4 output slices, one warp, 16 × 16 elements (figures rounded to 3 digits)
    assert figures["feature_trips"] == 8 and figures["output_slices"] == 4
    assert figures["dynamic_instructions_per_element"] == pytest.approx(32 * (30 + 8 * 10) * per_element, abs=1e-3)
    assert figures["dynamic_ex2_per_element"] == pytest.approx(32 * 2 * per_element, abs=1e-3)
    assert figures["dynamic_mufu_per_element"] == pytest.approx(32 * 3 * per_element, abs=1e-3)
    assert figures["l2_bytes_per_element"] == pytest.approx((8 * 512 + 512) * per_element, abs=1e-3)
    assert figures["vector_load_lane_bytes_per_element"] == pytest.approx(256 * per_element, abs=1e-3)
    assert figures["gemm_units"] == pytest.approx((2048 + 8 * 4096) * per_element / (2 * 256), abs=1e-3)


def test_model_bounds_and_naive_by_hand():
    """A loss record of the model against the formulas written out: bounds = work × M² / rate."""
    rates = kernel_model._rates("sm90", "bf16")
    assert rates["tensor"] == 989.4e12 and rates["mufu"] == 132 * 16 * 1.83e9 and rates["issue"] == 132 * 128 * 1.83e9
    row = dict(
        kernel="k",
        arch="sm90",
        dtype="bf16",
        D=128,
        config="c",
        fits=True,
        spill_stores=0,
        spill_loads=0,
        dynamic_instructions_per_element=12.0,
        dynamic_ex2_per_element=1.0,
        dynamic_mufu_per_element=1.0,
        l2_bytes_per_element=4.0,
        mma_flops_per_element=256.0,
    )
    m = 65536
    bounds = kernel_model.pass_bounds(row, rates, 1, m)
    assert bounds["tensor_ms"] == pytest.approx(256 * m * m / 989.4e12 * 1e3)
    assert bounds["l2_ms"] == pytest.approx(4 * m * m / 9.37e12 * 1e3)
    assert bounds["predicted_ms"] == max(bounds[k] for k in ("tensor_ms", "mufu_ms", "issue_ms", "l2_ms"))
    naive = kernel_model.naive_model("ntxent", "sm90", "bf16", 128, m)
    # S = Z·Zᵀ writes M² bf16 at 3.35 TB/s (memory-bound at D' = 128): 2·M²/3.35e12 s.
    assert naive["naive_kernels"][0]["ms"] == pytest.approx(2 * m * m / 3.35e12 * 1e3)
    assert naive["naive_predicted_ms"] == pytest.approx(sum(k["ms"] for k in naive["naive_kernels"]))


# --- the budget: issue #22's targets (kernel_model.TARGETS) on the committed report -------------------------

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
COMMITTED = max((p for p in RESULTS.glob("compile-*.json") if "model" in json.loads(p.read_text())), default=None)
# Targets the committed report does not meet yet: each an expected failure with its number, strict, so the
# day a kernel change meets it (and the report is regenerated) CI says so and it moves out of this table.
UNMET = {
    "ntxent_backward_instructions": "69.38 dynamic instructions per element (own block, two output slices)",
    "supcon_backward_instructions": "71.38 dynamic instructions per element (own block, two output slices)",
    "ntxent_backward_ex2": "4.0 ex2 per element: two exponentials per visit, two output slices",
    "supcon_backward_ex2": "4.0 ex2 per element: two exponentials per visit, two output slices",
    "ntxent_l2_halved": "1.333 of the baseline: 32 L2 bytes per element fwd + bwd (the own backward reads 28)",
    "supcon_l2_halved": "1.0 of the baseline: 24 L2 bytes per element fwd + bwd",
    "ntxent_ratio_vs_naive": "2.27x the naive model (predicted 14.7 ms, L2-bound; naive 33.3 ms)",
    "supcon_ratio_vs_naive": "3.71x the naive model (predicted 11.75 ms; naive 43.6 ms)",
    "ntxent_fraction_of_tensor_bound": "0.303 of the tensor bound (L2-bound)",
    "supcon_fraction_of_tensor_bound": "0.378 of the tensor bound (L2- and issue-bound)",
    "infonce_ratio_vs_naive": "1.40x the naive model (predicted 40.3 ms: two blocks, each an anchor and a key pass)",
    "ntxent_fp32_instructions": "fp32 (tf32x3) runs 7.82x bf16's dynamic instructions (small tiles, three products)",
    "supcon_fp32_instructions": "fp32 (tf32x3) runs 7.61x bf16's dynamic instructions",
    "infonce_fp32_instructions": "fp32 (tf32x3) runs 7.27x bf16's dynamic instructions",
}


def _targets() -> list:
    if COMMITTED is None:
        return []
    report = json.loads(COMMITTED.read_text())
    return [
        pytest.param(
            t, id=t["id"], marks=[pytest.mark.xfail(strict=True, reason=UNMET[t["id"]])] if t["id"] in UNMET else []
        )
        for t in report["targets"]
    ]


def test_committed_model_is_what_the_code_computes():
    """The committed MODEL records and targets are recomputed from the committed rows by kernel_model."""
    report = json.loads(COMMITTED.read_text())
    models = kernel_model.models(report["rows"])
    assert models == report["model"]
    assert kernel_model.evaluate_targets(models, report["rows"]) == report["targets"]
    assert {(r["loss"], r["arch"], r["dtype"], r["D"]) for r in models} >= {
        (loss, arch, dtype, 128)
        for loss in kernel_model.LOSSES
        for arch in ("sm80", "sm90")
        for dtype in ("bf16", "fp32")
    }


@pytest.mark.parametrize("target", _targets())
def test_budget_target(target):
    """One of #22's targets (sm90, bf16, D' = 128, whole passes; model ratios) on the committed report."""
    assert target["value"] is not None, f"{target['what']}: the report has no record for it"
    assert target["holds"], f"{target['what']}: {target['value']}"


@pytest.mark.slow
def test_fresh_compile_matches_the_committed_report(tmp_path):
    """The kernels the model's losses run, compiled now for sm90 bf16 D' = 128 (first config), give the committed
    report's rows: the report (and so the budget above) describes the kernels in the tree."""
    committed = json.loads(COMMITTED.read_text())
    json_path = tmp_path / "report.json"
    argv = ["--arch", "sm90", "--dtypes", "bf16", "--dims", "128", "--configs", "1", "--json", str(json_path)]
    assert compile_report.main(argv + ["--losses", ",".join(kernel_model.LOSSES)]) == 0
    fresh = json.loads(json_path.read_text())
    if fresh["meta"]["triton"] != committed["meta"]["triton"] or fresh["meta"]["ptxas"] != committed["meta"]["ptxas"]:
        pytest.skip(
            f"the committed report was made with Triton {committed['meta']['triton']} ({committed['meta']['ptxas']})"
        )
    index = {(r["kernel"], r["arch"], r["dtype"], r["D"], r["config"]): r for r in committed["rows"]}
    compared = (
        "registers",
        "spill_stores",
        "shared_bytes",
        "static_loop_instructions",
        "dynamic_instructions_per_element",
        "dynamic_ex2_per_element",
        "l2_bytes_per_element",
        "gemm_units",
    )
    for row in fresh["rows"]:
        key = (row["kernel"], row["arch"], row["dtype"], row["D"], row["config"])
        assert key in index, f"{key} is not in {COMMITTED.name}: regenerate the report"
        assert {k: row[k] for k in compared} == {k: index[key][k] for k in compared}, key
