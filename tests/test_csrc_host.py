"""The CUDA backend's per-tile arithmetic (csrc/block_math.cuh) run on the CPU against float64 formulas.

csrc/block_host.cpp drives the same ``__host__ __device__`` functions the kernels call (online
log-sum-exp over key tiles split between a row's threads, positives, exclusions, the gradient tile and its
16-bit rounding, the normalization backward) with plain loops for the GEMMs. It is compiled here with g++
(cached under build/csrc_host/, keyed by the sources' hash) and called through ctypes; without g++ the
tests skip.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loss_cases import relative_error
from test_block import CASES, Case, _dense_positives, _inputs, _layout, _self_entries, reference

from fastcl import cuda_backend
from fastcl._blocks import Layout, accumulation_dtype, inverse_norms

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = (CSRC / "block_math.cuh", CSRC / "block_kernels.cu", CSRC / "block_launch.h")  # what the builds include
# How the second GEMM's operands are rounded: exact (fp32/fp64 rows), bfloat16, float16.
OPERAND = {torch.float64: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The emulated kernels' entry points per rows dtype (float32 without TF32: the exact FMA path).
EMULATED_PATHS = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16",
                  torch.float16: "float16"}

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
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-2),
             torch.float16: (1e-5, 5e-3)}


def _compiled(source: Path, *flags: str) -> Path:
    """``source`` built as a shared library with g++, cached under build/csrc_host/ by the sources' hash."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the csrc host code")
    inputs = (source, *SOURCES)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs) + " ".join(flags).encode()).hexdigest()[:16]
    target = ROOT / "build" / "csrc_host" / f"{source.stem}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            partial = Path(scratch) / target.name
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", *flags, str(source),
                            "-o", str(partial)], check=True)
            os.replace(partial, target)  # atomic: concurrent test processes never load a partial file
    return target


@functools.lru_cache(maxsize=None)
def host_library() -> ctypes.CDLL:
    """csrc/block_host.cpp: the kernels' tile arithmetic with loops for the GEMMs."""
    return ctypes.CDLL(str(_compiled(CSRC / "block_host.cpp", "-std=c++17")))


@functools.lru_cache(maxsize=None)
def emulated_library() -> ctypes.CDLL:
    """csrc/kernel_emulation.cpp: block_kernels.cu's kernels (every math path) run as threads on the CPU."""
    library = ctypes.CDLL(str(_compiled(CSRC / "kernel_emulation.cpp", "-std=c++20", "-pthread",
                                        "-Wno-unknown-pragmas")))
    for suffix in (*EMULATED_PATHS.values(), "float32_tf32"):
        for pass_ in ("forward", "backward"):  # the launchers' error string, None on success
            getattr(library, f"fastcl_block_{pass_}_{suffix}").restype = ctypes.c_char_p
    return library


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def host_primitive(a, a_inv, k, k_inv, tau: float, sub_dim: int, layout: Layout, *, operand=0, tile=64,
                   threads_per_row=2, backward=None, library=host_library, suffix=None):
    """csrc/block_host.cpp's forward, or its backward when ``backward`` = (lse, alpha, beta); with
    ``library=emulated_library`` and an EMULATED_PATHS ``suffix`` the same through the emulated kernels.

    ``a``, ``k``: any strides; for the host build in the accumulation dtype (16-bit runs: already rounded).
    Returns (lse, pos_sum, pos_weight) or (d_a, d_k, gs) as the contract (gs: [2] for the sigmoid epilogue).
    """
    acc = accumulation_dtype(a.dtype)
    lib = library()
    suffix = suffix or ("float64" if acc == torch.float64 else "float32")
    sizes = torch.tensor([a.shape[0], a.stride(0), a.stride(1), k.shape[0], k.stride(0), k.stride(1), sub_dim])
    # The CUDA ops' own layout arguments, so the enum codes the package passes are the ones tested here.
    has_self, offset, positives, exclude, epilogue, bias, pos_index, a_labels, k_labels, mask = (
        cuda_backend.layout_arguments(layout, a))
    ints = torch.tensor([has_self, offset, positives, exclude, epilogue, *(mask.shape if mask is not None else (1, 1))])
    scalars = torch.tensor([tau, 0.0 if bias is None else float(bias)], dtype=acc)
    tensors = (a, a_inv, k, k_inv, sizes, ints, scalars, pos_index, a_labels, k_labels, mask)  # alive during the call
    common = [_ptr(x) for x in tensors]
    if backward is None:
        out = [torch.empty(a.shape[0], dtype=acc) for _ in range(3)]
        error = getattr(lib, f"fastcl_block_forward_{suffix}")(*common, tile, threads_per_row, *map(_ptr, out))
        assert not isinstance(error, bytes), error
        return tuple(out)
    lse, alpha, beta = (x.to(acc).contiguous() for x in backward)
    d_a, d_k = torch.empty(a.shape[0], sub_dim, dtype=acc), torch.empty(k.shape[0], sub_dim, dtype=acc)
    sums = torch.empty(a.shape[0], 2, dtype=acc)
    error = getattr(lib, f"fastcl_block_backward_{suffix}")(*common, *map(_ptr, (lse, alpha, beta)), operand,
                                                              *map(_ptr, (d_a, d_k, sums)))
    assert not isinstance(error, bytes), error
    gs = sums.sum(0)
    return d_a, d_k, (gs if layout.epilogue == "sigmoid" else gs[0])


def run_host(case: Case, a, k, fields, alpha, beta, dtype, *, lse_shift=None, rows_dtype=None, **options):
    """tests/test_block.py's run_primitive for the host build: rows of ``dtype`` emulated in the
    accumulation dtype (or passed as ``rows_dtype``)."""
    acc = accumulation_dtype(dtype)
    a, k = a.to(rows_dtype or acc), k.to(rows_dtype or acc)
    d = case.sub_dim or case.dim
    a_inv, k_inv = (inverse_norms(a, d), inverse_norms(k, d)) if case.normalize else (None, None)
    layout = _layout(case, fields, dtype, acc)
    stats = host_primitive(a, a_inv, k, k_inv, case.tau, d, layout, **options)
    lse = stats[0] if lse_shift is None else stats[0] + lse_shift
    grads = host_primitive(a, a_inv, k, k_inv, case.tau, d, layout, operand=OPERAND[dtype],
                           backward=(lse, alpha, beta), **options)
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


@pytest.mark.parametrize("case", CASES + TILED, ids=[c.name for c in CASES + TILED])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_host_matches_float64(case, dtype):
    check_against_reference(case, dtype, run_host)


@pytest.mark.parametrize("tile,threads_per_row", [(16, 1), (16, 4), (64, 2), (32, 4)])
def test_statistics_do_not_depend_on_tiling(tile, threads_per_row):
    """The online log-sum-exp merge (per thread over key tiles, then the shuffle tree) gives the dense
    result whatever the tile width and the number of threads sharing a row."""
    run = functools.partial(run_host, tile=tile, threads_per_row=threads_per_row)
    check_against_reference(TILED[1], torch.float64, run)
    check_against_reference(TILED[4], torch.float64, run)


def test_backward_takes_the_global_statistic():
    """G uses the lse passed in (merged over every block), not this block's: exp(s − (lse + δ))·α equals
    exp(s − lse)·(α·e^−δ), so shifting lse by δ must equal scaling α by e^−δ."""
    case = TILED[0]
    a, k, fields, alpha, beta = _inputs(case, seed=2)
    shift = torch.rand(case.a_rows, dtype=torch.float64) * 3
    _, shifted = run_host(case, a, k, fields, alpha, beta, torch.float64, lse_shift=shift)
    _, scaled = run_host(case, a, k, fields, alpha * torch.exp(-shift), beta, torch.float64)
    for got, want in zip(shifted, scaled):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_clamped_norm_rows_get_the_scaled_gradient_only():
    """A zero row (norm clamped to 1e-12): dz = r·dẑ, as torch.nn.functional.normalize's backward."""
    case = CASES[2]
    a, k, fields, alpha, beta = _inputs(case, seed=4)
    a[3] = 0.0
    stats, grads = run_host(case, a, k, fields, alpha, beta, torch.float64)
    ref_stats, ref_grads = reference(case, a, k, fields, alpha, beta)
    for got, want in zip((*stats, *grads), (*ref_stats, *ref_grads)):
        assert relative_error(got, want, floor=1.0) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [TILED[0], TILED[1]], ids=["labels", "ntxent-tau001"])
def test_16bit_gradients_no_worse_than_naive(case, dtype):
    """The emulated 16-bit backward against float64 stays within naive PyTorch's error in the same dtype
    (the dense formula in 16-bit, autograd for the gradients) plus 1e-2."""
    a, k, fields, alpha, beta = _inputs(case, seed=6)
    a, k = a.to(dtype), k.to(dtype)
    _, grads = run_host(case, a.double(), k.double(), fields, alpha, beta, dtype)
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


def run_emulated(case: Case, a, k, fields, alpha, beta, dtype, *, tf32=False, **options):
    """run_primitive for block_kernels.cu run on the CPU (csrc/kernel_emulation.cpp), rows in ``dtype``."""
    suffix = EMULATED_PATHS[dtype] + ("_tf32" if tf32 else "")
    return run_host(case, a, k, fields, alpha, beta, dtype, rows_dtype=dtype, library=emulated_library,
                    suffix=suffix, **options)


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
    check_against_reference(TILED[1], torch.float32, functools.partial(run_emulated, tf32=True),
                            tolerance=(5e-3, 1e-2))


def test_emulated_cuda_kernels_are_deterministic():
    """Two runs of the emulated kernels (their threads truly concurrent) give the same bits."""
    case = TILED[4]
    a, k, fields, alpha, beta = _inputs(case, seed=9)
    runs = [run_emulated(case, a, k, fields, alpha, beta, torch.bfloat16) for _ in range(2)]
    for x, y in zip((*runs[0][0], *runs[0][1]), (*runs[1][0], *runs[1][1])):
        assert torch.equal(x, y)
