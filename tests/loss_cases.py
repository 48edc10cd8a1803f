"""Shared test plumbing for the loss tests: random batches, running a loss with gradients, error measures.

Every comparison runs fastcl and the float64 formulas of the loss registry (``fastcl.reference``) on the
same values (the reference sees the input rounded to the tested dtype, then widened to float64), and
compares the loss, the gradient of every input and, for a tensor temperature, dL/dτ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from fastcl import registry

LOSSES = tuple(registry.LOSSES)

OURS: dict[str, Callable[..., Tensor]] = {
    name: functools.partial(entry.functional, backend="torch") for name, entry in registry.LOSSES.items()
}
REFERENCE: dict[str, Callable[..., Tensor]] = {name: entry.reference for name, entry in registry.LOSSES.items()}


@dataclass
class Batch:
    """Embeddings of one loss call ((z1, z2), (q, k) or (features,)) and SupCon's labels / mask."""

    tensors: tuple[Tensor, ...]
    targets: dict = field(default_factory=dict)


def make_batch(
    loss: str,
    n: int,
    d: int,
    *,
    views: int = 2,
    targets: Optional[str] = "labels",
    n_classes: Optional[int] = None,
    seed: int = 0,
) -> Batch:
    """Float64 random rows (not normalized, varied norms). ``targets`` (SupCon): "labels", "mask" (float
    0/1), "bool_mask", "soft_mask" or None."""
    gen = torch.Generator().manual_seed(seed)

    def rows(*shape):
        scale = torch.rand(*shape[:-1], 1, generator=gen, dtype=torch.float64) * 3 + 0.1
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    if not registry.get(loss).views_input:
        return Batch((rows(n, d), rows(n, d)))
    batch = Batch((rows(n, views, d),))
    classes = n_classes or max(2, n // 3)
    if targets == "labels":
        batch.targets["labels"] = torch.randint(0, classes, (n,), generator=gen)
    elif targets in ("mask", "bool_mask"):
        # An arbitrary, asymmetric 0/1 mask (SupContrast allows it); the diagonal is random too. A float
        # mask runs the block engine (weights), a bool one the fused local path (a set).
        mask = torch.rand(n, n, generator=gen) < 0.3
        batch.targets["mask"] = mask if targets == "bool_mask" else mask.to(torch.float32)
    elif targets == "soft_mask":  # SupContrast's weighted mask: random weights in [0, 1), about half zero
        weights = torch.rand(n, n, generator=gen, dtype=torch.float64)
        batch.targets["mask"] = torch.where(weights < 0.5, 0.0, weights)
    elif targets is not None:
        raise ValueError(f"targets: expected 'labels', 'mask', 'bool_mask', 'soft_mask' or None, got {targets!r}")
    return batch


@dataclass
class Result:
    loss: Tensor
    grads: list[Tensor]
    tau_grad: Optional[Tensor]


def run(fn: Callable[..., Tensor], batch: Batch, temperature, dtype: torch.dtype, device=None, **options) -> Result:
    """Calls ``fn`` on fresh leaves of ``batch`` in ``dtype`` (on ``device``, default: where they are) and
    back-propagates the loss.

    ``temperature`` is a float, or a tensor: then a fresh leaf requiring grad (float64 for float64 runs,
    else float32) is passed and dL/dτ returned.
    """
    leaves = [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_() for t in batch.tensors]
    targets = {name: t.to(device) for name, t in batch.targets.items()}
    tau = temperature
    if isinstance(temperature, Tensor):
        tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        tau = temperature.detach().to(device=device, dtype=tau_dtype).requires_grad_()
    loss = fn(*leaves, temperature=tau, **targets, **options)
    if not loss.requires_grad:  # the reference's constant 0 when no SupCon anchor has a positive
        return Result(
            loss, [torch.zeros_like(x) for x in leaves], torch.zeros_like(tau) if isinstance(tau, Tensor) else None
        )
    loss.backward()
    return Result(loss.detach(), [x.grad for x in leaves], tau.grad if isinstance(tau, Tensor) else None)


def relative_error(actual: Tensor, expected: Tensor, floor: float = 0.0) -> float:
    """max |actual − expected| / max(max |expected|, floor): the ∞-norm relative error.

    ``floor`` is the scale to measure against where the exact value is 0 (e.g. the gradient through
    normalizing a single feature, x/|x|, which is locally constant).
    """
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item()
    return err / scale if scale > 0 else err


def assert_no_worse_than_naive(
    ours: Result, baseline: Result, truth: Result, dtype: torch.dtype, check_tau_grad: bool = False, slack: float = 1e-2
) -> None:
    """16-bit inputs: fastcl's fp32 loss, its input gradients (in ``dtype``, finite) and optionally dL/dτ
    are no further from the float64 truth than the naive PyTorch loss in the same dtype, plus ``slack``."""
    assert ours.loss.dtype == torch.float32
    assert relative_error(ours.loss.cpu(), truth.loss) <= relative_error(baseline.loss.cpu(), truth.loss) + slack
    if check_tau_grad:
        assert (
            relative_error(ours.tau_grad.cpu(), truth.tau_grad)
            <= relative_error(baseline.tau_grad.cpu(), truth.tau_grad) + slack
        )
    assert len(ours.grads) == len(baseline.grads) == len(truth.grads)
    for g, g_naive, g_ref in zip(ours.grads, baseline.grads, truth.grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert relative_error(g.cpu(), g_ref) <= relative_error(g_naive.cpu(), g_ref) + slack


def reference_of(loss: str, batch: Batch, temperature, dtype: torch.dtype, **options) -> Result:
    """The float64 SPEC formula on the batch rounded to ``dtype`` (what fastcl actually receives)."""
    rounded = Batch(tuple(t.detach().to(dtype).double() for t in batch.tensors), batch.targets)
    return run(REFERENCE[loss], rounded, temperature, torch.float64, **options)


def assert_matches_reference(
    loss: str,
    batch: Batch,
    temperature,
    dtype: torch.dtype,
    rtol: float,
    grad_floor: float = 0.0,
    tau_grad_against_loss: bool = False,
    fn: Optional[Callable[..., Tensor]] = None,
    device=None,
    **options,
) -> Result:
    """fastcl's torch backend vs the float64 formula: loss dtype, value, input gradients, dL/dτ.

    The loss is measured against max(|L|, 1): a loss far below 1 is a difference lse − s_pos of logits
    of size up to 1/τ ≥ 1 (well-separated rows), which no float formula resolves beyond eps/τ.
    ``grad_floor``: see :func:`relative_error`; 0 except where the exact input gradient is 0 (then
    dL/dτ, a sum of logits of size 1/τ weighted by gradients, is measured against grad_floor/τ).
    ``tau_grad_against_loss``: measure dL/dτ against max(|dL/dτ|, |L|/τ) — the size of the two terms
    of SupCon's dL/dτ = L/τ − Σ G·s/τ, which nearly cancel for peaked softmaxes (small τ, raw rows).
    ``fn``: the loss to check (default: the torch backend's), run on ``device``.
    """
    ours = run(fn or OURS[loss], batch, temperature, dtype, device=device, **options)
    ours = Result(
        ours.loss.cpu(), [g.cpu() for g in ours.grads], None if ours.tau_grad is None else ours.tau_grad.cpu()
    )
    truth = reference_of(loss, batch, temperature, dtype, **options)
    assert ours.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours.loss.shape == ()
    assert relative_error(ours.loss, truth.loss, floor=1.0) <= rtol, (ours.loss.item(), truth.loss.item())
    for i, (g, g_ref) in enumerate(zip(ours.grads, truth.grads)):
        assert g.dtype == dtype
        error = relative_error(g, g_ref, grad_floor)
        assert error <= rtol, f"input {i}: relative error {error:.3g}"
    if truth.tau_grad is not None:
        tau_floor = grad_floor / float(temperature)
        if tau_grad_against_loss:
            tau_floor = max(tau_floor, abs(truth.loss.item()) / float(temperature))
        assert relative_error(ours.tau_grad, truth.tau_grad, tau_floor) <= rtol, (
            ours.tau_grad.item(),
            truth.tau_grad.item(),
        )
    return ours
