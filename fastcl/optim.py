"""Optimizers and the learning-rate schedule of the reference trainer.

- ``parameter_groups``: biases and normalization parameters (every tensor with ndim <= 1) get no weight
  decay and no LARS adaptation, as in SimCLR / BYOL.
- ``LARS``: SGD with momentum whose update for each adapted tensor is scaled by the trust ratio
  eta * ||w|| / ||g + wd w|| (You et al. 2017; SimCLR's implementation, eta = 0.001).
- ``warmup_cosine``: linear warm-up, then cosine decay to 0, as a per-step multiplier for ``LambdaLR``.

>>> import torch
>>> model = torch.nn.Linear(4, 2)
>>> opt = LARS(parameter_groups(model, weight_decay=1e-6), lr=0.1)
>>> [g["lars"] for g in opt.param_groups]
[True, False]
>>> warmup_cosine(0, warmup_steps=10, total_steps=100), warmup_cosine(100, warmup_steps=10, total_steps=100)
(0.1, 0.0)
"""

from __future__ import annotations

import math

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/norm parameters (neither)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of SGD with momentum; groups with ``lars=False`` are plain SGD."""

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001
    ):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad
                if group["lars"]:
                    param_norm, update_norm = param.norm(), update.norm()
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: (step + 1) / warmup_steps during warm-up, then cosine from 1 to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def penalty_ramp(step: int, warmup_steps: int, ramp_steps: int) -> float:
    """Penalty multiplier: 0 for ``warmup_steps``, then linear to 1 over ``ramp_steps`` (1 at once if 0):
    min(1, max(0, (step - warmup_steps) / ramp_steps))."""
    if ramp_steps == 0:
        return float(step >= warmup_steps)
    return min(1.0, max(0.0, (step - warmup_steps) / ramp_steps))
