"""fp32 dot precision of the Triton kernels under every PyTorch precision setting, and what tf32x3 buys.

``kernels._common.dot_precision`` reads PyTorch's fp32 matmul setting (the ``fp32_precision`` API,
falling back to the legacy ``allow_tf32``): tensor cores by default (``tf32x3``), ``tf32`` / ``ieee`` when
the user asked for them. The accuracy test emulates Triton's tf32x3 decomposition on the CPU
(tests/tensor_cores.py) and compares its error vs float64 with naive fp32 PyTorch and with plain TF32;
tests/test_tf32x3.py runs whole losses through it.
"""

from __future__ import annotations

import pytest
import torch
from loss_cases import relative_error
from tensor_cores import tf32_matmul, tf32x3_matmul

import fastcl

pytestmark = pytest.mark.triton
_common = pytest.importorskip("fastcl.kernels._common")

MATMUL = torch.backends.cuda.matmul


@pytest.fixture(autouse=True)
def restore_precision():
    """Every test starts from PyTorch's defaults ("none": never set) and leaves them so."""
    MATMUL.fp32_precision = "none"
    torch.backends.fp32_precision = "none"
    yield
    MATMUL.fp32_precision = "none"
    torch.backends.fp32_precision = "none"


def _set_matmul(value):
    MATMUL.fp32_precision = value


def _set_global(value):
    torch.backends.fp32_precision = value


def _set_legacy(value):
    MATMUL.allow_tf32 = value


SETTINGS = [
    ("default", lambda: None, "tf32x3"),
    ("matmul tf32", lambda: _set_matmul("tf32"), "tf32"),
    ("matmul ieee", lambda: _set_matmul("ieee"), "ieee"),
    ("global tf32", lambda: _set_global("tf32"), "tf32"),
    ("global ieee", lambda: _set_global("ieee"), "ieee"),
    ("matmul overrides global", lambda: (_set_global("ieee"), _set_matmul("tf32")), "tf32"),
    ("float32_matmul_precision high", lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    ("float32_matmul_precision medium", lambda: torch.set_float32_matmul_precision("medium"), "tf32"),
    ("float32_matmul_precision highest", lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
    ("legacy allow_tf32 True", lambda: _set_legacy(True), "tf32"),
    ("legacy allow_tf32 False", lambda: _set_legacy(False), "ieee"),
    # The crash of issue 12: legacy flag, then the new API (reading allow_tf32 now raises in torch).
    ("legacy then new API", lambda: (_set_legacy(False), _set_matmul("tf32")), "tf32"),
]


@pytest.mark.parametrize("name,apply,expected", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_fp32_dot_precision_follows_pytorch(name, apply, expected):
    apply()
    assert _common.dot_precision(torch.float32) == expected
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert _common.dot_precision(dtype) == "ieee"


def test_new_api_tf32_runs_the_triton_backend(triton_device):
    """fp32 rows through the Triton backend after TF32 was enabled with the new API (used to raise)."""
    MATMUL.fp32_precision = "tf32"
    z1, z2 = (torch.randn(13, 17, device=triton_device, generator=None) for _ in range(2))
    loss = fastcl.functional.nt_xent(z1, z2, backend="triton")
    expected = fastcl.functional.nt_xent(z1.cpu(), z2.cpu(), backend="torch")
    assert relative_error(loss.cpu(), expected) <= 1e-5


@pytest.mark.parametrize("depth", [17, 128, 2048])
def test_tf32x3_error_matches_naive_fp32(depth):
    """Error vs float64 of similarity tiles (unit rows, /τ with τ = 0.01): tf32x3 within 4× naive fp32
    (ieee), plain TF32 two orders of magnitude worse — why tf32x3, not tf32, is the fp32 default."""
    generator = torch.Generator().manual_seed(depth)
    a = torch.nn.functional.normalize(torch.randn(96, depth, generator=generator), dim=1)
    b = torch.nn.functional.normalize(torch.randn(80, depth, generator=generator), dim=1)
    truth = (a.double() @ b.double().T) / 0.01
    naive = ((a @ b.T) / 0.01 - truth).abs().max().item()
    tf32x3 = (tf32x3_matmul(a, b.T) / 0.01 - truth).abs().max().item()
    tf32 = (tf32_matmul(a, b.T) / 0.01 - truth).abs().max().item()
    assert tf32x3 <= 4 * naive
    assert tf32 >= 100 * naive
