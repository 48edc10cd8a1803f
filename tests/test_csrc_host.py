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

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SOURCES = (CSRC / "block_host.cpp", CSRC / "block_math.cuh")
POSITIVES = {"none": 0, "index": 1, "labels": 2, "mask": 3}
EPILOGUES = {"softmax": 0, "sigmoid": 1}
# How the second GEMM's operands are rounded: exact (fp32/fp64 rows), bfloat16, float16.
OPERAND = {torch.float64: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.lru_cache(maxsize=None)
def host_library() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build csrc/block_host.cpp")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    target = ROOT / "build" / "csrc_host" / f"block_host-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            partial = Path(scratch) / target.name
            subprocess.run(
                [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
                 str(SOURCES[0]), "-o", str(partial)],
                check=True,
            )
            os.replace(partial, target)  # atomic: concurrent test processes never load a partial file
    return ctypes.CDLL(str(target))


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _layout_args(layout: dict, acc, a_count: int, k_count: int):
    mask = layout.get("mask")
    ints = torch.tensor(
        [
            layout.get("self_offset") is not None,
            layout.get("self_offset") or 0,
            POSITIVES[layout["positives"]],
            layout.get("exclude_positives", False),
            EPILOGUES[layout.get("epilogue", "softmax")],
            mask.shape[0] if mask is not None else 1,
            mask.shape[1] if mask is not None else 1,
        ],
        dtype=torch.int64,
    )
    pointers = [
        layout.get("pos_index"),
        layout.get("a_labels"),
        layout.get("k_labels"),
        mask.to(acc).contiguous() if mask is not None else None,
    ]
    return ints, pointers


def host_block(a, a_inv, k, k_inv, tau, sub_dim, layout, *, tile=16, threads_per_row=2, backward=None):
    """Runs csrc/block_host.cpp; `a`, `k` hold values in the accumulation dtype (possibly 16-bit-rounded)."""
    acc = a.dtype
    lib = host_library()
    suffix = "float64" if acc == torch.float64 else "float32"
    rows = torch.tensor([a.shape[0], a.stride(0), a.stride(1), k.shape[0], k.stride(0), k.stride(1), sub_dim])
    ints, pointers = _layout_args(layout, acc, a.shape[0], k.shape[0])
    scalars = torch.tensor([tau, layout.get("bias", 0.0)], dtype=acc)
    common = [_ptr(a), _ptr(a_inv), _ptr(k), _ptr(k_inv), _ptr(rows), _ptr(ints), _ptr(scalars)] + [_ptr(p) for p in pointers]
    if backward is None:
        out = [torch.empty(a.shape[0], dtype=acc) for _ in range(3)]
        getattr(lib, f"fastcl_block_forward_{suffix}")(*common, tile, threads_per_row, *[_ptr(o) for o in out])
        return tuple(out)
    lse, alpha, beta, operand = backward
    lse, alpha, beta = (x.to(acc).contiguous() for x in (lse, alpha, beta))  # kept alive across the call
    d_a = torch.empty(a.shape[0], sub_dim, dtype=acc)
    d_k = torch.empty(k.shape[0], sub_dim, dtype=acc)
    sums = torch.empty(a.shape[0], 2, dtype=acc)
    getattr(lib, f"fastcl_block_backward_{suffix}")(
        *common, _ptr(lse), _ptr(alpha), _ptr(beta), operand, _ptr(d_a), _ptr(d_k), _ptr(sums)
    )
    return d_a, d_k, sums


# --- float64 formulas ---------------------------------------------------------------------------------------

def reference_weights(layout: dict, n_a: int, n_k: int):
    """(P [A, K] float64, excluded [A, K] bool) from the layout, written from the contract."""
    a_idx, c_idx = torch.arange(n_a)[:, None], torch.arange(n_k)[None, :]
    kind = layout["positives"]
    if kind == "index":
        weights = (layout["pos_index"][:, None] == c_idx).double()
    elif kind == "labels":
        weights = (layout["a_labels"][:, None] == layout["k_labels"][None, :]).double()
    elif kind == "mask":
        mask = layout["mask"].double()
        weights = mask[a_idx % mask.shape[0], c_idx % mask.shape[1]]
    else:
        weights = torch.zeros(n_a, n_k, dtype=torch.float64)
    is_self = torch.zeros(n_a, n_k, dtype=torch.bool)
    if layout.get("self_offset") is not None:
        is_self = c_idx == a_idx + layout["self_offset"]
    weights = weights.masked_fill(is_self, 0.0)
    excluded = is_self | (layout.get("exclude_positives", False) & (weights != 0))
    return weights, excluded


def _normalized(x, sub_dim, normalize):
    x = x[:, :sub_dim]
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else x


def reference_logits(a, k, tau, sub_dim, normalize):
    return _normalized(a, sub_dim, normalize) @ _normalized(k, sub_dim, normalize).T / tau


def reference_forward(a, k, tau, sub_dim, normalize, layout):
    s = reference_logits(a.double(), k.double(), tau, sub_dim, normalize)
    weights, excluded = reference_weights(layout, *s.shape)
    if layout.get("epilogue", "softmax") == "sigmoid":
        stat = torch.nn.functional.softplus(s + layout.get("bias", 0.0)).masked_fill(excluded, 0.0).sum(1)
    else:
        stat = torch.logsumexp(s.masked_fill(excluded, float("-inf")), dim=1)
    return stat, (weights * s).sum(1), weights.sum(1)


def reference_backward(a, k, tau, sub_dim, normalize, layout, lse, alpha, beta):
    """(d_a, d_k, Σ G·s, Σ G) with G from the contract, gradients by autograd through the normalization."""
    a64 = a.double().detach().requires_grad_()
    k64 = k.double().detach().requires_grad_()
    s = reference_logits(a64, k64, tau, sub_dim, normalize)
    weights, excluded = reference_weights(layout, *s.shape)
    with torch.no_grad():
        if layout.get("epilogue", "softmax") == "sigmoid":
            first = torch.sigmoid(s + layout.get("bias", 0.0))
        else:
            first = torch.exp(s - lse.double()[:, None])
        g = alpha.double()[:, None] * first.masked_fill(excluded, 0.0) - beta.double()[:, None] * weights
    d_a, d_k = torch.autograd.grad((g * s).sum(), (a64, k64))
    return d_a[:, :sub_dim], d_k[:, :sub_dim], (g * s).sum().detach(), g.sum()


def assert_close_to_scale(ours, ref, tol):
    """max |ours − ref| ≤ tol · max |ref| (gradient entries far below the largest carry its absolute error)."""
    scale = ref.abs().max().clamp_min(1e-30)
    error = (ours.double() - ref).abs().max() / scale
    assert error <= tol, f"error {error:.3g} of the largest entry (allowed {tol:g})"


# --- cases --------------------------------------------------------------------------------------------------

def make_layout(kind: str, n_a: int, n_k: int, generator, self_offset=None, **extra) -> dict:
    layout = {"positives": kind, "self_offset": self_offset, **extra}
    if kind == "index":
        index = torch.randint(0, n_k, (n_a,), generator=generator)
        index[::5] = -1  # anchors without a positive in this block
        layout["pos_index"] = index
    elif kind == "labels":
        layout["a_labels"] = torch.randint(0, 4, (n_a,), generator=generator)
        layout["k_labels"] = torch.randint(0, 4, (n_k,), generator=generator)
    elif kind == "mask":
        # A soft [Na, Nk] sample mask read modulo (view-major rows); Na, Nk divide A, K below.
        layout["mask"] = torch.rand(n_a // 2, n_k // 2, generator=generator).round(decimals=1)
    return layout


def rows(n, d, dtype, generator, transposed=False):
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x = x.to(dtype).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return x.T.contiguous().T if transposed else x  # transposed: stride (1, n), read through strides


def inverse_norms(x, sub_dim):
    return 1.0 / x[:, :sub_dim].double().norm(dim=1).clamp_min(1e-12).to(x.dtype)


CASES = [
    # (A, K, D, sub_dim, tau, positives, self_offset, extra)
    (37, 53, 17, 13, 0.01, "index", None, {}),
    (40, 40, 3, 3, 0.5, "index", 0, {}),
    (26, 26, 33, 20, 0.07, "labels", 0, {}),
    (30, 50, 9, 9, 0.1, "mask", None, {}),
    (24, 34, 12, 7, 0.2, "labels", 5, {}),
    (18, 18, 8, 8, 0.3, "index", 0, {"exclude_positives": True}),
    (21, 1, 5, 5, 0.1, "none", None, {}),
    (1, 19, 16, 11, 0.05, "labels", None, {}),
    (33, 29, 10, 10, 0.1, "index", None, {"epilogue": "sigmoid", "bias": -2.5}),
]


def _case_id(case):
    n_a, n_k, d, sub_dim, tau, kind, offset, extra = case
    return f"{n_a}x{n_k}-D{d}-sub{sub_dim}-tau{tau}-{kind}-self{offset}" + "".join(f"-{k}" for k in extra)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_forward_and_backward_match_float64(case, normalize, acc):
    n_a, n_k, d, sub_dim, tau, kind, offset, extra = case
    generator = torch.Generator().manual_seed(n_a * 1000 + n_k)
    a = rows(n_a, d, acc, generator, transposed=True)
    k = a if offset == 0 and n_a == n_k else rows(n_k, d, acc, generator)
    layout = make_layout(kind, n_a, n_k, generator, offset, **extra)
    a_inv, k_inv = (inverse_norms(a, sub_dim), inverse_norms(k, sub_dim)) if normalize else (None, None)
    if not normalize:  # unnormalized logits at τ = 0.01 would overflow any float; keep them in range
        a, k = a * 0.3, k * 0.3

    stat, pos_sum, pos_weight = host_block(a, a_inv, k, k_inv, tau, sub_dim, layout)
    ref_stat, ref_pos_sum, ref_pos_weight = reference_forward(a, k, tau, sub_dim, normalize, layout)
    rtol, atol = (1e-5, 1e-5) if acc == torch.float32 else (1e-12, 1e-12)
    torch.testing.assert_close(stat.double(), ref_stat, rtol=rtol, atol=atol)
    torch.testing.assert_close(pos_sum.double(), ref_pos_sum, rtol=rtol, atol=atol * 100 / tau)
    torch.testing.assert_close(pos_weight.double(), ref_pos_weight, rtol=0, atol=atol)

    # A global statistic that differs from this block's (other blocks add to it), and per-anchor coefficients.
    lse = torch.logaddexp(ref_stat, torch.randn(n_a, generator=generator, dtype=torch.float64))
    alpha = torch.rand(n_a, generator=generator, dtype=torch.float64)
    beta = torch.rand(n_a, generator=generator, dtype=torch.float64)
    d_a, d_k, sums = host_block(a, a_inv, k, k_inv, tau, sub_dim, layout, backward=(lse, alpha, beta, 0))
    ref_d_a, ref_d_k, ref_gs, ref_g = reference_backward(a, k, tau, sub_dim, normalize, layout, lse, alpha, beta)
    # Gradients at τ = 0.01 are ~1/τ times G, with cancellation: fp32 (like naive fp32) is ~5e-6 of the largest.
    tol = 2e-5 if acc == torch.float32 else 1e-10
    assert_close_to_scale(d_a, ref_d_a, tol)
    assert_close_to_scale(d_k, ref_d_k, tol)
    assert_close_to_scale(sums.sum(0), torch.stack([ref_gs, ref_g]), tol)


@pytest.mark.parametrize("tile,threads_per_row", [(16, 1), (16, 4), (64, 2), (32, 4)])
def test_statistics_do_not_depend_on_tiling(tile, threads_per_row):
    """The online log-sum-exp merge gives the single-pass result whatever the tiles and thread split."""
    generator = torch.Generator().manual_seed(7)
    a, k = rows(45, 24, torch.float64, generator), rows(77, 24, torch.float64, generator)
    layout = make_layout("labels", 45, 77, generator)
    inv_a, inv_k = inverse_norms(a, 24), inverse_norms(k, 24)
    stat, pos_sum, _ = host_block(a, inv_a, k, inv_k, 0.01, 24, layout, tile=tile, threads_per_row=threads_per_row)
    ref_stat, ref_pos_sum, _ = reference_forward(a, k, 0.01, 24, True, layout)
    torch.testing.assert_close(stat, ref_stat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pos_sum, ref_pos_sum, rtol=1e-12, atol=1e-10)


def test_block_with_every_entry_excluded_gives_minus_infinity():
    """A 1×1 block of an anchor against itself leaves nothing in the denominator: lse = −inf, no NaN."""
    a = torch.randn(1, 4, dtype=torch.float64)
    stat, pos_sum, pos_weight = host_block(a, inverse_norms(a, 4), a, inverse_norms(a, 4), 0.1, 4,
                                           {"positives": "index", "self_offset": 0, "pos_index": torch.tensor([0])})
    assert stat.item() == float("-inf") and pos_sum.item() == 0.0 and pos_weight.item() == 0.0


def test_clamped_norm_rows_get_the_scaled_gradient_only():
    """A zero row (norm clamped to 1e-12): dz = r·dẑ, as torch.nn.functional.normalize's backward."""
    generator = torch.Generator().manual_seed(3)
    a = rows(6, 5, torch.float64, generator)
    a[2] = 0.0
    k = rows(9, 5, torch.float64, generator)
    layout = make_layout("labels", 6, 9, generator)
    lse, _, _ = reference_forward(a, k, 0.5, 5, True, layout)
    coefficients = torch.full((6,), 0.25, dtype=torch.float64)
    d_a, d_k, _ = host_block(a, inverse_norms(a, 5), k, inverse_norms(k, 5), 0.5, 5, layout,
                             backward=(lse, coefficients, coefficients, 0))
    ref_d_a, ref_d_k, _, _ = reference_backward(a, k, 0.5, 5, True, layout, lse, coefficients, coefficients)
    torch.testing.assert_close(d_a, ref_d_a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d_k, ref_d_k, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_16bit_operands_no_worse_than_naive(dtype, normalize):
    """16-bit rows: forward statistics from exact products in fp32; the gradients' second GEMM rounds
    T = G·prescale and the scaled rows to the 16-bit dtype as the kernels do. Error against float64 stays
    within naive PyTorch's in the same dtype plus 1e-2."""
    n_a, n_k, d, sub_dim, tau = 48, 70, 40, 33, 0.05
    generator = torch.Generator().manual_seed(11)
    a16 = torch.randn(n_a, d, generator=generator).to(dtype)
    k16 = torch.randn(n_k, d, generator=generator).to(dtype)
    layout = make_layout("labels", n_a, n_k, generator, None)
    a, k = a16.float(), k16.float()
    a_inv, k_inv = (inverse_norms(a, sub_dim), inverse_norms(k, sub_dim)) if normalize else (None, None)
    if not normalize:  # raw logits stay in range
        a16, k16 = (a * 0.2).to(dtype), (k * 0.2).to(dtype)
        a, k = a16.float(), k16.float()

    stat, _, _ = host_block(a, a_inv, k, k_inv, tau, sub_dim, layout)
    ref_stat, _, _ = reference_forward(a, k, tau, sub_dim, normalize, layout)
    torch.testing.assert_close(stat.double(), ref_stat, rtol=1e-5, atol=1e-5)

    alpha = torch.full((n_a,), 1.0 / n_a, dtype=torch.float64)
    beta = alpha / reference_forward(a, k, tau, sub_dim, normalize, layout)[2].clamp_min(1)
    d_a, d_k, _ = host_block(a, a_inv, k, k_inv, tau, sub_dim, layout,
                             backward=(ref_stat, alpha, beta, OPERAND[dtype]))
    ref_d_a, ref_d_k, _, _ = reference_backward(a, k, tau, sub_dim, normalize, layout, ref_stat, alpha, beta)

    # Naive PyTorch in the same dtype: the whole computation in 16-bit, autograd for the gradients.
    a_n, k_n = a16.clone().requires_grad_(), k16.clone().requires_grad_()
    s = reference_logits(a_n, k_n, tau, sub_dim, normalize)
    weights, excluded = reference_weights(layout, n_a, n_k)
    lse_n = torch.logsumexp(s.masked_fill(excluded, float("-inf")), dim=1)
    loss = (alpha.to(dtype) * lse_n).sum() - (beta.to(dtype)[:, None] * weights.to(dtype) * s).sum()
    naive_d_a, naive_d_k = torch.autograd.grad(loss, (a_n, k_n))
    for ours, naive, ref in ((d_a, naive_d_a, ref_d_a), (d_k, naive_d_k, ref_d_k)):
        scale = ref.abs().max()
        naive_error = (naive[:, :sub_dim].double() - ref).abs().max() / scale
        our_error = (ours.double() - ref).abs().max() / scale
        assert our_error <= naive_error + 1e-2, (our_error, naive_error)
