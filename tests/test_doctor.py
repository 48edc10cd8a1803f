"""``fastcl doctor``: the environment, the backends, the self-check table and its exit status."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from test_selfcheck import on_cpu, raising_block_backward, stand_in_triton, wrong_ntxent_forward  # noqa: F401

import fastcl
from fastcl import cli, doctor, selfcheck, torch_backend


def test_cpu_machine_says_no_gpu_lists_backends_and_exits_0(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch             {torch.__version__}" in out and f"fastcl            {fastcl.__version__}" in out
    assert "no CUDA device" in out and "CUDA extension    not usable" in out
    for backend in ("torch", "triton", "cuda"):
        assert f"\n  {backend:<7} " in out
    assert "\n  torch   runs\n" in out
    assert "nothing to check" in out


def test_the_table_and_the_exit_status_follow_the_checks(on_cpu, monkeypatch, capsys):  # noqa: F811
    def raising_supcon_backward(*args):  # SupCon's blocks (label positives) only
        return raising_block_backward() if args[6].positives == "labels" else torch_backend.block_backward(*args)

    stand_in_triton(monkeypatch, block_forward=wrong_ntxent_forward, block_backward=raising_supcon_backward)
    report = on_cpu / "doctor.json"
    argv = ["--device", "cpu", "--dtypes", "float32", "--losses", "nt_xent,supcon,siglip", "--json", str(report)]
    assert doctor.main(argv) == 1
    out = capsys.readouterr().out
    rows = {line.split()[3]: line for line in out.splitlines() if line.startswith("  triton  cpu")}
    assert set(rows) == {"nt_xent", "supcon", "siglip"}
    assert " FAIL " in rows["nt_xent"] and re.search(r"loss relative error [0-9.]+ > 0\.002", rows["nt_xent"])
    assert " FAIL " in rows["supcon"] and "raised RuntimeError" in rows["supcon"]
    assert " pass " in rows["siglip"]
    assert "self-check: 1 of 3 passed, 2 FAILED" in out
    data = json.loads(report.read_text())
    assert {r["case"]: r["passed"] for r in data["results"]} == {
        "triton/float32/nt_xent": False,
        "triton/float32/supcon": False,
        "triton/float32/siglip": True,
    }
    assert data["environment"]["torch"].startswith(torch.__version__)
    # the results are the self-check's: "auto" now uses them without checking again
    monkeypatch.setattr(selfcheck, "check", lambda *a: pytest.fail("checked again"))
    with pytest.warns(selfcheck.SelfCheckWarning, match="nt_xent"):
        assert not selfcheck.trusted("triton", torch.device("cpu"), torch.float32, "nt_xent")
    assert selfcheck.trusted("triton", torch.device("cpu"), torch.float32, "siglip")


def test_every_check_passing_exits_0(on_cpu, monkeypatch, capsys):  # noqa: F811
    stand_in_triton(monkeypatch)
    argv = ["--device", "cpu", "--dtypes", "float32,bfloat16", "--losses", "info_nce,dcl", "--warm"]
    assert doctor.main(argv) == 0
    out = capsys.readouterr().out
    assert "self-check: 4 of 4 passed\n" in out and "warm ms" in out


def test_bad_arguments_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        doctor.main(["--dtypes", "float8"])
    assert "--dtypes: expected a comma list of" in capsys.readouterr().err


def test_the_console_command_runs():
    out = subprocess.run(
        [sys.executable, "-m", "fastcl", "doctor", "--no-check"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fastcl doctor\n") and "backends\n" in out.stdout
    assert "doctor" in subprocess.run([sys.executable, "-m", "fastcl", "--help"], capture_output=True, text=True).stdout
