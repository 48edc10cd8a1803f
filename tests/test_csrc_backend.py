"""backend="cuda" wiring that runs without a GPU: dispatch reports why it cannot run, nothing compiles,
and the package ships the sources a just-in-time build needs."""

from __future__ import annotations

import pytest
import torch

import fastcl
from fastcl import dispatch
from fastcl.contract import Layout
from fastcl.cuda_backend import block as cuda_block

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_cpu_only_install_reports_why_and_never_builds(monkeypatch):
    def no_build():
        raise AssertionError("a CPU-only machine must not try to build the extension")

    monkeypatch.setattr(cuda_block, "_build_just_in_time", no_build)
    reason = dispatch.unavailable_reason("cuda")
    assert reason is not None and "CUDA device" in reason
    assert "cuda" not in fastcl.available_backends()
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here: it needs a CUDA device"):
        dispatch.resolve("cuda", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="cannot run here"):
        cuda_block.block_forward(torch.randn(2, 3), None, torch.randn(2, 3), None, torch.tensor(0.5), 3, Layout())


def test_sources_for_a_just_in_time_build_are_found():
    sources = cuda_block._sources_dir()
    assert sources is not None
    names = {p.name for p in sources.iterdir()}
    assert {"block_ops.cpp", "block_kernels.cu", "block_launch.h", "block_math.cuh"} <= names


@pytest.mark.parametrize(
    "layout, expected",
    [
        (Layout(), (False, 0, 0, False, 0)),
        (
            Layout(positives="labels", self_offset=-3, a_labels=torch.tensor([1]), k_labels=torch.tensor([1, 2])),
            (True, -3, 2, False, 0),
        ),
        (
            Layout(positives="mask", mask=torch.ones(2, 2, dtype=torch.bool), exclude_positives=True),
            (False, 0, 3, True, 0),
        ),
        (
            Layout(positives="index", pos_index=torch.tensor([0]), epilogue="sigmoid", bias=torch.tensor(-1.0)),
            (False, 0, 1, False, 1),
        ),
    ],
)
def test_layout_arguments(layout, expected):
    """Flags and enum codes for the ops; weights in the accumulation dtype, indices as contiguous int64."""
    args = cuda_block.layout_arguments(layout, torch.zeros(1, 3, dtype=torch.bfloat16))
    assert args[:5] == expected
    bias, pos_index, a_labels, k_labels, mask = args[5:]
    for tensor in (pos_index, a_labels, k_labels):
        assert tensor is None or (tensor.dtype == torch.int64 and tensor.is_contiguous())
    for tensor in (bias, mask):
        assert tensor is None or tensor.dtype == torch.float32
