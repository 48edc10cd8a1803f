"""bench/run_gpu.sh: its dry run (what a short GPU slot will run) parses, fits the slot and selects the
gpu-marked tests in an environment like the GPU machines' (no kornia, no pytorch-metric-learning)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fastcl import doctor
from fastcl.profiler import cli as profiler_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "run_gpu.sh"
SLOT_SECONDS = 8 * 60  # the bound for first-contact on an H100/H200


def dry_run(*args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def steps(output: str) -> dict[str, tuple[int, list[str]]]:
    """{step name: (time limit, argv)} of a first-contact dry run."""
    found = {}
    for line in output.splitlines():
        match = re.fullmatch(r"step (\S+)\s+timeout\s+(\d+)s\s+(.*)", line)
        if match:
            found[match.group(1)] = (int(match.group(2)), shlex.split(match.group(3)))
    return found


def test_first_contact_dry_run_lists_every_step_within_the_slot():
    output = dry_run("first-contact", "--dry-run")
    plan = steps(output)
    assert list(plan) == ["doctor", "gpu-tests", "headline", "csrc-tests"]
    budget = int(re.search(r"(\d+) s in all", output).group(1))
    assert budget <= SLOT_SECONDS - 30  # the install, the summary and a margin
    assert all(0 < limit <= budget for limit, _ in plan.values())
    assert "pip install --no-deps --no-build-isolation" in output  # no network needed
    assert re.search(r"results in bench/results/<gpu>-\d{4}-\d\d-\d\d-first-contact", output)
    assert dry_run("first-contact", env={"FASTCL_DRY_RUN": "1"}) == output


def test_first_contact_commands_parse():
    """The doctor and profiler flags the script passes are ones those commands accept (no GPU needed)."""
    plan = steps(dry_run("first-contact", "--dry-run"))
    doctor_argv = plan["doctor"][1]
    assert doctor_argv[1:4] == ["-m", "fastcl", "doctor"]
    assert doctor.build_parser().parse_args(doctor_argv[4:]).backends == ["triton"]

    headline = plan["headline"][1]
    assert headline[1:3] == ["-m", "fastcl.profiler"]
    args = profiler_cli.build_parser().parse_args(headline[3:])
    assert args.loss == ["nt_xent", "supcon", "info_nce"] and args.sizes == [65536] and args.dim == 128
    assert args.dtype == "bf16" and set(args.impl) == {"triton", "naive", "compile"}
    assert args.json.endswith("headline.json") and args.markdown.endswith("headline.md")

    for name in ("gpu-tests", "csrc-tests"):
        argv = plan[name][1]
        assert argv[1:3] == ["-m", "pytest"] and argv[argv.index("-m", 3) + 1] == "gpu"


def test_the_other_modes_dry_run_and_bad_arguments_fail():
    output = dry_run("all", "--dry-run")
    assert "-m pytest -q tests" in output and output.count("fastcl.profiler") == 4
    assert "bench_augment.py" in output and "fastcl.train" in output
    bad = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "usage: bench/run_gpu.sh" in bad.stderr


@pytest.mark.slow
def test_gpu_tests_collect_without_the_optional_extras():
    """The GPU machines have no kornia or pytorch-metric-learning: the first-contact selection must still
    collect (the files that need them are left out by tests/conftest.py), with the gpu tests in it."""
    code = (
        "import sys\n"
        "for name in ('kornia', 'pytorch_metric_learning'):\n"
        "    sys.modules[name] = None  # import fails as if not installed\n"
        "import pytest\n"
        "sys.exit(pytest.main(['-q', '--collect-only', '-m', 'gpu', '-p', 'no:cacheprovider', 'tests']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    collected = re.search(r"(\d+)/\d+ tests collected", result.stdout)
    assert collected and int(collected.group(1)) > 0
    assert "error" not in result.stdout.lower().split("tests collected")[-1]
