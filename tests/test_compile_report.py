"""The compile-only kernel report (``fastcl.profiler.compile_report``): the shipped Triton kernels compiled
for sm90 / sm80 without a GPU, read back from ptxas and the SASS. A small set (the block primitive's
kernels with index positives, one config), since every compile costs seconds of CPU; the full table is
bench/results/compile-*.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")
from fastcl.kernels.compile_only import REGISTER_LIMIT, analyze_sass  # noqa: E402
from fastcl.profiler import compile_report  # noqa: E402


def test_quick_report_rows_json_and_markdown(tmp_path):
    json_path, markdown_path = tmp_path / "report.json", tmp_path / "report.md"
    status = compile_report.main(["--quick", "--json", str(json_path), "--markdown", str(markdown_path)])
    assert status == 0
    report = json.loads(json_path.read_text())
    assert "not measured" in report["meta"]["kind"]
    rows = {row["kernel"]: row for row in report["rows"]}
    assert set(rows) == {"block_index_forward", "block_index_anchor", "block_index_key"}
    for row in rows.values():
        assert row["arch"] == "sm90" and row["dtype"] == "bf16" and row["D"] == 128
        assert row["mma"] == "wgmma"  # bf16 on Hopper tensor cores
        assert 0 < row["registers"] <= REGISTER_LIMIT
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0
        assert row["fits"] and 0 < row["shared_bytes"] <= row["shared_limit"]
        assert row["loop_instructions"] > 0 and row["instructions_per_element"] > 0
        assert row["address_check"] == "ok"  # contiguous, column-major and strided inputs (tests/test_addressing.py)
    for kernel in rows:  # one ex2 per similarity element per pass
        assert rows[kernel]["ex2_per_element"] == pytest.approx(1.0, abs=0.1)
    # The instruction budget (docs/kernels.md; needs FFMA contraction, which the configs request).
    assert rows["block_index_forward"]["instructions_per_element"] <= 12
    assert rows["block_index_anchor"]["instructions_per_element"] <= 20
    assert rows["block_index_key"]["instructions_per_element"] <= 20
    table = markdown_path.read_text()
    assert "not measured" in table and "block_index_key" in table and "| address_check |" in table


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
        instructions_per_element=10.0,
        ex2_per_element=1.0,
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
.L_x_2:
    /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
    /*0030*/              @!P1 BRA `(.L_x_2) ;
    /*0040*/                   MUFU.EX2 R5, R5 ;
    /*0050*/                   MUFU.EX2 R6, R6 ;
    /*0060*/              @!P0 BRA `(.L_x_1) ;
    /*0070*/                   EXIT ;
    /*0080*/                   NOP ;
"""
    assert analyze_sass(sass) == dict(mma="mma.sync", loop_instructions=6, loop_ex2=2, loop_mma=1)
    assert analyze_sass("    /*0000*/                   FFMA R1, R2, R3, R1 ;\n")["mma"] == "fma"


def test_block_forward_with_labels_meets_the_instruction_target(tmp_path):
    """SupCon's labels block keeps its positives out of the element loop (class sums): the sm90 bf16 forward
    stays within the 12 instructions and one ex2 per similarity element of docs/kernels.md, without spills."""
    json_path = tmp_path / "report.json"
    argv = ["--arch", "sm90", "--dtypes", "bf16", "--dims", "128", "--configs", "1"]
    assert compile_report.main(argv + ["--kernels", "block_labels_forward", "--json", str(json_path)]) == 0
    (row,) = json.loads(json_path.read_text())["rows"]
    assert row["kernel"] == "block_labels_forward" and row["mma"] == "wgmma"
    assert row["spill_stores"] == 0 and row["spill_loads"] == 0
    assert 0 < row["instructions_per_element"] <= 12
    assert row["ex2_per_element"] == pytest.approx(1.0, abs=0.1)
