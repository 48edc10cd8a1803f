"""SupCon on the Triton backend (through TRITON_INTERPRET=1 on CPU) vs the float64 SPEC formula and the
torch backend: labels / asymmetric mask / neither, contrast_mode all / one, anchors without positives,
values, input gradients and dL/dτ. N = 13 samples, so M = 26 or 39 rows: no multiple of any tile. The
view-major rows are read in place from features [N, V, D] with any strides (sub_dim prefix, fused
normalization, clamped norms).
"""

from __future__ import annotations

import pytest
import torch
from loss_cases import assert_no_worse_than_naive, make_batch, reference_of, relative_error, run
from test_triton_ntxent import (
    RTOL,
    assert_results_close,
    assert_triton_matches,
    backend_loss,
    every_other,
    laid_out,
    on_device,
    transposed,
)

from fastcl.reference import naive_supcon

pytestmark = pytest.mark.triton

CASES = [
    # (D, temperature, options); "views" and "targets" shape the batch, the rest goes to the loss.
    (17, torch.tensor(0.1), {"targets": "labels"}),
    (3, 0.01, {"targets": "labels", "views": 3, "base_temperature": 0.5}),
    (17, torch.tensor(0.1), {"targets": "mask", "views": 3}),
    (64, 0.5, {"targets": "mask", "contrast_mode": "one"}),
    (17, torch.tensor(0.3), {"targets": None, "views": 3, "contrast_mode": "one"}),
    (17, torch.tensor(0.1), {"targets": "labels", "views": 3, "contrast_mode": "one"}),
    (17, torch.tensor(0.5), {"targets": "labels", "sub_dim": 4, "base_temperature": 1.0}),
    (17, torch.tensor(5.0), {"targets": "labels", "normalize": False}),
    # τ = 0.01 through the mask path and the non-anchor views' class-sum path ("one").
    (17, torch.tensor(0.01), {"targets": "mask", "views": 3, "contrast_mode": "one"}),
    (17, torch.tensor(0.01), {"targets": "labels", "views": 3, "contrast_mode": "one"}),
]
_BATCH_KEYS = ("views", "targets")


def _case_id(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor({float(value):g})"
    if isinstance(value, dict):
        return "-".join(f"{k}={v}" for k, v in value.items())
    return repr(value)


@pytest.mark.parametrize("dim, tau, options", CASES, ids=_case_id)
def test_matches_reference_and_torch_backend(dim, tau, options, triton_device):
    batch = make_batch("supcon", 13, dim, seed=dim, **{k: v for k, v in options.items() if k in _BATCH_KEYS})
    loss_options = {k: v for k, v in options.items() if k not in _BATCH_KEYS}
    assert_triton_matches("supcon", batch, tau, torch.float32, triton_device, RTOL[torch.float32], **loss_options)


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_float64_mask(contrast_mode, triton_device):
    batch = make_batch("supcon", 13, 17, views=3, targets="mask", seed=4)
    assert_triton_matches(
        "supcon",
        batch,
        torch.tensor(0.05),
        torch.float64,
        triton_device,
        RTOL[torch.float64],
        contrast_mode=contrast_mode,
    )


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_anchors_without_positives_are_left_out(contrast_mode, triton_device):
    """One view: samples 0, 3 and 7 are alone in their class, so they have no positive and drop out."""
    batch = make_batch("supcon", 13, 17, views=1, targets=None, seed=9)
    batch.targets["labels"] = torch.tensor([10, 1, 1, 11, 2, 2, 2, 12, 1, 3, 3, 4, 4])
    assert_triton_matches(
        "supcon",
        batch,
        torch.tensor(0.2),
        torch.float32,
        triton_device,
        RTOL[torch.float32],
        contrast_mode=contrast_mode,
    )


def test_no_positive_at_all_gives_zero_loss_and_gradients(triton_device):
    batch = on_device(make_batch("supcon", 7, 5, views=1, targets=None, seed=3), triton_device)
    batch.targets["labels"] = torch.arange(7, device=triton_device)
    ours = run(backend_loss("supcon", "triton"), batch, torch.tensor(0.1), torch.float32)
    assert ours.loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in ours.grads)
    assert ours.tau_grad.item() == 0.0


def test_strided_inputs_match_contiguous(triton_device):
    """Features [N, V, D] as every other column of a wider buffer: strided rows, read in place."""
    batch = on_device(make_batch("supcon", 11, 17, views=3, seed=5), triton_device)
    a = run(
        laid_out(backend_loss("supcon", "triton"), every_other),
        batch,
        torch.tensor(0.2),
        torch.float64,
        normalize=False,
    )
    b = run(backend_loss("supcon", "triton"), batch, torch.tensor(0.2), torch.float64, normalize=False)
    assert relative_error(a.loss, b.loss) <= 1e-14
    assert relative_error(a.grads[0], b.grads[0]) <= 1e-14


@pytest.mark.parametrize(
    "layout, dtype, tau, options, rtol",
    [
        (transposed, torch.float32, torch.tensor(0.01), {"targets": "labels"}, 1e-5),
        (
            every_other,
            torch.float64,
            torch.tensor(2.0),
            {"targets": "mask", "normalize": False, "contrast_mode": "one"},
            1e-10,
        ),
        (transposed, torch.bfloat16, torch.tensor(0.1), {"targets": "labels"}, 2e-2),
    ],
    ids=["transposed-f32-tau0.01", "every-other-f64-unnormalized-mask-one", "transposed-bf16"],
)
def test_sub_dim_of_wide_strided_rows(layout, dtype, tau, options, rtol, triton_device):
    """D = 40, sub_dim = 17, V = 3, features a transposed buffer (strides (1, N, N·V)) or every other column
    of an 80-wide one: vs the float64 formula and the torch backend on the same views."""
    batch = make_batch("supcon", 13, 40, views=3, targets=options.pop("targets"), seed=12)
    on = on_device(batch, triton_device)
    options["sub_dim"] = 17
    ours = run(laid_out(backend_loss("supcon", "triton"), layout), on, tau, dtype, **options)
    assert ours.grads[0].dtype == dtype and torch.count_nonzero(ours.grads[0][..., 17:]) == 0
    assert_results_close(ours, reference_of("supcon", batch, tau, dtype, **options), rtol, "vs float64 reference", tau)
    torch_backend = laid_out(backend_loss("supcon", "torch"), layout)
    assert_results_close(ours, run(torch_backend, on, tau, dtype, **options), rtol, "vs torch backend", tau)


def test_rows_with_clamped_norm(triton_device):
    """Sample 2's view 1 ×1e-14 and sample 6's view 0 all zero: clamped norms (gradient only scaled by
    1/eps). Their gradients are ~1e12 × the others', so each group is compared on its own scale."""
    batch = make_batch("supcon", 13, 17, seed=6)
    batch.tensors[0][2, 1] *= 1e-14
    batch.tensors[0][6, 0] = 0.0
    tau = torch.tensor(0.1)
    ours = run(backend_loss("supcon", "triton"), on_device(batch, triton_device), tau, torch.float64)
    (g,) = ours.grads
    tiny = torch.zeros(13, 2, dtype=torch.bool)
    tiny[2, 1] = tiny[6, 0] = True
    for truth in (
        reference_of("supcon", batch, tau, torch.float64),
        run(backend_loss("supcon", "torch"), batch, tau, torch.float64),
    ):
        assert relative_error(ours.loss.cpu(), truth.loss) <= RTOL[torch.float64]
        assert relative_error(ours.tau_grad.cpu(), truth.tau_grad) <= RTOL[torch.float64]
        (g_ref,) = truth.grads
        for rows in (tiny, ~tiny):
            assert relative_error(g.cpu()[rows], g_ref[rows]) <= RTOL[torch.float64]


def test_gradient_beyond_sub_dim_is_exactly_zero(triton_device):
    batch = on_device(make_batch("supcon", 9, 20, seed=11), triton_device)
    (g,) = run(backend_loss("supcon", "triton"), batch, 0.5, torch.float32, sub_dim=6).grads
    assert torch.count_nonzero(g[..., 6:]) == 0
    assert torch.count_nonzero(g[..., :6]) > 0


def test_backward_is_deterministic(triton_device):
    batch = on_device(make_batch("supcon", 13, 17, views=3, targets="mask", seed=2), triton_device)
    first = run(backend_loss("supcon", "triton"), batch, 0.1, torch.float32)
    second = run(backend_loss("supcon", "triton"), batch, 0.1, torch.float32)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.grads[0], second.grads[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_inputs_no_worse_than_naive(dtype, triton_device):
    batch = make_batch("supcon", 13, 64, seed=7)
    tau = 0.1
    truth = reference_of("supcon", batch, tau, dtype)
    on = on_device(batch, triton_device)
    ours = run(backend_loss("supcon", "triton"), on, tau, dtype)
    baseline = run(lambda features, temperature, labels: naive_supcon(features, labels, temperature), on, tau, dtype)
    assert_no_worse_than_naive(ours, baseline, truth, dtype)


# --- GPU only: large shapes and memory --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "targets, contrast_mode, n", [("labels", "all", 32768), ("mask", "one", 8192)], ids=["labels-all", "mask-one"]
)
def test_large_batch_matches_torch_backend(targets, contrast_mode, n):
    """M = 65 536 rows (labels, 2 views) and a 8192² asymmetric mask: triton vs the torch backend on the GPU."""
    batch = on_device(
        make_batch("supcon", n, 128, views=65536 // n, targets=targets, n_classes=100, seed=3), torch.device("cuda")
    )
    ours = run(backend_loss("supcon", "triton"), batch, torch.tensor(0.1), torch.float32, contrast_mode=contrast_mode)
    expected = run(
        backend_loss("supcon", "torch"), batch, torch.tensor(0.1), torch.float32, contrast_mode=contrast_mode
    )
    assert relative_error(ours.loss.cpu(), expected.loss.cpu()) <= 1e-5
    assert relative_error(ours.grads[0].cpu(), expected.grads[0].cpu()) <= 1e-5
    assert relative_error(ours.tau_grad.cpu(), expected.tau_grad.cpu()) <= 1e-4


@pytest.mark.gpu
def test_memory_beyond_inputs_and_grads():
    """M = 262 144 rows (N = 131 072, 2 views), D = 128, bf16: peak beyond inputs and gradients ≤ 64 MB."""
    features = torch.randn(131072, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (131072,), device="cuda")
    loss_fn = backend_loss("supcon", "triton")
    loss_fn(features[:64], labels[:64]).backward()  # compile and autotune first
    features.grad = None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()  # the inputs
    torch.cuda.reset_peak_memory_stats()
    loss_fn(features, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline - features.numel() * features.element_size()
    assert extra <= 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and grads"
