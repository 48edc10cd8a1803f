"""The CUDA backend's block primitive (csrc/, ``backend="cuda"``) on a GPU against the float64 definition.

Skipped without a CUDA device (marker ``gpu``); the first run compiles the extension just in time unless
``pip install`` built ``fastcl._C``. Reuses tests/test_block.py's cases and dense reference, and adds
blocks larger than the kernels' tiles (64 rows, 32/64-feature slices: several key tiles, anchor tiles and
output slices, partial last tiles), float16, 3xTF32 (the fp32 default), TF32 and FMA on request,
bit-identical reruns and ``torch.compile``. Without a GPU the same per-tile code runs in
tests/test_csrc_host.py.
"""

from __future__ import annotations

import pytest
import torch
from test_block import CASES, Case, _inputs, run_primitive
from test_csrc_host import TILED, check_against_reference

from fastcl import cuda_backend, dispatch
from fastcl.contract import Layout, inverse_norms

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_backend():
    reason = dispatch.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend='cuda': {reason}")


def run_cuda(case: Case, a, k, fields, alpha, beta, dtype):
    return run_primitive("cuda", case, a, k, fields, alpha, beta, dtype, "cuda")


@pytest.mark.parametrize("case", CASES + TILED, ids=[c.name for c in CASES + TILED])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=["fp64", "fp32", "bf16", "fp16"]
)
def test_cuda_primitive_matches_float64(case, dtype):
    check_against_reference(case, dtype, run_cuda)


@pytest.mark.parametrize("case", TILED[:3], ids=[c.name for c in TILED[:3]])
def test_tf32_when_pytorch_allows_it(case):
    """fp32 rows go through TF32 tensor cores exactly when PyTorch's own fp32 matmuls would."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_against_reference(case, torch.float32, run_cuda, tolerance=(5e-3, 1e-2))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("case", TILED[:3], ids=[c.name for c in TILED[:3]])
def test_exact_fma_when_pytorch_asks_for_ieee(case):
    """fp32 rows run 3xTF32 by default (test_cuda_primitive_matches_float64) and exact FMA when PyTorch's
    fp32 matmul precision is "ieee"."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision setting")
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        check_against_reference(case, torch.float32, run_cuda)
    finally:
        matmul.fp32_precision = previous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reruns_are_bit_identical(dtype):
    """No atomics: every output element is summed by one CTA in a fixed order."""
    case = TILED[0]
    a, k, fields, alpha, beta = _inputs(case, seed=5)
    first = run_cuda(case, a, k, fields, alpha, beta, dtype)
    second = run_cuda(case, a, k, fields, alpha, beta, dtype)
    for x, y in zip((*first[0], *first[1]), (*second[0], *second[1])):
        assert torch.equal(x, y)


def test_compiles_with_fullgraph():
    """The ops have fake implementations: torch.compile traces them without a graph break."""
    a = torch.randn(100, 40, device="cuda")
    tau = torch.tensor(0.1, device="cuda")
    layout = Layout(positives="index", self_offset=0, pos_index=(torch.arange(100, device="cuda") + 50) % 100)
    cuda_backend.block_forward(a, None, a, None, tau, 32, layout)  # loads the extension, registers the fakes
    layout_args = cuda_backend.layout_arguments(layout, a)

    def statistics(x):
        inv = inverse_norms(x, 32)
        return torch.ops.fastcl_cuda.block_forward(x, inv, x, inv, tau, 32, *layout_args)

    eager = statistics(a)
    compiled = torch.compile(statistics, fullgraph=True)(a)
    for x, y in zip(eager, compiled):
        torch.testing.assert_close(x, y)


def test_bad_argument_is_named():
    a = torch.randn(8, 4, device="cuda")
    tau = torch.tensor(0.1, device="cuda")
    with pytest.raises(RuntimeError, match="sub_dim"):
        cuda_backend.block_forward(a, None, a, None, tau, 5, Layout())
    with pytest.raises(RuntimeError, match="k"):
        cuda_backend.block_forward(a, None, a.cpu(), None, tau, 4, Layout())
