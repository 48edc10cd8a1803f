"""torch.compile(fullgraph=True) of a model that calls the losses: one graph, values and grads as eager.

The losses are ``torch.library`` custom ops with fake (meta) implementations and registered autograd,
so Dynamo must capture the whole model (no graph break) and AOTAutograd must trace through the op's
backward. Most cases compile with the "aot_eager" backend: it runs exactly that capture
(Dynamo + AOTAutograd with the fake impls) and skips only Inductor's code generation for the
surrounding Linear, which costs ~50 s per model on this 2-core CPU; one case runs full Inductor.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastcl

N, D_IN, D = 10, 12, 16


class Encoder(nn.Module):
    """A linear encoder with a learnable temperature (CLIP-style log τ), feeding one loss."""

    def __init__(self, loss: str, options: dict):
        super().__init__()
        self.proj = nn.Linear(D_IN, D)
        self.log_tau = nn.Parameter(torch.tensor(-1.5))
        self.loss, self.options = loss, options

    def forward(self, x1, x2, labels):
        z1, z2 = self.proj(x1), self.proj(x2)
        tau = self.log_tau.exp()
        if self.loss == "supcon":
            out = fastcl.functional.supcon(
                torch.stack([z1, z2], dim=1), labels, temperature=tau, backend="torch", **self.options
            )
        else:
            out = getattr(fastcl.functional, self.loss)(z1, z2, tau, backend="torch", **self.options)
        return (out * torch.linspace(0.5, 1.5, out.numel()).view(out.shape)).sum() if out.dim() else out


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, D_IN, generator=gen),
        torch.randn(N, D_IN, generator=gen),
        torch.randint(0, 3, (N,), generator=gen),
    )


def _loss_and_grads(model: nn.Module, fn, inputs):
    model.zero_grad()
    loss = fn(*inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


CASES = [
    ("nt_xent", {}),
    ("nt_xent", {"sub_dim": 7}),
    ("info_nce", {}),
    ("info_nce", {"symmetric": False, "normalize": False}),
    ("supcon", {}),
    ("supcon", {"contrast_mode": "one", "base_temperature": 0.1}),
    # single-process options that run the block engine's custom ops
    ("supcon", {"positives_missing": "zero", "contrast_mode": "one"}),
    ("info_nce", {"symmetric": False, "targets": torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])}),
    ("dcl", {"sub_dim": 9}),
    ("siglip", {"logit_bias": -3.0}),  # the learnable τ enters as the logit scale t
    # reductions and per-anchor weights (the engine's per-anchor upstream gradients)
    ("nt_xent", {"reduction": "none"}),
    ("supcon", {"reduction": "sum", "weight": torch.linspace(0.0, 2.0, N)}),
    ("info_nce", {"reduction": "none", "symmetric": False}),
    ("info_nce", {"symmetric": False, "queue": torch.randn(7, D)}),  # MoCo: a key block without positives
]


@pytest.mark.parametrize("loss, options", CASES, ids=[f"{loss}-{options}" for loss, options in CASES])
def test_compiled_model_matches_eager(loss, options):
    torch._dynamo.reset()
    model = Encoder(loss, options)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for seed in (0, 1):  # a second batch reuses the graph (no recompile)
        inputs = _inputs(seed)
        eager_loss, eager_grads = _loss_and_grads(model, model, inputs)
        compiled_loss, compiled_grads = _loss_and_grads(model, compiled, inputs)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
        for g_compiled, g_eager in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-7)
        assert model.log_tau.grad is not None and model.log_tau.grad != 0
    assert counter.frame_count == 1


def test_inductor_compiles_the_losses():
    """Full Inductor on CPU (gcc): all three losses in one model, one graph, as eager."""
    torch._dynamo.reset()
    models = nn.ModuleList([Encoder(loss, {}) for loss in ("nt_xent", "info_nce", "supcon")])

    def total(x1, x2, labels):
        return sum(m(x1, x2, labels) for m in models)

    compiled = torch.compile(total, backend="inductor", fullgraph=True)
    inputs = _inputs(2)
    eager_loss, eager_grads = _loss_and_grads(models, total, inputs)
    compiled_loss, compiled_grads = _loss_and_grads(models, compiled, inputs)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)
