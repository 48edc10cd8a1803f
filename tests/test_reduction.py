"""``reduction`` and ``weight`` (docs/spec.md, "Reductions and weights") against the float64 formulas.

Every loss of the registry with every reduction ("mean", "sum", "none") and no weight, a per-sample
weight [N] or a per-anchor weight (the "none" output's shape), on odd shapes at τ = 0.01 (a tensor τ, so
dL/dτ is checked) on every backend that runs here (Triton through TRITON_INTERPRET=1). An upstream
gradient drawn at random for "none" makes every anchor's backward coefficient different, as a weighted
sum does for "mean" / "sum"; the inputs' gradients, dL/dτ and dL/dweight are compared with autograd
through the float64 formulas (fastcl.reference). Gather and ring modes: tests/test_distributed.py.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from loss_cases import Batch, make_batch, relative_error

import fastcl
from fastcl import dispatch, registry

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
BACKENDS = [b for b in ("torch", "triton") if dispatch.unavailable_reason(b, torch.device("cpu")) is None]
TAU = 0.01

# (loss, make_batch arguments, loss options): the options that change which anchors count.
CASES = [
    ("nt_xent", {}, {}),
    ("nt_xent", {}, {"sub_dim": 4}),
    ("info_nce", {}, {}),
    ("info_nce", {}, {"symmetric": False}),
    ("supcon", {"views": 3}, {}),
    ("supcon", {"views": 3}, {"contrast_mode": "one"}),
    ("supcon", {"views": 2, "targets": "soft_mask"}, {"positives_missing": "zero"}),
    ("supcon", {"views": 1, "n_classes": 3}, {}),  # lone samples: anchors without positives (ℓ = 0)
    ("dcl", {}, {}),
    ("dcl", {}, {"weight_sigma": 0.5}),
    ("siglip", {}, {"logit_bias": -3.0}),
]


def _case_id(case) -> str:
    loss, batch_args, options = case
    return "-".join([loss] + [f"{k}={v}" for k, v in {**batch_args, **options}.items()])


def _run(fn, batch: Batch, dtype, options, weight, upstream):
    """(output, input grads, dL/dτ, dL/dweight) of Σ upstream·fn(...) on fresh leaves in ``dtype``."""
    leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in batch.tensors]
    tau = torch.tensor(TAU, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    w = None if weight is None else weight.detach().clone().requires_grad_()
    out = fn(*leaves, temperature=tau, **batch.targets, weight=w, **options)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), [x.grad for x in leaves], tau.grad, None if w is None else w.grad


def _weight(kind: str, n: int, anchors_shape: tuple[int, ...], gen: torch.Generator):
    if kind == "none":
        return None
    shape = (n,) if kind == "per-sample" else anchors_shape
    return torch.rand(shape, generator=gen, dtype=torch.float64) * 2  # in [0, 2): some ~0, some > 1


def _as_anchors(weight, anchors_shape, loss: str):
    """A per-sample weight broadcast to the per-anchor shape (SupCon's samples are rows, the others' columns)."""
    if weight.shape == anchors_shape:
        return weight
    return weight[:, None].expand(anchors_shape) if loss == "supcon" else weight.expand(anchors_shape)


# (backend, dtype, weight kind). The interpreter is slow, and float64 is the exact check of the Triton
# kernels' semantics (their float32 accuracy at τ = 0.01 is tests/test_triton_*.py's): Triton runs
# float64 without weights and with per-anchor weights.
RUNS = [
    pytest.param(backend, dtype, kind, id=f"{backend}-{str(dtype)[6:]}-{kind}")
    for backend in BACKENDS
    for dtype in (torch.float64, torch.float32)
    for kind in ("none", "per-sample", "per-anchor")
    if backend == "torch" or (dtype == torch.float64 and kind != "per-sample")
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend, dtype, weight_kind", RUNS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_reduction_and_weight_match_reference(case, backend, dtype, weight_kind, reduction):
    loss, batch_args, options = case
    entry = registry.get(loss)
    n = 7  # odd; D = 9
    seed = zlib.crc32(f"{_case_id(case)}-{reduction}-{weight_kind}".encode())
    batch = make_batch(loss, n, 9, seed=seed, **batch_args)
    rounded = Batch(tuple(t.to(dtype).double() for t in batch.tensors), batch.targets)
    per_anchor = entry.reference(*rounded.tensors, **batch.targets, temperature=TAU, reduction="none", **options)
    anchors_shape = tuple(per_anchor.shape)
    gen = torch.Generator().manual_seed(seed)
    weight = _weight(weight_kind, n, anchors_shape, gen)
    upstream = torch.randn(anchors_shape if reduction == "none" else (), generator=gen, dtype=torch.float64)

    fn = lambda *a, **k: entry.functional(*a, backend=backend, reduction=reduction, **k)  # noqa: E731
    ref = lambda *a, **k: entry.reference(*a, reduction=reduction, **k)  # noqa: E731
    out, grads, tau_grad, weight_grad = _run(fn, batch, dtype, options, weight, upstream)
    expected = _run(ref, rounded, torch.float64, options, weight, upstream)

    assert out.shape == expected[0].shape == (anchors_shape if reduction == "none" else ())
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = RTOL[dtype]
    assert relative_error(out, expected[0], floor=1.0) <= rtol
    for i, (g, g_ref) in enumerate(zip(grads, expected[1])):
        assert relative_error(g, g_ref) <= rtol, f"input {i}"
    # dL/dτ sums each anchor's upstream coefficient times dℓ_a/dτ, of size ~|ℓ_a|/τ (logits of size
    # 1/τ): with random-sign coefficients the sum cancels, so it is measured against Σ_a |coef_a·ℓ_a|/τ.
    coefficient = upstream.abs() * (1.0 if weight is None else _as_anchors(weight, anchors_shape, loss))
    if reduction == "mean":
        coefficient = coefficient / per_anchor.numel()
    tau_floor = (coefficient * per_anchor.detach().abs()).sum().item() / TAU
    assert relative_error(tau_grad, expected[2], tau_floor) <= rtol
    if weight is not None:
        assert relative_error(weight_grad, expected[3]) <= rtol


def test_none_is_the_mean_and_sum_unreduced():
    """The three reductions are one set of per-anchor losses: mean = Σ/#anchors, sum = Σ (NT-Xent)."""
    z1, z2 = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    per_anchor = fastcl.functional.nt_xent(z1, z2, 0.2, reduction="none")
    assert per_anchor.shape == (2, 5)
    torch.testing.assert_close(per_anchor.mean(), fastcl.functional.nt_xent(z1, z2, 0.2), rtol=1e-12, atol=0)
    torch.testing.assert_close(per_anchor.sum(), fastcl.functional.nt_xent(z1, z2, 0.2, reduction="sum"))


def test_modules_take_reduction_and_weight():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    w = torch.rand(6)
    expected = fastcl.functional.nt_xent(z1, z2, 0.5, reduction="sum", weight=w)
    torch.testing.assert_close(fastcl.NTXentLoss(0.5, reduction="sum")(z1, z2, weight=w), expected)
    features, labels = torch.randn(6, 2, 8), torch.arange(6) % 3
    assert fastcl.SupConLoss(reduction="none")(features, labels).shape == (6, 2)
    assert fastcl.SigLIPLoss(reduction="none")(z1, z2).shape == (6,)
    assert fastcl.InfoNCELoss(reduction="none", symmetric=False)(z1, z2).shape == (6,)
    assert fastcl.DCLLoss(reduction="none")(z1, z2).shape == (2, 6)


@pytest.mark.parametrize(
    "call, exception, parts",
    [
        (lambda z: fastcl.functional.nt_xent(z, z, reduction="avg"), ValueError, ["reduction", "'avg'"]),
        (lambda z: fastcl.functional.nt_xent(z, z, weight=torch.ones(3)), ValueError, ["weight", "(4,)", "(3,)"]),
        (lambda z: fastcl.functional.info_nce(z, z, weight=torch.ones(4, 2)), ValueError, ["weight", "(2, 4)"]),
        (lambda z: fastcl.functional.siglip(z, z, weight=torch.ones(4, dtype=torch.int64)), TypeError, ["weight"]),
        (lambda z: fastcl.functional.dcl(z, z, weight=[1.0] * 4), TypeError, ["weight", "list"]),
    ],
    ids=["unknown-reduction", "weight-length", "weight-not-transposed", "weight-int", "weight-list"],
)
def test_bad_reduction_or_weight_names_the_argument(call, exception, parts):
    with pytest.raises(exception) as info:
        call(torch.randn(4, 8))
    message = str(info.value)
    assert message.startswith(parts[0]), message
    assert all(part in message for part in parts[1:]), message
