"""The registry's losses on the torch backend against their float64 formulas (fastcl.reference).

Values, input gradients and dL/dτ: ≤ 1e-10 relative in float64, ≤ 1e-5 relative in float32 (∞-norm
relative error, see loss_cases.relative_error); 16-bit inputs no worse than naive PyTorch in that dtype.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from loss_cases import (
    LOSSES,
    OURS,
    Batch,
    assert_matches_reference,
    assert_no_worse_than_naive,
    make_batch,
    reference_of,
    relative_error,
    run,
)

import fastcl
from fastcl import registry
from fastcl.torch_backend import chunk_size

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]

# (loss, options, temperature): every option of every loss. A tensor temperature also checks dL/dτ.
OPTION_CASES = [
    ("nt_xent", {}, 0.5),
    ("nt_xent", {}, torch.tensor(0.01)),
    ("nt_xent", {"sub_dim": 5}, torch.tensor(0.2)),
    ("nt_xent", {"normalize": False}, torch.tensor(4.0)),
    ("info_nce", {}, torch.tensor(0.01)),
    ("info_nce", {"symmetric": False}, torch.tensor(0.1)),
    ("info_nce", {"symmetric": False, "sub_dim": 1, "normalize": False}, 0.3),
    ("info_nce", {"sub_dim": 9, "normalize": False}, torch.tensor(4.0)),
    ("supcon", {"targets": "labels"}, torch.tensor(0.07)),
    ("supcon", {"targets": "labels", "views": 3, "base_temperature": 0.5}, torch.tensor(0.01)),
    ("supcon", {"targets": "mask", "views": 3}, torch.tensor(0.1)),
    ("supcon", {"targets": None, "views": 3}, torch.tensor(0.2)),
    ("supcon", {"targets": "labels", "views": 1}, torch.tensor(0.1)),
    ("supcon", {"targets": "labels", "views": 3, "contrast_mode": "one"}, torch.tensor(0.1)),
    ("supcon", {"targets": "mask", "contrast_mode": "one"}, 0.5),
    ("supcon", {"targets": None, "views": 4, "contrast_mode": "one"}, torch.tensor(0.3)),
    ("supcon", {"targets": "labels", "sub_dim": 4, "base_temperature": 1.0}, torch.tensor(0.5)),
    ("supcon", {"targets": "labels", "normalize": False}, torch.tensor(5.0)),
    # single-process options only the block engine has (soft weights, SupContrast's mean over all anchors)
    ("supcon", {"targets": "bool_mask", "views": 3}, torch.tensor(0.1)),
    ("supcon", {"targets": "soft_mask", "views": 3}, torch.tensor(0.07)),
    ("supcon", {"targets": "soft_mask", "contrast_mode": "one", "positives_missing": "zero"}, torch.tensor(0.2)),
    ("supcon", {"targets": "labels", "views": 1, "positives_missing": "zero"}, torch.tensor(0.01)),
    ("supcon", {"targets": "mask", "views": 1, "positives_missing": "zero", "sub_dim": 3}, 0.5),
    ("dcl", {}, torch.tensor(0.1)),
    ("dcl", {"sub_dim": 5, "normalize": False}, torch.tensor(2.0)),
    ("dcl", {}, torch.tensor(0.01)),
    ("dcl", {"weight_sigma": 0.5}, torch.tensor(0.1)),  # DCLW
    ("dcl", {"weight_sigma": 0.05, "sub_dim": 7}, torch.tensor(0.3)),
    # SigLIP: τ = 1/t, t up to 100, b in [−20, 0]
    ("siglip", {}, torch.tensor(0.1)),
    ("siglip", {"logit_bias": -20.0}, torch.tensor(0.01)),
    ("siglip", {"logit_bias": 0.0, "sub_dim": 4}, torch.tensor(1.0)),
    ("siglip", {"logit_bias": -5.0, "normalize": False}, torch.tensor(3.0)),
]


def _split(options: dict) -> tuple[dict, dict]:
    """Separates make_batch's arguments (views, targets) from the loss's keyword options."""
    batch_keys = {"views", "targets"}
    return {k: v for k, v in options.items() if k in batch_keys}, {
        k: v for k, v in options.items() if k not in batch_keys
    }


def _case_id(case) -> str:
    loss, options, tau = case
    tau_text = f"tau_tensor={float(tau):g}" if isinstance(tau, torch.Tensor) else f"tau={tau:g}"
    return "-".join([loss, tau_text] + [f"{k}={v}" for k, v in options.items()])


@pytest.mark.parametrize(
    "case, dtype",
    [pytest.param(c, dt, id=f"{_case_id(c)}-{str(dt)[6:]}") for c in OPTION_CASES for dt in DTYPES],
)
def test_every_option_matches_reference(case, dtype):
    loss, options, tau = case
    batch_args, loss_options = _split(options)
    # N = 13 (odd): M = 39 rows for SupCon with 3 views, 13 for InfoNCE, 26 for NT-Xent; D = 17.
    batch = make_batch(loss, 13, 17, seed=zlib.crc32(_case_id(case).encode()), **batch_args)
    # SupCon's dL/dτ = L/τ − Σ G·s/τ is a difference of terms ~100× its size at τ = 0.01, so in float32
    # it is measured against |L|/τ: naive fp32 autograd (SupContrast) misses 1e-5 relative there too.
    supcon_fp32 = loss == "supcon" and dtype == torch.float32
    assert_matches_reference(loss, batch, tau, dtype, RTOL[dtype], tau_grad_against_loss=supcon_fp32, **loss_options)


@pytest.mark.parametrize("dim", [1, 3, 17, 128, 2048])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_feature_dims_match_reference(loss, dim, dtype):
    # τ = 0.1 here; τ = 0.01 is covered per option above. A normalized single feature is ±1 whatever its
    # value (zero gradient, see the next test), so D = 1 runs unnormalized to test a real gradient.
    batch = make_batch(loss, 7, dim, views=3, seed=dim)
    assert_matches_reference(loss, batch, torch.tensor(0.1), dtype, RTOL[dtype], normalize=dim > 1)


@pytest.mark.parametrize("loss", LOSSES)
def test_single_normalized_feature(loss):
    """D' = 1 normalized: the loss of ±1 rows; the exact input gradient is 0 (errors measured against 1)."""
    batch = make_batch(loss, 7, 5, views=3, seed=1)
    assert_matches_reference(
        loss, batch, torch.tensor(0.1), torch.float64, RTOL[torch.float64], grad_floor=1.0, sub_dim=1
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_float_and_tensor_temperature_agree(loss):
    batch = make_batch(loss, 9, 12, seed=3)
    as_float = run(OURS[loss], batch, 0.25, torch.float64)
    as_tensor = run(OURS[loss], batch, torch.tensor(0.25), torch.float64)
    assert relative_error(as_float.loss, as_tensor.loss) <= 1e-14
    for g, h in zip(as_float.grads, as_tensor.grads):
        assert relative_error(g, h) <= 1e-14


@pytest.mark.parametrize("rows_per_block", [1, 4, 7])
@pytest.mark.parametrize(
    "loss, options",
    [
        ("nt_xent", {}),
        ("info_nce", {}),
        ("info_nce", {"symmetric": False}),
        ("supcon", {"targets": "labels", "views": 3}),
        ("supcon", {"targets": "mask", "views": 3, "contrast_mode": "one"}),
    ],
    ids=["nt_xent", "info_nce", "info_nce-asym", "supcon-labels", "supcon-mask-one"],
)
def test_multi_block_paths_match_reference(loss, options, rows_per_block):
    """Forces many row blocks (the last one partial) so the online merges and block offsets are exercised."""
    batch_args, loss_options = _split(options)
    batch = make_batch(loss, 11, 10, seed=rows_per_block, **batch_args)
    with chunk_size(rows_per_block):
        assert_matches_reference(loss, batch, torch.tensor(0.05), torch.float64, RTOL[torch.float64], **loss_options)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_beyond_sub_dim_is_exactly_zero(loss, normalize):
    sub_dim = 6
    batch = make_batch(loss, 8, 20, seed=11)
    ours = run(OURS[loss], batch, 0.5, torch.float32, sub_dim=sub_dim, normalize=normalize)
    for g in ours.grads:
        assert torch.count_nonzero(g[..., sub_dim:]) == 0
        assert torch.count_nonzero(g[..., :sub_dim]) > 0


@pytest.mark.parametrize("loss", LOSSES)
def test_strided_inputs_match_contiguous(loss):
    """Non-contiguous views (a transposed buffer, every other column) give the contiguous result."""
    batch = make_batch(loss, 9, 14, seed=5)
    strided = Batch(
        tuple(t.transpose(0, -1).contiguous().transpose(0, -1)[..., ::2] for t in batch.tensors), batch.targets
    )
    contiguous = Batch(tuple(t[..., ::2].contiguous() for t in batch.tensors), batch.targets)
    assert not strided.tensors[0].is_contiguous()
    a = run(OURS[loss], strided, torch.tensor(0.2), torch.float64)
    b = run(OURS[loss], contiguous, torch.tensor(0.2), torch.float64)
    assert relative_error(a.loss, b.loss) <= 1e-14
    for g, h in zip(a.grads, b.grads):
        assert relative_error(g, h) <= 1e-14


# --- 16-bit inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss", LOSSES)
def test_16bit_inputs_no_worse_than_naive(loss, dtype):
    batch = make_batch(loss, 24, 64, seed=7)
    tau = 0.1
    truth = reference_of(loss, batch, tau, dtype)
    ours = run(OURS[loss], batch, tau, dtype)
    baseline = run(registry.get(loss).naive, batch, tau, dtype)
    assert_no_worse_than_naive(ours, baseline, truth, dtype)


# --- modules ----------------------------------------------------------------------------------------

MODULE_CASES = [
    ("nt_xent", fastcl.NTXentLoss(temperature=0.3, sub_dim=7, backend="torch"), {"temperature": 0.3, "sub_dim": 7}),
    ("nt_xent", fastcl.NTXentLoss(normalize=False, backend="torch"), {"normalize": False}),
    ("info_nce", fastcl.InfoNCELoss(symmetric=False, backend="torch"), {"symmetric": False}),
    (
        "info_nce",
        fastcl.InfoNCELoss(temperature=0.2, normalize=False, backend="torch"),
        {"temperature": 0.2, "normalize": False},
    ),
    ("info_nce", fastcl.DirectCLRLoss(sub_dim=5, backend="torch"), {"temperature": 0.1, "sub_dim": 5}),
    ("info_nce", fastcl.DirectCLRLoss(sub_dim=9, temperature=0.2, backend="torch"), {"temperature": 0.2, "sub_dim": 9}),
    (
        "supcon",
        fastcl.SupConLoss(temperature=0.1, base_temperature=0.5, contrast_mode="one", sub_dim=8, backend="torch"),
        {"temperature": 0.1, "base_temperature": 0.5, "contrast_mode": "one", "sub_dim": 8},
    ),
    ("supcon", fastcl.SupConLoss(normalize=False, backend="torch"), {"normalize": False}),
]


@pytest.mark.parametrize("loss, module, options", MODULE_CASES, ids=[repr(m) for _, m, _ in MODULE_CASES])
def test_modules_equal_functional(loss, module, options):
    """Each module's forward is the functional loss with the module's settings (defaults included)."""
    batch = make_batch(loss, 10, 12, seed=2)
    options = dict(options)
    temperature = options.pop("temperature", None)
    inputs = [t.clone().requires_grad_() for t in batch.tensors]
    from_module = module(*inputs, **batch.targets)
    kwargs = {} if temperature is None else {"temperature": temperature}
    from_functional = OURS[loss](*batch.tensors, **batch.targets, **kwargs, **options)
    assert torch.equal(from_module, from_functional)
    from_module.backward()
    reference_kwargs = {"temperature": temperature if temperature is not None else module.temperature, **options}
    expected = reference_of(loss, batch, reference_kwargs.pop("temperature"), torch.float64, **reference_kwargs)
    assert relative_error(from_module.detach(), expected.loss) <= 1e-10
    for x, g_ref in zip(inputs, expected.grads):
        assert relative_error(x.grad, g_ref) <= 1e-10


# --- gradcheck --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, options",
    [
        ("nt_xent", {"sub_dim": 4}),
        ("info_nce", {}),
        ("info_nce", {"symmetric": False, "normalize": False}),
        ("supcon", {"targets": "labels", "views": 3}),
        ("supcon", {"targets": "mask", "contrast_mode": "one"}),
    ],
    ids=["nt_xent-sub_dim", "info_nce", "info_nce-asym-raw", "supcon-labels", "supcon-mask-one"],
)
def test_gradcheck_float64(loss, options):
    batch_args, loss_options = _split(options)
    batch = make_batch(loss, 5, 6, seed=13, **batch_args)
    inputs = [t.clone().requires_grad_() for t in batch.tensors]
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        return OURS[loss](*args[:-1], temperature=args[-1], **batch.targets, **loss_options)

    assert torch.autograd.gradcheck(fn, (*inputs, tau), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("loss", ["ntxent", "infonce", "supcon"])
def test_autocast_does_not_lower_the_loss_precision(loss):
    """Inside the op autocast is off: fp32 embeddings give the fp32 result under a bf16 autocast region."""
    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(24, 16, generator=gen), torch.randn(24, 16, generator=gen)
    labels = torch.randint(0, 4, (24,), generator=gen)
    compute = {
        "ntxent": lambda: fastcl.functional.nt_xent(a, b, 0.1, backend="torch"),
        "infonce": lambda: fastcl.functional.info_nce(a, b, 0.1, backend="torch"),
        "supcon": lambda: fastcl.functional.supcon(torch.stack([a, b], 1), labels, backend="torch"),
    }[loss]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = compute()
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, compute())


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_smallest_nt_xent_batch(dtype):
    """N = 2 (even, the smallest legal NT-Xent batch: each row has 2 negatives)."""
    batch = make_batch("nt_xent", 2, 5, seed=21)
    assert_matches_reference("nt_xent", batch, torch.tensor(0.1), dtype, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_nt_xent_one_pair_is_zero(dtype):
    """N = 1: each row's only other row is its positive, so ℓ = −s_pos + log exp(s_pos) = 0, gradients 0."""
    batch = make_batch("nt_xent", 1, 5, seed=22)
    result = assert_matches_reference("nt_xent", batch, torch.tensor(0.3), dtype, RTOL[dtype])
    assert result.loss == 0 and all(bool((g == 0).all()) for g in result.grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("keys, targets", [(11, None), (11, "random"), (7, "out-of-range")])
def test_info_nce_explicit_targets_and_more_keys(keys, targets, dtype):
    """Inf-CL's one-way form: Nq = 7 queries against more keys, query i's positive is key targets[i]
    (default i); a target that is no key leaves that query out of the mean."""
    gen = torch.Generator().manual_seed(keys)
    q, k = (
        make_batch("info_nce", 7, 17, seed=keys).tensors[0],
        make_batch("info_nce", keys, 17, seed=keys + 1).tensors[0],
    )
    options = {"symmetric": False}
    if targets is not None:
        options["targets"] = torch.randint(0, keys, (7,), generator=gen)
        if targets == "out-of-range":
            options["targets"][2] = keys + 3
    batch = Batch((q, k))
    tau = torch.tensor(0.05)
    ours, truth = (
        run(OURS["info_nce"], batch, tau, dtype, **options),
        reference_of("info_nce", batch, tau, dtype, **options),
    )
    assert relative_error(ours.loss, truth.loss, floor=1.0) <= RTOL[dtype]
    for g, g_ref in zip(ours.grads, truth.grads):
        assert relative_error(g, g_ref) <= RTOL[dtype]
    assert relative_error(ours.tau_grad, truth.tau_grad) <= RTOL[dtype]


def test_info_nce_paired_targets_equal_the_default():
    """targets = arange(N) is the default pairing: the block-engine path equals the fused local path."""
    q, k = make_batch("info_nce", 9, 6, seed=4).tensors
    default = fastcl.functional.info_nce(q, k, 0.2, symmetric=False, backend="torch")
    explicit = fastcl.functional.info_nce(q, k, 0.2, symmetric=False, targets=torch.arange(9), backend="torch")
    assert relative_error(explicit, default) <= 1e-14


def test_soft_mask_of_zeros_and_ones_equals_the_bool_mask():
    """A float 0/1 mask (block engine, weights) and the same bool mask (fused local path, a set) agree."""
    batch = make_batch("supcon", 8, 6, targets="bool_mask", seed=5)
    as_set = OURS["supcon"](*batch.tensors, mask=batch.targets["mask"])
    as_weights = OURS["supcon"](*batch.tensors, mask=batch.targets["mask"].double())
    assert relative_error(as_weights, as_set) <= 1e-14


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (100.0, -20.0), (1.0, 0.0), (100.0, 0.0)])
def test_siglip_scale_and_bias_gradients(scale, bias, dtype):
    """dL/dt and dL/db (both learnable tensors) against the float64 formula; |t·s + b| up to 120."""
    x, y = make_batch("siglip", 11, 9, seed=int(scale)).tensors
    rtol = RTOL[dtype]
    grads = []
    for fn, work in ((fastcl.functional.siglip, dtype), (registry.get("siglip").reference, torch.float64)):
        t = torch.tensor(scale, dtype=work if work == torch.float64 else torch.float32, requires_grad=True)
        b = torch.tensor(bias, dtype=t.dtype, requires_grad=True)
        xs, ys = x.to(dtype).to(work).requires_grad_(), y.to(dtype).to(work).requires_grad_()
        loss = fn(xs, ys, t, b)
        loss.backward()
        grads.append((loss.detach(), xs.grad, ys.grad, t.grad, b.grad))
    for i, (ours, truth) in enumerate(zip(*grads)):
        assert relative_error(ours, truth, floor=1.0 if i == 0 else 0.0) <= rtol, (i, ours, truth)
