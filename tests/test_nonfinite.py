"""Non-finite input (docs/spec.md, "Non-finite input"): by default NaN/Inf propagate, nothing raises or syncs.

AMP's ``GradScaler`` finds an overflowed step by its non-finite gradients and skips it; a loss that raised
(or hid the NaN) would stop training or corrupt the weights instead. Every loss of the registry, on every
backend that runs here (Triton through TRITON_INTERPRET=1), on its fused local path and on the block
engine (gather mode's code path in one process), with a NaN or an Inf in one input row: the loss is
non-finite, a gradient is non-finite, and ``GradScaler.step`` leaves the weights unchanged and lowers the
scale. A monkeypatched value check proves the default never reads the data (the read is the host sync).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcl import _validate, dispatch, registry

BACKENDS = [b for b in ("torch", "triton") if dispatch.unavailable_reason(b, torch.device("cpu")) is None]
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf")}
D_IN, D = 6, 8


class _Model(nn.Module):
    """A linear encoder feeding one registry loss; the input's row 1 carries the bad value."""

    def __init__(self, name: str, backend: str, engine: bool):
        super().__init__()
        self.entry, self.backend, self.engine = registry.get(name), backend, engine
        self.proj = nn.Linear(D_IN, D, dtype=torch.float64)

    def forward(self, x1, x2):
        z1, z2 = self.proj(x1), self.proj(x2)
        # reduction="sum" runs the block engine (the path of gather/ring and of the block-only options)
        options = {"reduction": "sum"} if self.engine else {}
        if self.entry.views_input:
            return self.entry.functional(
                torch.stack([z1, z2], dim=1), torch.arange(x1.shape[0]) % 3, backend=self.backend, **options
            )
        return self.entry.functional(z1, z2, backend=self.backend, **options)


@pytest.fixture
def no_value_reads(monkeypatch):
    """Fails the test if a loss reads its inputs' values on the host (the check that syncs a GPU)."""

    def forbidden(name, t):
        raise AssertionError(f"{name}: the default path read the data (a host sync)")

    monkeypatch.setattr(_validate, "finite", forbidden)


@pytest.mark.parametrize("engine", [False, True], ids=["fused", "engine"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(registry.LOSSES))
def test_non_finite_input_propagates_and_grad_scaler_skips_the_step(name, backend, bad, engine, no_value_reads):
    torch.manual_seed(0)
    model = _Model(name, backend, engine)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x1, x2 = torch.randn(5, D_IN, dtype=torch.float64), torch.randn(5, D_IN, dtype=torch.float64)
    x1[1, 2] = BAD[bad]

    loss = model(x1, x2)
    assert not torch.isfinite(loss)
    scaler.scale(loss).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(optimizer)
    scaler.update()

    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p.detach(), p0), "GradScaler must skip a step whose gradients are non-finite"
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_step_after_a_skipped_one_trains(backend, no_value_reads):
    """The step after a skipped one is an ordinary step: the NaN left nothing behind (no poisoned state)."""
    torch.manual_seed(1)
    model = _Model("nt_xent", backend, engine=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x1, x2 = torch.randn(5, D_IN, dtype=torch.float64), torch.randn(5, D_IN, dtype=torch.float64)
    bad = x1.clone()
    bad[0, 0] = float("nan")
    for inputs in ((bad, x2), (x1, x2)):
        optimizer.zero_grad()
        scaler.scale(model(*inputs)).backward()
        scaler.step(optimizer)
        scaler.update()
    before = model.proj.weight.detach().clone()
    optimizer.zero_grad()
    loss = model(x1, x2)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    assert torch.isfinite(loss) and not torch.equal(model.proj.weight.detach(), before)
