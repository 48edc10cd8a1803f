"""The Triton block primitive (kernels/block.py, through TRITON_INTERPRET=1 on CPU) vs float64 formulas
written here from docs/block-engine.md, and vs the torch reference primitive.

Odd shapes (A = 23 anchors ≠ K = 37 keys: no multiple of the interpreter's 16-row tiles), D ∈ {3, 17},
sub_dim prefixes of strided rows, τ = 0.01, every positives kind with and without a self entry,
exclude_positives (DCL), a global lse that differs from the block's own, bf16 and float64.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from loss_cases import relative_error
from torch.utils._python_dispatch import TorchDispatchMode

from fastcl.contract import Layout, inverse_norms

pytestmark = pytest.mark.triton
block = pytest.importorskip("fastcl.kernels.block")
torch_block = pytest.importorskip("fastcl.torch_backend.block")

A, K = 23, 37


def _layout(kind: str, self_offset, generator: torch.Generator, exclude: bool = False) -> Layout:
    if kind == "index":
        index = torch.randint(0, K, (A,), generator=generator)
        index[::5] = -1  # anchors without a positive in this block
        if self_offset is not None:  # the positive is never the anchor itself
            index = torch.where(index == torch.arange(A) + self_offset, -1, index)
        return Layout(positives="index", self_offset=self_offset, pos_index=index, exclude_positives=exclude)
    if kind in ("labels", "labels_sparse"):  # sparse: anchors of classes 4 and 5, which no key has
        return Layout(
            positives="labels",
            self_offset=self_offset,
            a_labels=torch.randint(0, 6 if kind == "labels_sparse" else 4, (A,), generator=generator),
            k_labels=torch.randint(0, 4, (K,), generator=generator),
            exclude_positives=exclude,
        )
    if kind == "mask":  # soft weights on a 7 × 11 sample mask, read as mask[a mod 7, c mod 11]
        weights = torch.rand(7, 11, generator=generator) * (torch.rand(7, 11, generator=generator) < 0.4)
        return Layout(positives="mask", self_offset=self_offset, mask=weights, exclude_positives=exclude)
    return Layout(positives="none", self_offset=self_offset)


def _positives(layout: Layout) -> torch.Tensor:
    """P [A, K] in float64 (0 on the self entry)."""
    if layout.positives == "index":
        p = (torch.arange(K)[None, :] == layout.pos_index[:, None]).double()
    elif layout.positives == "labels":
        p = (layout.a_labels[:, None] == layout.k_labels[None, :]).double()
    elif layout.positives == "mask":
        p = layout.mask.double()[torch.arange(A) % layout.mask.shape[0]][:, torch.arange(K) % layout.mask.shape[1]]
    else:
        p = torch.zeros(A, K, dtype=torch.float64)
    if layout.self_offset is not None:
        p[torch.arange(A), torch.arange(A) + layout.self_offset] = 0.0
    return p


def _reference(a, k, tau, sub_dim, layout, normalize, lse_shift, alpha, beta):
    """float64: forward statistics, then G with the given global lse and gradients of the RAW rows."""
    a64 = a.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    a_hat = F.normalize(a64[:, :sub_dim], dim=1, eps=1e-12) if normalize else a64[:, :sub_dim]
    k_hat = F.normalize(k64[:, :sub_dim], dim=1, eps=1e-12) if normalize else k64[:, :sub_dim]
    s = a_hat @ k_hat.T / tau
    p = _positives(layout)
    kept = torch.ones(A, K, dtype=torch.bool)
    if layout.self_offset is not None:
        kept[torch.arange(A), torch.arange(A) + layout.self_offset] = False
    denominator = kept & (p == 0) if layout.exclude_positives else kept
    lse = torch.logsumexp(s.detach().masked_fill(~denominator, float("-inf")), dim=1)
    pos_sum = (p * s.detach()).sum(1)
    global_lse = lse + lse_shift
    g = alpha[:, None] * torch.exp(s.detach() - global_lse[:, None]) * denominator - beta[:, None] * p
    g = g * kept
    (g * s).sum().backward()
    return lse, pos_sum, p.sum(1), global_lse, a64.grad[:, :sub_dim], k64.grad[:, :sub_dim], (g * s.detach()).sum()


def _rows(dtype, depth, sub_dim, normalize, strided, generator):
    a = torch.randn(A, depth, generator=generator, dtype=torch.float64)
    k = torch.randn(K, depth, generator=generator, dtype=torch.float64)
    if normalize:
        a[3] *= 1e-3  # a short row: its normalization backward is ~1e3 larger
    else:  # raw rows of norm ≤ ~0.3 keep |s| ≤ ~10 at τ = 0.01 (fp32 cannot resolve exp(s) of |s| ~ 1000)
        a, k = a * 0.3 / depth**0.5, k * 0.3 / depth**0.5
    if strided:  # a: a transposed buffer; k: every other column of a twice-as-wide one
        a = a.T.contiguous().T
        wide = torch.zeros(K, 2 * depth, dtype=torch.float64)
        wide[:, ::2] = k
        k = wide[:, ::2]
    return a.to(dtype), k.to(dtype)


def _run(dtype, depth, sub_dim, tau, kind, self_offset, normalize, strided=False, exclude=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a, k = _rows(dtype, depth, sub_dim, normalize, strided, generator)
    layout = _layout(kind, self_offset, generator, exclude)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau_t = torch.tensor(tau, dtype=acc)
    a_inv = inverse_norms(a, sub_dim) if normalize else None
    k_inv = inverse_norms(k, sub_dim) if normalize else None
    alpha = torch.rand(A, generator=generator, dtype=torch.float64) / A
    beta = torch.rand(A, generator=generator, dtype=torch.float64) / A
    lse_shift = torch.rand(A, generator=generator, dtype=torch.float64) * 0.5
    ref = _reference(a, k, tau, sub_dim, layout, normalize, lse_shift, alpha, beta)
    forward = block.block_forward(a, a_inv, k, k_inv, tau_t, sub_dim, layout)
    backward = block.block_backward(
        a, a_inv, k, k_inv, tau_t, sub_dim, layout, ref[3].to(acc), alpha.to(acc), beta.to(acc)
    )
    return a, k, a_inv, k_inv, tau_t, layout, ref, forward, backward, (ref[3].to(acc), alpha.to(acc), beta.to(acc))


def _close(got, want, rtol):
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert relative_error(got[finite], want[finite]) <= rtol


CASES = [  # (kind, self_offset, normalize, depth, sub_dim, strided, exclude)
    ("index", 0, True, 17, 17, False, False),
    ("index", 5, False, 3, 3, True, False),
    ("labels", 0, True, 17, 9, True, False),
    ("labels", None, True, 3, 3, False, True),
    ("labels_sparse", 14, False, 17, 17, False, False),
    ("labels_sparse", None, True, 40, 33, True, False),
    ("mask", 2, True, 17, 17, False, False),
    ("mask", None, False, 17, 13, True, True),
    ("none", 0, True, 17, 17, True, False),
]


@pytest.mark.parametrize(
    "kind,self_offset,normalize,depth,sub_dim,strided,exclude",
    CASES,
    ids=[f"{c[0]}-self{c[1]}-norm{int(c[2])}-D{c[3]}-sub{c[4]}-strided{int(c[5])}-dcl{int(c[6])}" for c in CASES],
)
@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_fp32_matches_float64(kind, self_offset, normalize, depth, sub_dim, strided, exclude, tau):
    *_, ref, forward, backward, _ = _run(
        torch.float32, depth, sub_dim, tau, kind, self_offset, normalize, strided, exclude
    )
    for got, want in zip(forward, ref[:3]):
        _close(got, want, 1e-5)
    d_a, d_k, gs = backward
    assert d_a.dtype == torch.float32 and d_a.shape == (A, sub_dim) and d_k.shape == (K, sub_dim)
    _close(d_a, ref[4], 1e-5)
    _close(d_k, ref[5], 1e-5)
    assert abs(gs.item() - ref[6].item()) <= 1e-5 * max(1.0, ref[4].abs().max().item())


def _sigmoid_run(primitive, a, k, sub_dim, layout, normalize, alpha, beta, precision):
    a_inv = inverse_norms(a, sub_dim) if normalize else None
    k_inv = inverse_norms(k, sub_dim) if normalize else None
    tau = torch.tensor(0.01, dtype=precision)
    stats = primitive.block_forward(a, a_inv, k, k_inv, tau, sub_dim, layout)
    grads = primitive.block_backward(
        a, a_inv, k, k_inv, tau, sub_dim, layout, stats[0], alpha.to(precision), beta.to(precision)
    )
    return (*stats, *grads)


@pytest.mark.parametrize(
    "kind,self_offset,normalize,depth,sub_dim,strided,exclude",
    CASES,
    ids=[f"{c[0]}-self{c[1]}-norm{int(c[2])}-D{c[3]}-sub{c[4]}-strided{int(c[5])}-dcl{int(c[6])}" for c in CASES],
)
@pytest.mark.parametrize("bias", [None, -10.0], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sigmoid_matches_float64(kind, self_offset, normalize, depth, sub_dim, strided, exclude, bias, dtype):
    """SigLIP's epilogue (Σ softplus(s + b) forward, σ(s + b) gradient, gs = [Σ G·s, Σ G]) on the odd
    shapes at τ = 0.01 (|s + b| up to ~100), against the torch reference primitive in float64."""
    generator = torch.Generator().manual_seed(1)
    a, k = _rows(dtype, depth, sub_dim, normalize, strided, generator)
    layout = dataclasses.replace(_layout(kind, self_offset, generator, exclude), epilogue="sigmoid")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    alpha = torch.rand(A, generator=generator, dtype=torch.float64)
    beta = torch.rand(A, generator=generator, dtype=torch.float64)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    got_layout, want_layout = (
        dataclasses.replace(layout, bias=None if bias is None else torch.tensor(bias, dtype=precision))
        for precision in (acc, torch.float64)
    )
    got = _sigmoid_run(block, a, k, sub_dim, got_layout, normalize, alpha, beta, acc)
    want = _sigmoid_run(
        torch_block, a.double(), k.double(), sub_dim, want_layout, normalize, alpha, beta, torch.float64
    )
    assert got[5].shape == (2,) and got[5].dtype == acc
    for name, g, w in zip(("stat", "pos_sum", "pos_weight", "d_a", "d_k"), got, want):
        assert g.dtype == acc and g.shape == w.shape, name
        _close(g, w, rtol)
    scale = max(1.0, want[5].abs().max().item())
    assert (got[5].double() - want[5]).abs().max().item() <= rtol * 10 * scale, (got[5], want[5])


def test_float64_and_torch_reference_primitive():
    """float64 rows (fp64 dots) at 1e-10, and the same numbers as the torch backend's primitive."""
    a, k, a_inv, k_inv, tau, layout, ref, forward, backward, coefficients = _run(
        torch.float64, 17, 13, 0.01, "labels", 0, True, strided=True
    )
    for got, want in zip(forward, ref[:3]):
        _close(got, want, 1e-10)
    for got, want in zip(backward[:2], ref[4:6]):
        _close(got, want, 1e-10)
    expected_forward = torch_block.block_forward(a, a_inv, k, k_inv, tau, 13, layout)
    expected_backward = torch_block.block_backward(a, a_inv, k, k_inv, tau, 13, layout, *coefficients)
    for got, want in zip((*forward, *backward), (*expected_forward, *expected_backward)):
        _close(got, want, 1e-10)


@pytest.mark.parametrize("kind", ["index", "mask"])
def test_bf16_no_worse_than_naive(kind):
    """bf16 rows: errors vs float64 within naive bf16 PyTorch's (the same formula in bf16) + 1e-2."""
    a, k, a_inv, k_inv, tau, layout, ref, forward, backward, _ = _run(torch.bfloat16, 17, 17, 0.05, kind, 0, True)
    a_hat = F.normalize(a.float(), dim=1).bfloat16()
    k_hat = F.normalize(k.float(), dim=1).bfloat16()
    s_naive = (a_hat @ k_hat.T).float() / 0.05
    kept = torch.ones(A, K, dtype=torch.bool)
    kept[torch.arange(A), torch.arange(A)] = False
    naive_lse = torch.logsumexp(s_naive.masked_fill(~kept, float("-inf")), dim=1)
    naive_error = relative_error(naive_lse.double(), ref[0])
    assert relative_error(forward[0].double(), ref[0]) <= naive_error + 1e-2
    assert relative_error(forward[1].double(), ref[1]) <= naive_error + 1e-2
    for got, want in zip(backward[:2], ref[4:6]):
        assert relative_error(got.double(), want) <= naive_error + 2e-2


def test_empty_anchor_gives_minus_inf_and_no_nan():
    """An anchor whose only key is itself: lse = −inf, and its backward terms are 0, not NaN."""
    a = torch.randn(1, 8)
    layout = Layout(positives="none", self_offset=0)
    lse, pos_sum, pos_weight = block.block_forward(a, None, a, None, torch.tensor(0.1), 8, layout)
    assert lse.item() == float("-inf") and pos_sum.item() == 0 and pos_weight.item() == 0
    d_a, d_k, gs = block.block_backward(
        a, None, a, None, torch.tensor(0.1), 8, layout, lse, torch.ones(1), torch.ones(1)
    )
    assert torch.equal(d_a, torch.zeros(1, 8)) and torch.equal(d_k, torch.zeros(1, 8)) and gs.item() == 0


def test_label_positives_need_no_host_sync():
    """Label positives come from class sums named by one sort (static shapes): no ``unique`` and no
    device-to-host read (``item`` / ``_local_scalar_dense``) in the forward."""
    generator = torch.Generator().manual_seed(3)
    layout = _layout("labels_sparse", 0, generator)
    a = torch.randn(A, 17, generator=generator)
    k = torch.cat([a, torch.randn(K - A, 17, generator=generator)])
    ops = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        block.block_forward(a, None, k, None, torch.tensor(0.5), 17, layout)
    assert not [op for op in ops if "unique" in op or "scalar_dense" in op or "nonzero" in op], ops


def test_deterministic():
    first = _run(torch.float32, 17, 17, 0.1, "labels", 0, True)
    second = _run(torch.float32, 17, 17, 0.1, "labels", 0, True)
    for got, want in zip((*first[7], *first[8]), (*second[7], *second[8])):
        assert torch.equal(got, want)


def test_bad_input_names_the_argument():
    a, k, tau = torch.randn(4, 8), torch.randn(5, 8), torch.tensor(0.1)
    with pytest.raises(ValueError, match="sub_dim"):
        block.block_forward(a, None, k, None, tau, 9, Layout())
    with pytest.raises(ValueError, match="k: expected the dtype"):
        block.block_forward(a, None, k.double(), None, tau, 8, Layout())
    with pytest.raises(ValueError, match="pos_index"):
        block.block_forward(
            a, None, k, None, tau, 8, Layout(positives="index", pos_index=torch.zeros(3, dtype=torch.long))
        )


# --- own blocks (Layout.own_block): the keys are the anchors, the backward returns the rows' whole gradient ---

N_OWN, D_OWN, SUB_OWN = 37, 19, 13


def _own_layout(kind: str, self_offset, exclude: bool, sigmoid: bool, generator: torch.Generator) -> Layout:
    """A layout on N_OWN rows against themselves; the mask is soft and NOT symmetric (a 7 × 11 pattern)."""
    extra = dict(
        self_offset=self_offset,
        exclude_positives=exclude,
        own_block=True,
        epilogue="sigmoid" if sigmoid else "softmax",
        bias=torch.tensor(-3.0) if sigmoid else None,
    )
    if kind == "index":
        index = torch.randint(0, N_OWN, (N_OWN,), generator=generator)
        index[::6] = -1
        if self_offset is not None:
            index = torch.where(index == torch.arange(N_OWN), -1, index)
        return Layout(positives="index", pos_index=index, **extra)
    if kind == "labels":
        labels = torch.randint(0, 5, (N_OWN,), generator=generator)
        return Layout(positives="labels", a_labels=labels, k_labels=labels, **extra)
    if kind == "mask":
        weights = torch.rand(7, 11, generator=generator) * (torch.rand(7, 11, generator=generator) < 0.4)
        return Layout(positives="mask", mask=weights, **extra)
    return Layout(positives="none", **extra)


def _own_float64(z, tau, layout, lse, alpha, beta):
    """float64 by autograd through the definition, z the anchors AND the keys: (d_rows, Σ G·s, Σ G) for
    G_ac = alpha_a·e_ac − beta_a·P_ac held constant (e: exp(s − lse) or σ(s + b) on the entries kept)."""
    z64 = z.detach().double().requires_grad_()
    unit = F.normalize(z64[:, :SUB_OWN], dim=1, eps=1e-12)
    s = unit @ unit.T / tau
    n = z.shape[0]
    rows = torch.arange(n)
    if layout.positives == "index":
        p = (rows[None, :] == layout.pos_index[:, None]).double()
    elif layout.positives == "labels":
        p = (layout.a_labels[:, None] == layout.k_labels[None, :]).double()
    elif layout.positives == "mask":
        p = layout.mask.double()[rows % 7][:, rows % 11]
    else:
        p = torch.zeros(n, n, dtype=torch.float64)
    kept = torch.ones(n, n, dtype=torch.bool)
    if layout.self_offset is not None:
        kept[rows, rows] = False
    p = p * kept
    denominator = kept & (p == 0) if layout.exclude_positives else kept
    if layout.epilogue == "sigmoid":
        e = torch.sigmoid(s.detach() + layout.bias.double())
    else:
        e = torch.exp(s.detach() - lse.double()[:, None])
    g = (alpha.double()[:, None] * e * denominator - beta.double()[:, None] * p) * kept
    (g * s).sum().backward()
    return z64.grad[:, :SUB_OWN], (g * s.detach()).sum(), g.sum()


OWN_CASES = [  # (kind, self_offset, exclude_positives, sigmoid)
    ("index", 0, False, False),
    ("index", None, True, False),
    ("labels", 0, False, False),
    ("labels", 0, True, False),
    ("mask", 0, False, False),
    ("mask", None, True, False),
    ("none", 0, False, False),
    ("index", 0, False, True),
    ("labels", None, True, True),
    ("mask", 0, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "kind,self_offset,exclude,sigmoid",
    OWN_CASES,
    ids=[f"{c[0]}-self{c[1]}-dcl{int(c[2])}-{'sigmoid' if c[3] else 'softmax'}" for c in OWN_CASES],
)
def test_own_block_is_the_rows_whole_gradient(kind, self_offset, exclude, sigmoid, dtype):
    """An own block's one-pass backward (G + Gᵀ from one tile) against (1) float64 autograd through the
    definition with the rows as both anchors and keys and (2) the torch backend's regular block with
    keys = anchors, d_rows = d_a + d_k: 37 rows (no multiple of a tile), D = 19, sub_dim = 13, τ = 0.01,
    strided rows, a global lse that differs from the block's own. bf16: G is rounded to bf16 before the
    second GEMM (2⁻⁹ relative per entry), so 2e-2 (fp32: 1e-5)."""
    generator = torch.Generator().manual_seed(7)
    wide = torch.randn(N_OWN, 2 * D_OWN, generator=generator, dtype=torch.float64)
    wide[4] *= 1e-3  # a short row: its normalization backward is ~1e3 larger
    z = wide.to(dtype)[:, ::2]  # strided rows, read in place
    layout = _own_layout(kind, self_offset, exclude, sigmoid, generator)
    acc = torch.float32
    tau = torch.tensor(0.01, dtype=acc)
    inv = inverse_norms(z, SUB_OWN)
    regular = dataclasses.replace(layout, own_block=False)
    lse = torch_block.block_forward(
        z.double(),
        inverse_norms(z.double(), SUB_OWN),
        z.double(),
        inverse_norms(z.double(), SUB_OWN),
        tau.double(),
        SUB_OWN,
        regular,
    )[0]
    lse = lse + torch.rand(N_OWN, generator=generator, dtype=torch.float64) * 0.5
    alpha = torch.rand(N_OWN, generator=generator, dtype=torch.float64)
    beta = torch.rand(N_OWN, generator=generator, dtype=torch.float64)
    kernel_layout = layout if not sigmoid else dataclasses.replace(layout, bias=layout.bias.to(acc))
    d_rows, none, gs = block.block_backward(
        z, inv, z, inv, tau, SUB_OWN, kernel_layout, lse.to(acc), alpha.to(acc), beta.to(acc)
    )
    assert none is None and d_rows.shape == (N_OWN, SUB_OWN) and d_rows.dtype == acc
    want, want_gs, want_g = _own_float64(z, tau.item(), layout, lse, alpha, beta)  # τ as the kernel reads it
    z64, inv64 = z.double(), inverse_norms(z.double(), SUB_OWN)
    bias64 = dict(bias=layout.bias.double()) if sigmoid else {}
    d_a, d_k, regular_gs = torch_block.block_backward(
        z64, inv64, z64, inv64, tau.double(), SUB_OWN, dataclasses.replace(regular, **bias64), lse, alpha, beta
    )
    _close(d_a + d_k, want, 1e-10)  # the two references agree
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    _close(d_rows, want, rtol)
    if sigmoid:
        assert gs.shape == (2,)
        assert abs(gs[0].item() - want_gs.item()) <= rtol * max(1.0, abs(want_gs.item()))
        assert abs(gs[1].item() - want_g.item()) <= rtol * max(1.0, abs(want_g.item()))
        assert abs(regular_gs[1].item() - want_g.item()) <= 1e-10 * max(1.0, abs(want_g.item()))
    else:
        assert gs.dim() == 0
        assert abs(gs.item() - want_gs.item()) <= rtol * max(1.0, abs(want_gs.item()))


def test_own_block_rejects_other_keys():
    z, tau = torch.randn(6, 8), torch.tensor(0.1)
    own = Layout(positives="none", self_offset=0, own_block=True)
    lse, alpha = torch.zeros(6), torch.ones(6)
    with pytest.raises(ValueError, match="own_block"):
        block.block_backward(z, None, torch.randn(7, 8), None, tau, 8, own, lse, alpha, alpha)
    with pytest.raises(ValueError, match="self_offset"):
        block.block_backward(z, None, z, None, tau, 8, dataclasses.replace(own, self_offset=2), lse, alpha, alpha)
