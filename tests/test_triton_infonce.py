"""Cross-view InfoNCE on the Triton backend (through TRITON_INTERPRET=1 on CPU) vs the float64 SPEC
formula and the torch backend: values, input gradients and dL/dτ, through the public API.

N ∈ {13, 37} is no multiple of the interpreter's 16-row tiles; N = 37 gives the forward 2 row groups ×
2 column splits, so the partial log-sum-exp merges (and a group walking two row blocks) run. D ∈ {3, 17,
64} crosses the 16-wide feature chunks, and D = 64 needs 4 output slices of 16 in the backward.
"""

from __future__ import annotations

import pytest
import torch
from loss_cases import Batch, assert_no_worse_than_naive, make_batch, reference_of, relative_error, run
from test_triton_ntxent import assert_triton_matches, backend_loss, on_device

import fastcl
from fastcl.reference import naive_info_nce

pytestmark = pytest.mark.triton

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _tau_id(value) -> str:
    return f"tensor({float(value):g})" if isinstance(value, torch.Tensor) else repr(value)


CASES = [
    # (N, D, temperature, options, dtype); a tensor temperature also checks dL/dτ.
    (13, 3, 0.01, {}, torch.float32),
    (13, 3, torch.tensor(1.0), {"symmetric": False}, torch.float32),
    (37, 17, torch.tensor(0.07), {}, torch.float32),
    (37, 17, 0.01, {"symmetric": False}, torch.float32),
    (37, 64, torch.tensor(0.5), {}, torch.float32),
    (13, 17, torch.tensor(0.2), {"normalize": False}, torch.float32),
    # Unnormalized rows at τ = 0.01: logits of several hundred, read through a sub_dim prefix view. Known gap
    # (issue 22, reported to the block kernel's owner): the block primitive's fp32 gradient is 5.6e-5 off
    # float64 here (the torch backend 8e-8; the removed InfoNCE kernel divided each logit by τ and met 1e-5).
    pytest.param(
        13,
        17,
        0.01,
        {"normalize": False, "sub_dim": 9, "symmetric": False},
        torch.float32,
        marks=pytest.mark.xfail(reason="block primitive: fp32 exp of logits ~|s|·ε off at |s| ~ 1e3", strict=False),
    ),
    (13, 17, torch.tensor(0.1), {}, torch.float64),
    (13, 17, torch.tensor(0.01), {"sub_dim": 5, "symmetric": False}, torch.float64),
]


@pytest.mark.parametrize(
    "n, dim, tau, options, dtype", CASES, ids=lambda v: _tau_id(v) if not isinstance(v, torch.dtype) else str(v)[6:]
)
def test_matches_reference_and_torch_backend(n, dim, tau, options, dtype, triton_device):
    batch = make_batch("info_nce", n, dim, seed=n + dim)
    assert_triton_matches("info_nce", batch, tau, dtype, triton_device, RTOL[dtype], **options)


def test_directclr_module_prefix_gradient(triton_device):
    """DirectCLRLoss(sub_dim) on the triton backend: the reference value, and dL/dr[:, sub_dim:] exactly 0."""
    batch = on_device(make_batch("info_nce", 13, 17, seed=4), triton_device)
    module = fastcl.DirectCLRLoss(sub_dim=6, temperature=0.1, backend="triton")
    ours = run(lambda r1, r2, temperature: module(r1, r2), batch, 0.1, torch.float32)
    truth = reference_of("info_nce", batch, 0.1, torch.float32, sub_dim=6)
    assert relative_error(ours.loss.cpu(), truth.loss) <= 1e-5
    for g, g_ref in zip(ours.grads, truth.grads):
        assert torch.count_nonzero(g[:, 6:]) == 0
        assert torch.count_nonzero(g[:, :6]) > 0
        assert relative_error(g.cpu(), g_ref) <= 1e-5


def test_strided_inputs_match_contiguous(triton_device):
    """A transposed buffer read every other column: row and feature strides ≠ (D, 1), no copy needed."""
    batch = on_device(make_batch("info_nce", 11, 34, seed=5), triton_device)
    strided = Batch(tuple(t.T.contiguous().T[:, ::2] for t in batch.tensors))
    contiguous = Batch(tuple(t[:, ::2].contiguous() for t in batch.tensors))
    assert not strided.tensors[0].is_contiguous() and strided.tensors[0].stride() == (1, 22)
    loss = backend_loss("info_nce", "triton")
    a = run(loss, strided, torch.tensor(0.2), torch.float64, normalize=False)
    b = run(loss, contiguous, torch.tensor(0.2), torch.float64, normalize=False)
    assert relative_error(a.loss, b.loss) <= 1e-14 and relative_error(a.tau_grad, b.tau_grad) <= 1e-14
    for g, h in zip(a.grads, b.grads):
        assert relative_error(g, h) <= 1e-14


def test_backward_is_deterministic(triton_device):
    batch = on_device(make_batch("info_nce", 37, 3, seed=2), triton_device)
    first = run(backend_loss("info_nce", "triton"), batch, torch.tensor(0.1), torch.float32)
    second = run(backend_loss("info_nce", "triton"), batch, torch.tensor(0.1), torch.float32)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.tau_grad, second.tau_grad)
    assert all(torch.equal(g, h) for g, h in zip(first.grads, second.grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_inputs_no_worse_than_naive(dtype, triton_device):
    """Loss, gradients and dL/dτ within (naive PyTorch in the same dtype vs float64) + 1e-2."""
    batch = make_batch("info_nce", 13, 33, seed=7)
    tau = torch.tensor(0.1)
    truth = reference_of("info_nce", batch, tau, dtype)
    on = on_device(batch, triton_device)
    ours = run(backend_loss("info_nce", "triton"), on, tau, dtype)
    baseline = run(naive_info_nce, on, tau, dtype)
    assert_no_worse_than_naive(ours, baseline, truth, dtype, check_tau_grad=True)


# --- GPU only: large shapes, wide rows, memory, tf32, torch.compile ---------------------------------

CUDA = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_large_batch_matches_torch_backend(dtype, rtol, symmetric):
    """N = 65 536, D = 128: triton vs the chunked torch backend on the same GPU inputs (loss, dq, dk, dL/dτ)."""
    batch = on_device(make_batch("info_nce", 65536, 128, seed=3), CUDA)
    ours = run(backend_loss("info_nce", "triton"), batch, torch.tensor(0.1), dtype, symmetric=symmetric)
    expected = run(backend_loss("info_nce", "torch"), batch, torch.tensor(0.1), dtype, symmetric=symmetric)
    assert relative_error(ours.loss, expected.loss) <= rtol
    assert relative_error(ours.tau_grad, expected.tau_grad) <= rtol
    for g, h in zip(ours.grads, expected.grads):
        assert relative_error(g, h) <= rtol


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [360, 1000, 4096])
def test_wide_features_match_torch_backend(dim):
    """D up to 4096 (360 = DirectCLR's prefix): many BLOCK_D chunks and several BLOCK_DO output slices."""
    batch = on_device(make_batch("info_nce", 1000, dim, seed=dim), CUDA)
    ours = run(backend_loss("info_nce", "triton"), batch, torch.tensor(0.1), torch.float32)
    expected = run(backend_loss("info_nce", "torch"), batch, torch.tensor(0.1), torch.float32)
    assert relative_error(ours.loss, expected.loss) <= 1e-5
    for g, h in zip(ours.grads, expected.grads):
        assert relative_error(g, h) <= 1e-5


@pytest.mark.gpu
def test_large_batch_is_deterministic():
    batch = on_device(make_batch("info_nce", 20000, 128, seed=9), CUDA)
    first = run(backend_loss("info_nce", "triton"), batch, 0.1, torch.bfloat16)
    second = run(backend_loss("info_nce", "triton"), batch, 0.1, torch.bfloat16)
    assert torch.equal(first.loss, second.loss)
    assert all(torch.equal(g, h) for g, h in zip(first.grads, second.grads))


@pytest.mark.gpu
def test_fp32_precision_settings():
    """fp32 rows: tf32x3 by default and ieee on request both match the float64 formula to fp32 accuracy;
    tf32 (on request) to 1e-2."""
    batch = on_device(make_batch("info_nce", 4096, 256, seed=1), CUDA)
    truth = reference_of("info_nce", Batch(tuple(t.cpu() for t in batch.tensors)), 0.1, torch.float32)
    previous = torch.backends.cuda.matmul.fp32_precision
    results = {}
    try:
        for setting in ("none", "ieee", "tf32"):
            torch.backends.cuda.matmul.fp32_precision = setting
            results[setting] = run(backend_loss("info_nce", "triton"), batch, 0.1, torch.float32)
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    for setting in ("none", "ieee"):
        assert relative_error(results[setting].loss.cpu(), truth.loss) <= 1e-5
        for g, h in zip(results[setting].grads, truth.grads):
            assert relative_error(g.cpu(), h) <= 1e-5
    assert relative_error(results["tf32"].loss.cpu(), truth.loss) <= 1e-2


@pytest.mark.gpu
def test_memory_beyond_inputs_and_grads():
    """N = 262 144, D = 128 (bf16, normalize=False so the kernels read the inputs themselves): peak
    allocation beyond the inputs and their gradients ≤ 64 MB (the partials take (G + C)·N floats)."""
    n, d = 262144, 128
    q = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    fastcl.functional.info_nce(q[:64], k[:64], normalize=False, backend="triton").backward()  # compile, autotune
    q.grad = k.grad = None
    torch.cuda.synchronize()
    grads = q.numel() * q.element_size() + k.numel() * k.element_size()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fastcl.functional.info_nce(q, k, normalize=False, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline - grads
    assert extra <= 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and grads"


@pytest.mark.gpu
def test_compiled_model_has_no_graph_break():
    """torch.compile(fullgraph=True) of a model step that calls the triton loss: same loss and weight grad."""
    model = torch.nn.Linear(64, 32).to(CUDA)
    loss_fn = fastcl.InfoNCELoss(temperature=0.1, backend="triton")

    def step(x1, x2):
        return loss_fn(model(x1), model(x2))

    x1, x2 = torch.randn(300, 64, device=CUDA), torch.randn(300, 64, device=CUDA)
    eager = step(x1, x2)
    eager.backward()
    eager_grad, model.weight.grad = model.weight.grad.clone(), None
    compiled = torch.compile(step, fullgraph=True)(x1, x2)
    compiled.backward()
    assert relative_error(compiled.detach(), eager.detach()) <= 1e-5
    assert relative_error(model.weight.grad, eager_grad) <= 1e-5
