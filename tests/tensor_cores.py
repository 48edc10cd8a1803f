"""The fp32 tensor-core products the kernels request, emulated on the CPU (tests/test_tf32x3.py,
tests/test_triton_precision.py).

Triton's ``input_precision="tf32x3"`` and the CUDA backend's 3xTF32 path split each fp32 operand as
x = hi + lo with hi = tf32(x) and lo = tf32(x − hi), and sum three tensor-core products hi·hi + hi·lo +
lo·hi in the fp32 accumulator (lo·lo, below fp32's last bit, is dropped). A product of two TF32 values
(11 significant bits each) is exact in fp32, so fp32 CPU matmuls of the parts reproduce the tensor-core
products; only the order of the fp32 accumulation may differ.
"""

from __future__ import annotations

import contextlib

import torch


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (10 mantissa bits), to nearest with ties away from zero (``cvt.rna.tf32.f32``)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32x3_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as three TF32 products with fp32 accumulation (small terms first, as Triton adds them)."""
    a_hi, b_hi = round_to_tf32(a), round_to_tf32(b)
    a_lo, b_lo = round_to_tf32(a - a_hi), round_to_tf32(b - b_hi)
    return a_hi @ b_lo + a_lo @ b_hi + a_hi @ b_hi


def tf32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as one TF32 product (what ``input_precision="tf32"`` runs)."""
    return round_to_tf32(a) @ round_to_tf32(b)


@contextlib.contextmanager
def fp32_matmuls_as(product):
    """Every ``x @ y`` of two float32 tensors runs as ``product`` (e.g. :func:`tf32x3_matmul`) inside; yields
    a list that counts the calls. The torch backend's GEMMs are all ``@``, so its losses then compute
    their similarity tiles and gradient GEMMs as the tensor cores would."""
    original = torch.Tensor.__matmul__
    calls = []

    def matmul(a, b):
        if isinstance(b, torch.Tensor) and a.dtype == b.dtype == torch.float32:
            calls.append((tuple(a.shape), tuple(b.shape)))
            with _original_matmul(original):
                return product(a, b)
        return original(a, b)

    torch.Tensor.__matmul__ = matmul
    try:
        yield calls
    finally:
        torch.Tensor.__matmul__ = original


@contextlib.contextmanager
def _original_matmul(original):
    """The emulation's own fp32 products use the real matmul."""
    patched = torch.Tensor.__matmul__
    torch.Tensor.__matmul__ = original
    try:
        yield
    finally:
        torch.Tensor.__matmul__ = patched
