"""NT-Xent on the Triton backend (through TRITON_INTERPRET=1 on CPU) vs the float64 SPEC formula and the
torch backend: values, input gradients and dL/dτ (tensor τ through the public functional API).

M = 26 rows (N = 13) is no multiple of the interpreter's 16-row tiles, D ∈ {3, 17, 64} crosses the
16-wide feature chunks (and D' = 17 > BLOCK_DO = 16 splits the backward over two output slices). Every
loss runs the block engine on the Triton block primitive, which reads the user's rows in place, so the
strided cases hand it views (transposed buffers, every other column of a wider one) with a sub_dim
prefix. Also ``assert_triton_matches`` and the layouts, shared with test_triton_supcon.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
from loss_cases import Batch, assert_no_worse_than_naive, make_batch, reference_of, relative_error, run
from torch.utils._python_dispatch import TorchDispatchMode

import fastcl
from fastcl.reference import naive_nt_xent

pytestmark = pytest.mark.triton

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def backend_loss(loss: str, backend: str):
    return functools.partial(getattr(fastcl.functional, loss), backend=backend)


def transposed(x: torch.Tensor) -> torch.Tensor:
    """Same values, features as the slowest dimension (strides reversed): a non-contiguous view."""
    dims = tuple(reversed(range(x.dim())))
    return x.permute(dims).contiguous().permute(dims)


def every_other(x: torch.Tensor) -> torch.Tensor:
    """Same values, as every other column of a buffer twice as wide (feature stride 2, wide row stride)."""
    return torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]


def laid_out(fn, *layouts):
    """``fn`` called on the tensor arguments re-laid-out by ``layouts`` (differentiable, same values), so the
    op receives non-contiguous views while the test's leaves and the reference stay plain."""

    def call(*tensors, **options):
        views = [layout(t) for layout, t in zip(layouts, tensors)]
        assert not any(v.is_contiguous() for v in views)
        return fn(*views, **options)

    return call


def on_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(tuple(t.to(device) for t in batch.tensors), {k: v.to(device) for k, v in batch.targets.items()})


def assert_results_close(actual, expected, rtol: float, what: str, temperature=None) -> None:
    """Loss, input gradients and dL/dτ within ``rtol`` (relative_error). dL/dτ = −Σ G·s/τ (+ L/τ) cancels
    terms of size ~L/τ, so, as in loss_cases.assert_matches_reference, it is measured against
    max(|dL/dτ|, 1/τ) when ``temperature`` is given."""
    assert relative_error(actual.loss.cpu(), expected.loss.cpu()) <= rtol, (
        what,
        actual.loss.item(),
        expected.loss.item(),
    )
    for i, (g, g_ref) in enumerate(zip(actual.grads, expected.grads)):
        error = relative_error(g.cpu(), g_ref.cpu())
        assert error <= rtol, f"{what}: input {i} gradient, relative error {error:.3g}"
    if expected.tau_grad is not None:
        floor = 0.0 if temperature is None else 1.0 / float(temperature)
        error = relative_error(actual.tau_grad.cpu(), expected.tau_grad.cpu(), floor)
        assert error <= rtol, f"{what}: dL/dtau relative error {error:.3g}"


def assert_triton_matches(loss: str, batch: Batch, temperature, dtype: torch.dtype, device, rtol: float, **options):
    """The triton backend vs the float64 formula and vs the torch backend (same inputs, same device)."""
    on = on_device(batch, device)
    ours = run(backend_loss(loss, "triton"), on, temperature, dtype, **options)
    assert ours.loss.shape == () and ours.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for g in ours.grads:
        assert g.dtype == dtype and g.device.type == device.type
    assert_results_close(
        ours, reference_of(loss, batch, temperature, dtype, **options), rtol, "vs float64 reference", temperature
    )
    assert_results_close(
        ours, run(backend_loss(loss, "torch"), on, temperature, dtype, **options), rtol, "vs torch backend", temperature
    )
    return ours


CASES = [
    # (D, temperature, options): a tensor temperature also checks dL/dτ.
    (3, 0.5, {}),
    (17, torch.tensor(0.01), {}),
    (64, torch.tensor(0.5), {}),
    (17, torch.tensor(0.2), {"sub_dim": 5}),
    (17, torch.tensor(4.0), {"normalize": False}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "dim, tau, options", CASES, ids=lambda v: repr(v) if not isinstance(v, torch.Tensor) else f"tensor({float(v):g})"
)
def test_matches_reference_and_torch_backend(dim, tau, options, dtype, triton_device):
    batch = make_batch("nt_xent", 13, dim, seed=dim)
    assert_triton_matches("nt_xent", batch, tau, dtype, triton_device, RTOL[dtype], **options)


def test_smallest_batch(triton_device):
    """N = 2: every tile is mostly padding; each row has two negatives."""
    assert_triton_matches(
        "nt_xent", make_batch("nt_xent", 2, 5, seed=21), 0.1, torch.float32, triton_device, RTOL[torch.float32]
    )


def test_strided_inputs_match_contiguous(triton_device):
    """A transposed buffer and every other column of a wider one: strides ≠ (D, 1), read in place."""
    batch = on_device(make_batch("nt_xent", 11, 17, seed=5), triton_device)
    strided = laid_out(backend_loss("nt_xent", "triton"), transposed, every_other)
    a = run(strided, batch, torch.tensor(0.2), torch.float64, normalize=False)
    b = run(backend_loss("nt_xent", "triton"), batch, torch.tensor(0.2), torch.float64, normalize=False)
    assert_results_close(a, b, 1e-14, "strided vs contiguous")


@pytest.mark.parametrize(
    "dtype, tau, normalize, rtol",
    [
        (torch.float32, torch.tensor(0.01), True, 1e-5),
        (torch.float64, torch.tensor(2.0), False, 1e-10),
        (torch.bfloat16, torch.tensor(0.1), True, 2e-2),
    ],
    ids=["f32-tau0.01", "f64-unnormalized", "bf16"],
)
def test_sub_dim_of_wide_strided_rows(dtype, tau, normalize, rtol, triton_device):
    """D = 40, sub_dim = 17: z1 a transposed buffer, z2 every other column of an 80-wide one (different
    row and feature strides per input): vs the float64 formula and the torch backend on the same views."""
    batch = make_batch("nt_xent", 13, 40, seed=8)
    on = on_device(batch, triton_device)
    options = dict(sub_dim=17, normalize=normalize)
    ours = run(laid_out(backend_loss("nt_xent", "triton"), transposed, every_other), on, tau, dtype, **options)
    for g in ours.grads:
        assert g.dtype == dtype and torch.count_nonzero(g[:, 17:]) == 0
    assert_results_close(ours, reference_of("nt_xent", batch, tau, dtype, **options), rtol, "vs float64 reference", tau)
    torch_backend = laid_out(backend_loss("nt_xent", "torch"), transposed, every_other)
    assert_results_close(ours, run(torch_backend, on, tau, dtype, **options), rtol, "vs torch backend", tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rows_with_clamped_norm(dtype, triton_device):
    """A row ×1e-14 and an all-zero row: norms below F.normalize's eps are clamped (the gradient is only
    scaled by 1/eps, no projection). Tiny rows' gradients are ~1e12 × the others', so each group is
    compared on its own scale."""
    batch = make_batch("nt_xent", 13, 17, seed=6)
    batch.tensors[0][3] *= 1e-14
    batch.tensors[1][5] = 0.0
    tau = torch.tensor(0.1)
    ours = run(backend_loss("nt_xent", "triton"), on_device(batch, triton_device), tau, dtype)
    expected = [reference_of("nt_xent", batch, tau, dtype), run(backend_loss("nt_xent", "torch"), batch, tau, dtype)]
    rtol = RTOL[dtype]
    for truth in expected:
        assert relative_error(ours.loss.cpu(), truth.loss) <= rtol
        assert relative_error(ours.tau_grad.cpu(), truth.tau_grad) <= rtol
        for g, g_ref, tiny in zip(ours.grads, truth.grads, (3, 5)):
            g, others = g.cpu(), torch.arange(13) != tiny
            assert torch.isfinite(g).all()
            assert relative_error(g[tiny], g_ref[tiny]) <= rtol
            assert relative_error(g[others], g_ref[others]) <= rtol


def test_gradient_beyond_sub_dim_is_exactly_zero(triton_device):
    batch = on_device(make_batch("nt_xent", 9, 20, seed=11), triton_device)
    ours = run(backend_loss("nt_xent", "triton"), batch, 0.5, torch.float32, sub_dim=6)
    for g in ours.grads:
        assert torch.count_nonzero(g[:, 6:]) == 0
        assert torch.count_nonzero(g[:, :6]) > 0


def test_backward_is_deterministic(triton_device):
    batch = on_device(make_batch("nt_xent", 13, 17, seed=2), triton_device)
    first = run(backend_loss("nt_xent", "triton"), batch, 0.1, torch.float32)
    second = run(backend_loss("nt_xent", "triton"), batch, 0.1, torch.float32)
    assert torch.equal(first.loss, second.loss)
    assert all(torch.equal(g, h) for g, h in zip(first.grads, second.grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_inputs_no_worse_than_naive(dtype, triton_device):
    batch = make_batch("nt_xent", 13, 64, seed=7)
    tau = 0.1
    truth = reference_of("nt_xent", batch, tau, dtype)
    on = on_device(batch, triton_device)
    ours = run(backend_loss("nt_xent", "triton"), on, tau, dtype)
    baseline = run(naive_nt_xent, on, tau, dtype)
    assert_no_worse_than_naive(ours, baseline, truth, dtype)


def test_float16_rows_with_small_norms(triton_device):
    """Norms ~0.1 make the inverse norms ~10: the fp16 gradient GEMM must not overflow (max 65504) with
    the 2¹² pre-scale, so float16 scales the column rows (ẑ, |ẑ| ≤ 1) instead of the gradient tile."""
    batch = make_batch("nt_xent", 13, 64, seed=4)
    batch = Batch(tuple(t * 0.02 for t in batch.tensors))
    ours = run(backend_loss("nt_xent", "triton"), on_device(batch, triton_device), 0.1, torch.float16)
    truth = reference_of("nt_xent", batch, 0.1, torch.float16)
    assert relative_error(ours.loss.cpu(), truth.loss) <= 1e-2
    for g, g_ref in zip(ours.grads, truth.grads):
        assert torch.isfinite(g).all() and relative_error(g.cpu(), g_ref) <= 2e-2


class _OpLog(TorchDispatchMode):
    """Records the aten ops that run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce"])
def test_backward_materializes_no_zero_gradients(loss, triton_device):
    """The ops' auxiliary outputs (lse, inverse norms) get no gradient: autograd must not allocate zero
    tensors for them (``ctx.set_materialize_grads(False)``), and these backwards allocate none themselves
    (sub_dim = D: the gradients need no zero fill)."""
    z1, z2 = (torch.randn(9, 5, device=triton_device, requires_grad=True) for _ in range(2))
    value = getattr(fastcl.functional, loss)(z1, z2, torch.tensor(0.5, requires_grad=True), backend="triton")
    with _OpLog() as log:
        value.backward()
    assert z1.grad is not None and not [op for op in log.ops if "zero" in op or "fill" in op], log.ops


# --- GPU only: large shapes and memory --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_large_batch_matches_torch_backend(dtype, rtol):
    """M = 65 536, D = 128: triton vs the chunked torch backend on the same GPU inputs (loss, dZ, dL/dτ)."""
    batch = on_device(make_batch("nt_xent", 32768, 128, seed=3), torch.device("cuda"))
    ours = run(backend_loss("nt_xent", "triton"), batch, torch.tensor(0.1), dtype)
    expected = run(backend_loss("nt_xent", "torch"), batch, torch.tensor(0.1), dtype)
    assert_results_close(ours, expected, rtol, "M = 65536")


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["nt_xent", "supcon"])
def test_small_temperature_gradient_matches_float64(loss):
    """fp32, τ = 0.01, M = 8192: dL/dτ (which cancels terms of size ~1/τ) vs the float64 formula. The forward
    and the backward are tuned independently, so their tiles may sum s in different orders."""
    batch = on_device(make_batch(loss, 4096, 128, seed=5), torch.device("cuda"))
    ours = run(backend_loss(loss, "triton"), batch, torch.tensor(0.01), torch.float32)
    expected = reference_of(loss, batch, torch.tensor(0.01), torch.float32)
    assert_results_close(ours, expected, 1e-5, "tau = 0.01", 0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [1000, 4096])
def test_wide_features_match_torch_backend(dim):
    """D up to 4096: many BLOCK_D chunks and several BLOCK_DO output slices."""
    batch = on_device(make_batch("nt_xent", 1000, dim, seed=dim), torch.device("cuda"))
    ours = run(backend_loss("nt_xent", "triton"), batch, torch.tensor(0.1), torch.float32)
    assert_results_close(
        ours, run(backend_loss("nt_xent", "torch"), batch, torch.tensor(0.1), torch.float32), 1e-5, f"D = {dim}"
    )


@pytest.mark.gpu
def test_memory_beyond_inputs_and_grads():
    """M = 262 144, D = 128 (bf16): peak allocation beyond inputs and their gradients ≤ 64 MB."""
    n, d = 131072, 128
    z1 = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z2 = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fastcl.functional.nt_xent(z1[:64], z2[:64], backend="triton").backward()  # compile and autotune first
    z1.grad = z2.grad = None
    torch.cuda.synchronize()
    grads = z1.numel() * z1.element_size() + z2.numel() * z2.element_size()
    baseline = torch.cuda.memory_allocated()  # the inputs
    torch.cuda.reset_peak_memory_stats()
    fastcl.functional.nt_xent(z1, z2, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline - grads
    assert extra <= 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and grads"
