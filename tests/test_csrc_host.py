"""The CUDA backend's kernels (csrc/block_kernels.cu) run on the CPU against the float64 definition.

csrc/kernel_emulation.cpp compiles block_kernels.cu with g++ — no CUDA toolkit needed — emulating the
CUDA execution model (each launch as 128 concurrent threads per CTA with real barriers and warp
shuffles) and the WMMA API (from its documented semantics), so every math path runs: the exact FMA
paths (float32, float64) and the tensor-core paths (bfloat16, float16, TF32), with their tiles, masked
strided loads, grids, both backward passes and the normalization kernel. It is built here (cached under
build/csrc_host/, keyed by the sources' hash) and called through ctypes; without g++ the tests skip.
The cases are tests/test_block.py's plus blocks larger than the kernels' tiles.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loss_cases import relative_error
from test_block import CASES, Case, _dense_positives, _inputs, _layout, _self_entries, reference

from fastcl import cuda_backend
from fastcl.contract import Layout, accumulation_dtype, inverse_norms

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = (CSRC / "kernel_emulation.cpp", CSRC / "block_kernels.cu", CSRC / "block_math.cuh", CSRC / "block_launch.h")
# The emulated kernels' entry points per rows dtype (float32 without TF32: the exact FMA path).
ENTRY_POINTS = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}

# Blocks larger than the kernels' tiles (64 rows; 32/64-feature slices), next to tests/test_block.py's cases.
TILED = [
    Case("tiles-labels-self", 150, 203, 130, sub_dim=100, tau=0.05, positives="labels", self_offset=0),
    Case("tiles-ntxent-tau001", 130, 130, 64, positives="index", self_offset=0, tau=0.01),
    Case("tiles-mask-strided", 96, 160, 70, positives="mask", strided=True, tau=0.1),
    Case("tiles-dcl", 128, 128, 96, positives="index", self_offset=0, exclude_positives=True, tau=0.1),
    Case("tiles-sigmoid", 70, 129, 33, positives="index", epilogue="sigmoid", bias=-5.0, tau=0.1),
    Case("tiles-wide-d", 65, 66, 300, sub_dim=257, tau=0.2, positives="labels"),
]
# Largest relative error per dtype: (statistics, gradients). 16-bit rows multiply exactly into fp32; the
# gradients' second GEMM rounds G and the scaled rows to the 16-bit dtype (as naive 16-bit PyTorch does).
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-2),
    torch.float16: (1e-5, 5e-3),
}


@functools.lru_cache(maxsize=None)
def emulated_kernels() -> ctypes.CDLL:
    """csrc/kernel_emulation.cpp built with g++ (cached by the sources' hash) and loaded."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build csrc/kernel_emulation.cpp")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    target = ROOT / "build" / "csrc_host" / f"kernel_emulation-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            partial = Path(scratch) / target.name
            subprocess.run(
                [
                    compiler,
                    "-std=c++20",
                    "-O2",
                    "-shared",
                    "-fPIC",
                    "-pthread",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    "-Wno-unknown-pragmas",
                    str(SOURCES[0]),
                    "-o",
                    str(partial),
                ],
                check=True,
            )
            os.replace(partial, target)  # atomic: concurrent test processes never load a partial file
    library = ctypes.CDLL(str(target))
    for suffix in (*ENTRY_POINTS.values(), "float32_tf32", "float32_tf32x3"):
        for pass_ in ("forward", "backward"):  # the launchers' error string, None on success
            getattr(library, f"fastcl_block_{pass_}_{suffix}").restype = ctypes.c_char_p
    return library


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def kernel_primitive(a, a_inv, k, k_inv, tau: float, sub_dim: int, layout: Layout, entry_point: str, *, backward=None):
    """The emulated kernels' forward, or their backward when ``backward`` = (lse, alpha, beta).

    ``a``, ``k``: the rows in the dtype ``entry_point`` takes, any strides. Returns (lse, pos_sum,
    pos_weight) or (d_a, d_k, gs) as the contract (gs: [2] for the sigmoid epilogue).
    """
    acc = accumulation_dtype(a.dtype)
    library = emulated_kernels()
    sizes = torch.tensor([a.shape[0], a.stride(0), a.stride(1), k.shape[0], k.stride(0), k.stride(1), sub_dim])
    # The CUDA ops' own layout arguments, so the enum codes the package passes are the ones tested here.
    has_self, offset, positives, exclude, epilogue, bias, pos_index, a_labels, k_labels, mask = (
        cuda_backend.layout_arguments(layout, a)
    )
    ints = torch.tensor([has_self, offset, positives, exclude, epilogue, *(mask.shape if mask is not None else (1, 1))])
    scalars = torch.tensor([tau, 0.0 if bias is None else float(bias)], dtype=acc)
    tensors = (a, a_inv, k, k_inv, sizes, ints, scalars, pos_index, a_labels, k_labels, mask)  # alive during the call
    common = [_ptr(x) for x in tensors]
    if backward is None:
        out = [torch.empty(a.shape[0], dtype=acc) for _ in range(3)]
        error = getattr(library, f"fastcl_block_forward_{entry_point}")(*common, *map(_ptr, out))
        assert error is None, error
        return tuple(out)
    lse, alpha, beta = (x.to(acc).contiguous() for x in backward)
    d_a, d_k = torch.empty(a.shape[0], sub_dim, dtype=acc), torch.empty(k.shape[0], sub_dim, dtype=acc)
    sums = torch.empty(a.shape[0], 2, dtype=acc)
    error = getattr(library, f"fastcl_block_backward_{entry_point}")(
        *common, *map(_ptr, (lse, alpha, beta, d_a, d_k, sums))
    )
    assert error is None, error
    gs = sums.sum(0)
    return d_a, d_k, (gs if layout.epilogue == "sigmoid" else gs[0])


def run_emulated(case: Case, a, k, fields, alpha, beta, dtype, *, fp32_path="", lse_shift=None):
    """tests/test_block.py's run_primitive for the emulated kernels: rows in ``dtype``; float32 through
    the FMA path, or the tensor-core path ``fp32_path`` ("tf32", "tf32x3"); the backward gets the
    forward's lse (+ ``lse_shift``)."""
    acc = accumulation_dtype(dtype)
    a, k = a.to(dtype), k.to(dtype)
    d = case.sub_dim or case.dim
    a_inv, k_inv = (inverse_norms(a, d), inverse_norms(k, d)) if case.normalize else (None, None)
    layout = _layout(case, fields, dtype, acc)
    entry_point = ENTRY_POINTS[dtype] + (f"_{fp32_path}" if fp32_path else "")
    stats = kernel_primitive(a, a_inv, k, k_inv, case.tau, d, layout, entry_point)
    lse = stats[0] if lse_shift is None else stats[0] + lse_shift
    grads = kernel_primitive(a, a_inv, k, k_inv, case.tau, d, layout, entry_point, backward=(lse, alpha, beta))
    return stats, grads


def check_against_reference(case: Case, dtype, run, tolerance=None, seed=0):
    """Runs ``run(case, a, k, fields, alpha, beta, dtype) -> (stats, grads)`` (tests/test_block.py's
    run_primitive signature) on the case's inputs and checks every output against the float64 reference."""
    a, k, fields, alpha, beta = _inputs(case, seed=seed)
    if dtype != torch.float64:  # the reference sees what the kernels receive
        a, k = a.to(dtype).double(), k.to(dtype).double()
    stats, grads = run(case, a, k, fields, alpha, beta, dtype)
    ref_stats, ref_grads = reference(case, a, k, fields, alpha, beta)
    stat_tol, grad_tol = tolerance or TOLERANCE[dtype]
    names = ("stat", "pos_sum", "pos_weight", "d_a", "d_k", "gs")
    for name, got, want in zip(names, (*stats, *grads), (*ref_stats, *ref_grads)):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        tol = stat_tol if name in names[:3] else grad_tol
        error = relative_error(got.cpu(), want, floor=1.0 if name == "stat" else 0.0)
        assert error <= tol, (name, error, tol)


def test_backward_takes_the_global_statistic():
    """G uses the lse passed in (merged over every block), not this block's: exp(s − (lse + δ))·α equals
    exp(s − lse)·(α·e^−δ), so shifting lse by δ must equal scaling α by e^−δ."""
    case = TILED[2]  # softmax epilogue (the sigmoid's G has no lse), several tiles
    a, k, fields, alpha, beta = _inputs(case, seed=2)
    shift = torch.rand(case.a_rows, dtype=torch.float64) * 3
    _, shifted = run_emulated(case, a, k, fields, alpha, beta, torch.float32, lse_shift=shift)
    _, scaled = run_emulated(case, a, k, fields, alpha * torch.exp(-shift), beta, torch.float32)
    for got, want in zip(shifted, scaled):  # α·e^−δ and e^−(lse+δ) round differently in fp32: a few ulps
        assert relative_error(got, want) <= 1e-5


def test_clamped_norm_rows_get_the_scaled_gradient_only():
    """A zero row (norm clamped to 1e-12): dz = r·dẑ, as torch.nn.functional.normalize's backward."""
    case = CASES[2]
    a, k, fields, alpha, beta = _inputs(case, seed=4)
    a[3] = 0.0
    stats, grads = run_emulated(case, a, k, fields, alpha, beta, torch.float64)
    ref_stats, ref_grads = reference(case, a, k, fields, alpha, beta)
    for got, want in zip((*stats, *grads), (*ref_stats, *ref_grads)):
        assert relative_error(got, want, floor=1.0) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gradients_no_worse_than_naive(dtype):
    """The tensor-core backward against float64 stays within naive PyTorch's error in the same dtype
    (the dense formula in 16-bit, autograd for the gradients) plus 1e-2."""
    case = TILED[1]
    a, k, fields, alpha, beta = _inputs(case, seed=6)
    a, k = a.to(dtype), k.to(dtype)
    _, grads = run_emulated(case, a, k, fields, alpha, beta, dtype)
    ref_stats, ref_grads = reference(case, a.double(), k.double(), fields, alpha, beta)

    d = case.sub_dim or case.dim
    a_n, k_n = a.clone().requires_grad_(), k.clone().requires_grad_()
    s = F.normalize(a_n[:, :d], dim=1) @ F.normalize(k_n[:, :d], dim=1).T / case.tau
    selfish = _self_entries(case)
    p = _dense_positives(case, fields).masked_fill(selfish, 0.0).to(dtype)
    excluded = selfish | ((p != 0) if case.exclude_positives else torch.zeros_like(selfish))
    stat = torch.logsumexp(s.masked_fill(excluded, float("-inf")), dim=1)
    surrogate = (alpha.to(dtype) * stat).sum() - (beta.to(dtype) * (p * s).sum(dim=1)).sum()
    naive = torch.autograd.grad(surrogate, (a_n, k_n))
    for ours, theirs, want in zip(grads[:2], naive, ref_grads[:2]):
        assert relative_error(ours, want) <= relative_error(theirs[:, :d], want) + 1e-2


# float32 (the exact FMA path) on every case; each other path on the tiled cases that exercise it most
# (multi-tile self blocks, DCL, the sigmoid epilogue, float16's prescale at τ = 0.01): an emulated WMMA
# block costs seconds on two cores. Every path passes on every tiled case too (run by hand when the
# kernels change: widen OTHER_PATHS).
OTHER_PATHS = {torch.float64: (0, 3), torch.bfloat16: (0, 4), torch.float16: (1,)}


def _emulated_params():
    params = [pytest.param(case, torch.float32, id=f"float32-{case.name}") for case in CASES + TILED]
    for dtype, cases in OTHER_PATHS.items():
        params += [pytest.param(TILED[i], dtype, id=f"{str(dtype)[6:]}-{TILED[i].name}") for i in cases]
    return params


@pytest.mark.parametrize("case, dtype", _emulated_params())
def test_emulated_cuda_kernels_match_float64(case, dtype):
    """block_kernels.cu itself — tiles, masks, grids, barriers, shuffles, WMMA fragment addressing, both
    backward passes and the normalization kernel — run on the CPU (csrc/kernel_emulation.cpp)."""
    check_against_reference(case, dtype, run_emulated)


def test_emulated_tf32_path():
    """float32 rows through the TF32 WMMA path (operands rounded to 10 mantissa bits)."""
    run = functools.partial(run_emulated, fp32_path="tf32")
    check_against_reference(TILED[1], torch.float32, run, tolerance=(5e-3, 1e-2))


@pytest.mark.parametrize("case", TILED, ids=lambda case: case.name)
def test_emulated_tf32x3_path_has_float32_accuracy(case):
    """float32 rows through the default 3xTF32 WMMA path (each operand split into TF32 high and low parts,
    three products): the fp32 tolerance of the exact FMA path (one TF32 product is held to 5e-3 above)."""
    check_against_reference(case, torch.float32, functools.partial(run_emulated, fp32_path="tf32x3"))


def test_emulated_cuda_kernels_are_deterministic():
    """Two runs of the emulated kernels (their threads truly concurrent) give the same bits."""
    case = TILED[4]
    a, k, fields, alpha, beta = _inputs(case, seed=9)
    runs = [run_emulated(case, a, k, fields, alpha, beta, torch.bfloat16) for _ in range(2)]
    for x, y in zip((*runs[0][0], *runs[0][1]), (*runs[1][0], *runs[1][1])):
        assert torch.equal(x, y)


def guarded(x: torch.Tensor, side: str) -> torch.Tensor:
    """A contiguous copy of ``x`` placed right before (``side="after"``) or right after (``"before"``) an
    unreadable page, so the kernels fault on any read past its end or before its start."""
    page = mmap.PAGESIZE
    nbytes = x.numel() * x.element_size()
    size = -(-nbytes // page) * page
    buffer = mmap.mmap(-1, size + 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    for guard in (base, base + page + size):  # PROT_NONE pages on both sides of the data pages
        assert libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(page), 0) == 0, ctypes.get_errno()
    offset = page + (size - nbytes if side == "after" else 0)
    out = torch.frombuffer(buffer, dtype=x.dtype, count=x.numel(), offset=offset).view(x.shape)
    return out.copy_(x)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages through libc mprotect")
@pytest.mark.parametrize("side", ["after", "before"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_kernels_read_nothing_outside_their_inputs(dtype, side):
    """Every input (rows, inverse norms, labels, lse, coefficients) next to an unreadable page: partial
    tiles (130 rows = 2·64 + 2), full-width rows (sub_dim = D) and the last slice read nothing outside.
    An out-of-bounds read ends the test process with SIGSEGV (a loud failure, as compute-sanitizer's)."""
    case = TILED[1]
    a, k, fields, alpha, beta = _inputs(case, seed=1)
    acc = accumulation_dtype(dtype)
    a, k = guarded(a.to(dtype), side), guarded(k.to(dtype), side)
    d = case.sub_dim or case.dim
    a_inv, k_inv = guarded(inverse_norms(a, d), side), guarded(inverse_norms(k, d), side)
    layout = _layout(case, {name: guarded(t, side) for name, t in fields.items()}, dtype, acc)
    stats = kernel_primitive(a, a_inv, k, k_inv, case.tau, d, layout, ENTRY_POINTS[dtype])
    coefficients = tuple(guarded(x.to(acc), side) for x in (stats[0], alpha, beta))
    grads = kernel_primitive(a, a_inv, k, k_inv, case.tau, d, layout, ENTRY_POINTS[dtype], backward=coefficients)
    ref_stats, ref_grads = reference(case, a.double(), k.double(), fields, alpha, beta)
    for got, want, tol in zip((*stats, *grads), (*ref_stats, *ref_grads), (1e-5,) * 3 + (TOLERANCE[dtype][1],) * 3):
        assert relative_error(got, want, floor=1.0) <= tol
