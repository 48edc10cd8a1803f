"""The three losses as ``torch.library`` custom ops with registered autograd.

The ops take the user's rows as they are (any strides), with ``sub_dim`` (D', the prefix the loss uses)
and ``normalize``; the backend reads the prefix through strides and fuses the L2 normalization
(ẑ = z / max(‖z[:D']‖, 1e-12), saving only the O(M) inverse norms), so no O(M·D) copy is made outside
the backend. Registering them as custom ops makes them opaque to ``torch.compile`` (no graph break with
``fullgraph=True``) and gives every backend one autograd path: the forward stores per-row
log-sum-exps, the backward recomputes.

Each backward also returns Σ_ij G_ij s_ij (G = ∂L/∂S, already times the upstream gradient), which the
backends get for free from the tiles they recompute (it is also what the normalization's backward
needs). Since s_ij = ẑ_i·ẑ_j/τ, dL/dτ = −Σ_ij G_ij s_ij / τ, plus L/τ for SupCon's τ/τ_b prefactor:
the temperature gradient costs O(1) extra.

Autocast is switched off inside the ops: a loss computes in the dtype of the embeddings it receives
(autocast has already chosen that dtype for the layers that produced them), with fp32 reductions.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcl import dispatch
from fastcl.contract import accumulation_dtype


def _backend(name: str, like: Tensor):
    """The backend module, entered with autocast off for ``like``'s device."""
    return torch.autocast(like.device.type, enabled=False), dispatch.module(name)


def _norms_fake(x: Tensor, rows: int, normalize: bool) -> Tensor:
    return x.new_empty((rows if normalize else 0,), dtype=accumulation_dtype(x.dtype))


# --- NT-Xent -------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcl::ntxent", mutates_args=())
def ntxent(
    z1: Tensor, z2: Tensor, tau: Tensor, sub_dim: int, normalize: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows Z = [z1; z2]. Returns (loss, lse[2N], inverse norms[2N] or [0])."""
    no_autocast, impl = _backend(backend, z1)
    with no_autocast:
        return impl.ntxent_forward(z1, z2, tau, sub_dim, normalize)


@ntxent.register_fake
def _(z1, z2, tau, sub_dim, normalize, backend):
    acc = accumulation_dtype(z1.dtype)
    m = 2 * z1.shape[0]
    return z1.new_empty((), dtype=acc), z1.new_empty((m,), dtype=acc), _norms_fake(z1, m, normalize)


def _ntxent_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the auxiliary outputs never get a gradient: no zero tensors for them
    z1, z2, tau, sub_dim, normalize, backend = inputs
    ctx.options = (sub_dim, normalize, backend)
    ctx.save_for_backward(z1, z2, tau, output[1], output[2])


def _ntxent_backward(ctx, grad_loss, _grad_lse, _grad_norms):
    if grad_loss is None:  # the loss itself got no gradient (only an auxiliary output did): all zero
        return (None,) * len(ctx.needs_input_grad)
    z1, z2, tau, lse, inv_norms = ctx.saved_tensors
    sub_dim, normalize, backend = ctx.options
    no_autocast, impl = _backend(backend, z1)
    with no_autocast:
        dz1, dz2, grad_dot_logits = impl.ntxent_backward(grad_loss, z1, z2, tau, sub_dim, normalize, lse, inv_norms)
    dtau = -grad_dot_logits.to(tau.dtype) / tau if ctx.needs_input_grad[2] else None
    return dz1, dz2, dtau, None, None, None


torch.library.register_autograd("fastcl::ntxent", _ntxent_backward, setup_context=_ntxent_setup)


# --- cross-view InfoNCE --------------------------------------------------------------------------------


@torch.library.custom_op("fastcl::infonce", mutates_args=())
def infonce(
    q: Tensor, k: Tensor, tau: Tensor, sub_dim: int, normalize: bool, symmetric: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, row lse[N], column lse[N] or [0] when not symmetric, inverse norms of q and k)."""
    no_autocast, impl = _backend(backend, q)
    with no_autocast:
        return impl.infonce_forward(q, k, tau, sub_dim, normalize, symmetric)


@infonce.register_fake
def _(q, k, tau, sub_dim, normalize, symmetric, backend):
    acc = accumulation_dtype(q.dtype)
    n = q.shape[0]
    return (
        q.new_empty((), dtype=acc),
        q.new_empty((n,), dtype=acc),
        q.new_empty((n if symmetric else 0,), dtype=acc),
        _norms_fake(q, n, normalize),
        _norms_fake(k, n, normalize),
    )


def _infonce_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the auxiliary outputs never get a gradient: no zero tensors for them
    q, k, tau, sub_dim, normalize, symmetric, backend = inputs
    ctx.options = (sub_dim, normalize, symmetric, backend)
    ctx.save_for_backward(q, k, tau, *output[1:])


def _infonce_backward(ctx, grad_loss, *_grad_aux):
    if grad_loss is None:  # the loss itself got no gradient (only an auxiliary output did): all zero
        return (None,) * len(ctx.needs_input_grad)
    q, k, tau, lse_rows, lse_cols, inv_norms_q, inv_norms_k = ctx.saved_tensors
    sub_dim, normalize, symmetric, backend = ctx.options
    no_autocast, impl = _backend(backend, q)
    with no_autocast:
        dq, dk, grad_dot_logits = impl.infonce_backward(
            grad_loss, q, k, tau, sub_dim, normalize, symmetric, lse_rows, lse_cols, inv_norms_q, inv_norms_k
        )
    dtau = -grad_dot_logits.to(tau.dtype) / tau if ctx.needs_input_grad[2] else None
    return dq, dk, dtau, None, None, None, None


torch.library.register_autograd("fastcl::infonce", _infonce_backward, setup_context=_infonce_setup)


# --- SupCon --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcl::supcon", mutates_args=())
def supcon(
    features: Tensor,
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    tau: Tensor,
    base_temperature: float,
    n_anchors: int,
    sub_dim: int,
    normalize: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """features [N, V, D]; rows are view-major (row v·N + n = features[n, v]). Exactly one of labels [N] /
    bool mask [N, N] is given. Anchors are rows 0..n_anchors-1. Returns (loss, lse[n_anchors], int32
    |P(a)|[n_anchors], int32 class ids [N] (labels) or [0] (mask) — the backward reuses both: no second
    count or sort — inverse norms[V·N] or [0])."""
    no_autocast, impl = _backend(backend, features)
    with no_autocast:
        return impl.supcon_forward(features, labels, mask, tau, base_temperature, n_anchors, sub_dim, normalize)


@supcon.register_fake
def _(features, labels, mask, tau, base_temperature, n_anchors, sub_dim, normalize, backend):
    acc = accumulation_dtype(features.dtype)
    m = features.shape[0] * features.shape[1]
    return (
        features.new_empty((), dtype=acc),
        features.new_empty((n_anchors,), dtype=acc),
        features.new_empty((n_anchors,), dtype=torch.int32),
        features.new_empty((features.shape[0] if labels is not None else 0,), dtype=torch.int32),
        _norms_fake(features, m, normalize),
    )


def _supcon_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the auxiliary outputs never get a gradient: no zero tensors for them
    features, labels, mask, tau, base_temperature, n_anchors, sub_dim, normalize, backend = inputs
    ctx.options = (base_temperature, n_anchors, sub_dim, normalize, backend)
    ctx.save_for_backward(features, labels, mask, tau, *output)


def _supcon_backward(ctx, grad_loss, _grad_lse, _grad_counts, _grad_classes, _grad_norms):
    if grad_loss is None:  # the loss itself got no gradient (only an auxiliary output did): all zero
        return (None,) * len(ctx.needs_input_grad)
    features, labels, mask, tau, loss, lse, counts, classes, inv_norms = ctx.saved_tensors
    base_temperature, n_anchors, sub_dim, normalize, backend = ctx.options
    no_autocast, impl = _backend(backend, features)
    with no_autocast:
        dfeatures, grad_dot_logits = impl.supcon_backward(
            grad_loss,
            features,
            labels,
            mask,
            tau,
            base_temperature,
            n_anchors,
            sub_dim,
            normalize,
            lse,
            counts,
            classes,
            inv_norms,
        )
    dtau = None
    if ctx.needs_input_grad[3]:
        # L = (τ/τ_b)·F(S): the prefactor adds L/τ to the similarity term.
        dtau = (grad_loss.to(tau.dtype) * loss.to(tau.dtype) - grad_dot_logits.to(tau.dtype)) / tau
    return dfeatures, None, None, dtau, None, None, None, None, None


torch.library.register_autograd("fastcl::supcon", _supcon_backward, setup_context=_supcon_setup)
