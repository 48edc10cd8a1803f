"""Modules that own their parameters (docs/spec.md, "Names and owned parameters"), and SupCon on [N, D].

CLIPLoss against CLIP's loss as open_clip computes it (logits t·x̂ŷᵀ both ways, cross-entropy against the
diagonal, averaged) with t = exp(logit_scale): value, input gradients and d/d logit_scale in float64;
open_clip's initial value log(1/0.07) and its clamp of log t to [0, ln 100]. SigLIPLoss(learnable=True)
against fastcl.reference's SigLIP with t = exp(logit_scale) and b, gradients of both. SupConLoss on
[N, D] features with labels equals the one-view [N, 1, D] loss and the float64 formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_cases import relative_error

import fastcl
from fastcl import reference

RTOL = 1e-10


def open_clip_loss(image, text, logit_scale):
    """open_clip's ClipLoss on one process: logit_scale is t (already exponentiated)."""
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    logits_per_image = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def test_clip_loss_owns_open_clips_logit_scale():
    loss_fn = fastcl.CLIPLoss().double()
    assert [name for name, _ in loss_fn.named_parameters()] == ["logit_scale"]
    assert math.isclose(float(loss_fn.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-7)
    gen = torch.Generator().manual_seed(0)
    x_raw, y_raw = (torch.randn(7, 10, generator=gen, dtype=torch.float64) for _ in range(2))
    x, y = x_raw.clone().requires_grad_(), y_raw.clone().requires_grad_()
    loss = loss_fn(x, y)
    loss.backward()
    scale = loss_fn.logit_scale.detach().clone().requires_grad_()
    rx, ry = x_raw.clone().requires_grad_(), y_raw.clone().requires_grad_()
    expected = open_clip_loss(rx, ry, scale.exp())
    expected.backward()
    assert relative_error(loss.detach(), expected.detach()) <= RTOL
    assert relative_error(x.grad, rx.grad) <= RTOL and relative_error(y.grad, ry.grad) <= RTOL
    assert relative_error(loss_fn.logit_scale.grad, scale.grad) <= RTOL


@pytest.mark.parametrize("stored, used", [(5.0, math.log(100)), (-1.0, 0.0), (3.0, 3.0)])
def test_clip_loss_clamps_like_open_clip(stored, used):
    """open_clip clamps log t to [0, ln 100] in place after each step; CLIPLoss does it before each use."""
    loss_fn = fastcl.CLIPLoss().double()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(stored)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    loss = loss_fn(x, y)
    assert float(loss_fn.logit_scale.detach()) == pytest.approx(used, abs=1e-15)
    assert relative_error(loss, open_clip_loss(x, y, math.exp(used))) <= RTOL


def test_clip_loss_fixed_scale_and_state_dict():
    fixed = fastcl.CLIPLoss(logit_scale=20.0, learnable=False)
    assert list(fixed.parameters()) == []
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    assert relative_error(fixed(x, y), open_clip_loss(x, y, 20.0)) <= RTOL
    owned = fastcl.CLIPLoss()
    restored = fastcl.CLIPLoss(logit_scale=50.0)
    restored.load_state_dict(owned.state_dict())
    assert torch.equal(restored.logit_scale, owned.logit_scale)
    with pytest.raises(ValueError, match="logit_scale: expected a finite float > 0"):
        fastcl.CLIPLoss(logit_scale=0.0)


def test_siglip_loss_owns_t_and_b():
    loss_fn = fastcl.SigLIPLoss(learnable=True).double()
    assert sorted(name for name, _ in loss_fn.named_parameters()) == ["logit_bias", "logit_scale"]
    assert math.isclose(float(loss_fn.logit_scale.detach()), math.log(10), rel_tol=1e-7)
    assert float(loss_fn.logit_bias.detach()) == -10.0
    with torch.no_grad():  # away from the initial values, so that both gradients are sizeable
        loss_fn.logit_scale.fill_(1.5)
        loss_fn.logit_bias.fill_(-2.0)
    gen = torch.Generator().manual_seed(1)
    x_raw, y_raw = (torch.randn(6, 9, generator=gen, dtype=torch.float64) for _ in range(2))
    x = x_raw.clone().requires_grad_()
    loss = loss_fn(x, y_raw)
    loss.backward()
    log_t, b = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (1.5, -2.0))
    rx = x_raw.clone().requires_grad_()
    expected = reference.siglip(rx, y_raw, log_t.exp(), b)
    expected.backward()
    assert relative_error(loss.detach(), expected.detach()) <= RTOL
    assert relative_error(x.grad, rx.grad) <= RTOL
    assert relative_error(loss_fn.logit_scale.grad, log_t.grad) <= RTOL
    assert relative_error(loss_fn.logit_bias.grad, b.grad) <= RTOL


def test_siglip_learnable_clamps_and_checks_its_initial_values():
    loss_fn = fastcl.SigLIPLoss(learnable=True)
    with torch.no_grad():
        loss_fn.logit_scale.fill_(7.0)
    loss_fn(torch.randn(4, 5), torch.randn(4, 5))
    assert float(loss_fn.logit_scale.detach()) == pytest.approx(math.log(100))
    with pytest.raises(TypeError, match="logit_bias"):
        fastcl.SigLIPLoss(logit_bias=torch.tensor(-10.0), learnable=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_supcon_takes_n_by_d_features_with_labels(reduction):
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1])  # class 3 is alone: that anchor has no positive
    flat = fastcl.SupConLoss(0.1, reduction=reduction)(features, labels)
    one_view = fastcl.SupConLoss(0.1, reduction=reduction)(features[:, None], labels)
    expected = reference.supcon(features[:, None], labels, temperature=0.1, reduction=reduction)
    assert flat.shape == ((9,) if reduction == "none" else ())
    assert torch.equal(flat, one_view.reshape(flat.shape))
    assert relative_error(flat, expected.reshape(flat.shape)) <= RTOL


@pytest.mark.parametrize("make", [fastcl.CLIPLoss, lambda: fastcl.SigLIPLoss(learnable=True)], ids=["clip", "siglip"])
def test_owned_parameters_compile_fullgraph(make):
    """The in-place clamp before each use is captured by torch.compile(fullgraph=True): same loss and grads."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    loss_fn, counter = make(), CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    x, y = torch.randn(6, 8), torch.randn(6, 8)
    results = []
    for fn in (compiled, loss_fn):
        loss_fn.zero_grad()
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in loss_fn.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    for g, h in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    assert counter.frame_count == 1
