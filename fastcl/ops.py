"""The three losses as ``torch.library`` custom ops with registered autograd.

The ops take prepared embeddings (already sliced to ``sub_dim`` and, when asked, L2-normalized) and a
0-dim temperature tensor, and hand the work to the backend named by ``backend``. Registering them as
custom ops makes them opaque to ``torch.compile`` (no graph break with ``fullgraph=True``) and gives all
backends one autograd path: the forward stores only per-row log-sum-exps, the backward recomputes.

The temperature gradient costs O(M·D), never an extra pass over the similarity: since s_ij = ẑ_i·ẑ_j/τ,
Σ_ij G_ij s_ij = ½ Σ_i ⟨z_i, dz_i⟩ for the self-similarity losses (and the mean of ⟨q, dq⟩ and ⟨k, dk⟩
for the cross-view loss), and dL/dτ = −Σ_ij G_ij s_ij / τ (+ L/τ for SupCon's τ/τ_b prefactor).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl import dispatch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _temperature_grad(tau: Tensor, pairs: list[tuple[Tensor, Tensor]], count: int) -> Tensor:
    """−Σ_ij G_ij s_ij / τ from the embedding gradients (see module docstring)."""
    inner = sum((x.to(tau.dtype) * dx.to(tau.dtype)).sum() for x, dx in pairs)
    return -inner / (count * tau)


# --- NT-Xent -------------------------------------------------------------------------------------------

@torch.library.custom_op("fastcl::ntxent", mutates_args=())
def ntxent(z: Tensor, tau: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """z: [M, D'] = [z1; z2] prepared rows. Returns (loss, lse[M])."""
    return dispatch.module(backend).ntxent_forward(z, tau)


@ntxent.register_fake
def _(z, tau, backend):
    acc = accumulation_dtype(z.dtype)
    return z.new_empty((), dtype=acc), z.new_empty((z.shape[0],), dtype=acc)


def _ntxent_setup(ctx, inputs, output):
    z, tau, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(z, tau, output[1])


def _ntxent_backward(ctx, grad_loss, _grad_lse):
    z, tau, lse = ctx.saved_tensors
    dz = dispatch.module(ctx.backend).ntxent_backward(grad_loss, z, tau, lse)
    dtau = _temperature_grad(tau, [(z, dz)], 2) if ctx.needs_input_grad[1] else None
    return dz, dtau, None


torch.library.register_autograd("fastcl::ntxent", _ntxent_backward, setup_context=_ntxent_setup)


# --- cross-view InfoNCE --------------------------------------------------------------------------------

@torch.library.custom_op("fastcl::infonce", mutates_args=())
def infonce(q: Tensor, k: Tensor, tau: Tensor, symmetric: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """q, k: [N, D'] prepared rows. Returns (loss, row lse[N], column lse[N] or [0] when not symmetric)."""
    return dispatch.module(backend).infonce_forward(q, k, tau, symmetric)


@infonce.register_fake
def _(q, k, tau, symmetric, backend):
    acc = accumulation_dtype(q.dtype)
    n = q.shape[0]
    return q.new_empty((), dtype=acc), q.new_empty((n,), dtype=acc), q.new_empty((n if symmetric else 0,), dtype=acc)


def _infonce_setup(ctx, inputs, output):
    q, k, tau, symmetric, backend = inputs
    ctx.backend, ctx.symmetric = backend, symmetric
    ctx.save_for_backward(q, k, tau, output[1], output[2])


def _infonce_backward(ctx, grad_loss, _grad_lse_rows, _grad_lse_cols):
    q, k, tau, lse_rows, lse_cols = ctx.saved_tensors
    dq, dk = dispatch.module(ctx.backend).infonce_backward(grad_loss, q, k, tau, ctx.symmetric, lse_rows, lse_cols)
    dtau = _temperature_grad(tau, [(q, dq), (k, dk)], 2) if ctx.needs_input_grad[2] else None
    return dq, dk, dtau, None, None


torch.library.register_autograd("fastcl::infonce", _infonce_backward, setup_context=_infonce_setup)


# --- SupCon --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastcl::supcon", mutates_args=())
def supcon(
    z: Tensor,
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    tau: Tensor,
    base_temperature: float,
    n_anchors: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """z: [V·N, D'] view-major prepared rows; row r is sample r mod N. Exactly one of labels [N] /
    mask [N, N] is given. Anchors are rows 0..n_anchors-1. Returns (loss, lse[n_anchors])."""
    return dispatch.module(backend).supcon_forward(z, labels, mask, tau, base_temperature, n_anchors)


@supcon.register_fake
def _(z, labels, mask, tau, base_temperature, n_anchors, backend):
    acc = accumulation_dtype(z.dtype)
    return z.new_empty((), dtype=acc), z.new_empty((n_anchors,), dtype=acc)


def _supcon_setup(ctx, inputs, output):
    z, labels, mask, tau, base_temperature, n_anchors, backend = inputs
    ctx.backend, ctx.base_temperature, ctx.n_anchors = backend, base_temperature, n_anchors
    ctx.save_for_backward(z, labels, mask, tau, output[0], output[1])


def _supcon_backward(ctx, grad_loss, _grad_lse):
    z, labels, mask, tau, loss, lse = ctx.saved_tensors
    dz = dispatch.module(ctx.backend).supcon_backward(
        grad_loss, z, labels, mask, tau, ctx.base_temperature, ctx.n_anchors, lse
    )
    dtau = None
    if ctx.needs_input_grad[3]:
        # L = (τ/τ_b)·F(S): the prefactor adds L/τ to the similarity term.
        dtau = _temperature_grad(tau, [(z, dz)], 2) + grad_loss.to(tau.dtype) * loss.to(tau.dtype) / tau
    return dz, None, None, dtau, None, None, None


torch.library.register_autograd("fastcl::supcon", _supcon_backward, setup_context=_supcon_setup)
