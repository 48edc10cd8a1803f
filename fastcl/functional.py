"""Functional API (SPEC.md §4): validate, pick a backend, call the op on the rows as given.

The backends read the first ``sub_dim`` features through strides (the gradient on the rest of the row is
exactly zero) and fuse the L2 normalization, so nothing here copies the embeddings. Only the
distributed paths prepare rows here (sliced, normalized) before they travel between ranks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl import _validate, distributed as _distributed, dispatch, ops
from fastcl._validate import Temperature

__all__ = ["nt_xent", "info_nce", "supcon"]


def _prepare(z: Tensor, d: int, normalize: bool) -> Tensor:
    z = z[..., :d]
    return F.normalize(z, dim=-1, eps=1e-12) if normalize else z


def _temperature_tensor(value: Temperature, like: Tensor, checked: bool) -> Tensor:
    acc = ops.accumulation_dtype(like.dtype)
    if not isinstance(value, Tensor):
        return torch.full((), float(value), dtype=acc, device=like.device)
    tau = value.to(device=like.device, dtype=acc)
    if not checked:
        # No host sync: the device raises if a learnable τ has drifted to ≤ 0 or NaN.
        torch._assert_async((tau > 0) & torch.isfinite(tau), "temperature: expected a finite value > 0")
    return tau


def _check_finite_default(check_finite: Optional[bool], backend: str) -> bool:
    # Reading the data costs a device sync; on by default only on the torch (reference / CPU) backend,
    # and never while torch.compile traces (it would be a data-dependent branch).
    if torch.compiler.is_compiling():
        return False
    return backend == "torch" if check_finite is None else check_finite


def _check_two_views(names, a: Tensor, b: Tensor, sub_dim, temperature, backend, distributed, check_finite):
    """Validates a pair of [N, D] views; returns (D', concrete backend, distributed mode, τ tensor)."""
    for name, t in zip(names, (a, b)):
        _validate.embeddings(name, t, 2)
    _validate.same_layout(names, (a, b))
    d = _validate.sub_dim(sub_dim, a.shape[1])
    backend = dispatch.resolve(backend, a.device)
    mode = _distributed.resolve_mode(distributed)
    checking = _check_finite_default(check_finite, backend)
    _validate.temperature("temperature", temperature, a.device, checking)
    if checking:
        for name, t in zip(names, (a, b)):
            _validate.finite(name, t)
    return d, backend, mode, _temperature_tensor(temperature, a, checking)


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = 0.5,
    *,
    sub_dim: Optional[int] = None,
    normalize: bool = True,
    backend: str = "auto",
    distributed: str = "auto",
    check_finite: Optional[bool] = None,
) -> Tensor:
    """SimCLR's 2N-way NT-Xent (SPEC §1) over the rows of ``[z1; z2]``.

    Example:
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = nt_xent(z1, z2, temperature=0.5)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
    """
    d, backend, mode, tau = _check_two_views(("z1", "z2"), z1, z2, sub_dim, temperature, backend, distributed, check_finite)
    if z1.shape[0] == 1 and mode == "local":
        raise ValueError(f"z1: NT-Xent needs N >= 2 rows per view (N = 1 leaves no negatives), got shape {tuple(z1.shape)}")
    if mode != "local":
        return _distributed.nt_xent(_prepare(z1, d, normalize), _prepare(z2, d, normalize), tau, mode=mode)
    return ops.ntxent(z1, z2, tau, d, normalize, backend)[0]


def info_nce(
    q: Tensor,
    k: Tensor,
    temperature: Temperature = 0.1,
    *,
    sub_dim: Optional[int] = None,
    normalize: bool = True,
    symmetric: bool = True,
    backend: str = "auto",
    distributed: str = "auto",
    check_finite: Optional[bool] = None,
) -> Tensor:
    """Cross-view InfoNCE (SPEC §2): ``q_i`` against all ``k_j``, no same-view negatives.

    ``symmetric=True`` averages both directions (DirectCLR, CLIP with τ = 1/logit_scale).

    Example:
        >>> q, k = torch.randn(8, 32), torch.randn(8, 32)
        >>> bool(info_nce(q, k, 0.1, sub_dim=16) > 0)
        True
    """
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}")
    d, backend, mode, tau = _check_two_views(("q", "k"), q, k, sub_dim, temperature, backend, distributed, check_finite)
    if mode != "local":
        pq, pk = _prepare(q, d, normalize), _prepare(k, d, normalize)
        return _distributed.info_nce(pq, pk, tau, symmetric=symmetric, mode=mode)
    return ops.infonce(q, k, tau, d, normalize, symmetric, backend)[0]


def supcon(
    features: Tensor,
    labels: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    temperature: Temperature = 0.07,
    *,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    sub_dim: Optional[int] = None,
    normalize: bool = True,
    backend: str = "auto",
    distributed: str = "auto",
    check_finite: Optional[bool] = None,
) -> Tensor:
    """Supervised contrastive loss L_out (SPEC §3), SupContrast's semantics.

    ``features`` is [N, V, D]; give ``labels`` [N] or ``mask`` [N, N] (nonzero = positive) or neither
    (SimCLR with V views). Anchors without positives are left out of the mean.

    Example:
        >>> feats, y = torch.randn(6, 2, 16), torch.tensor([0, 1, 0, 1, 2, 2])
        >>> supcon(feats, y).dtype
        torch.float32
    """
    _validate.embeddings("features", features, 3)
    n, views, dim = features.shape
    if views == 0:
        raise ValueError(f"features: expected at least one view (V >= 1), got shape {tuple(features.shape)}")
    d = _validate.sub_dim(sub_dim, dim)
    _validate.choice("contrast_mode", contrast_mode, ("all", "one"))
    if labels is not None and mask is not None:
        raise ValueError("labels, mask: give at most one of them (SupContrast semantics), got both")
    if labels is not None:
        _validate.labels(labels, n, features.device)
    if mask is not None:
        _validate.mask(mask, n, features.device)
    _validate.temperature("base_temperature", base_temperature, features.device, True, allow_tensor=False)
    backend = dispatch.resolve(backend, features.device)
    mode = _distributed.resolve_mode(distributed)
    checking = _check_finite_default(check_finite, backend)
    _validate.temperature("temperature", temperature, features.device, checking)
    if checking:
        _validate.finite("features", features)
    if labels is None and mask is None and mode == "local":
        labels = torch.arange(n, device=features.device)  # SimCLR with V views (the distributed path makes global ids)
    if mask is not None:
        mask = mask != 0
    tau = _temperature_tensor(temperature, features, checking)
    n_anchors = n if contrast_mode == "one" else views * n
    if mode != "local":
        # View-major rows (row v·N + n), as SupContrast's torch.cat(torch.unbind(features, dim=1)).
        z = _prepare(features, d, normalize).transpose(0, 1).reshape(views * n, d)
        return _distributed.supcon(
            z, labels, mask, tau, base_temperature=float(base_temperature), n_anchors=n_anchors, views=views, mode=mode
        )
    return ops.supcon(features, labels, mask, tau, float(base_temperature), n_anchors, d, normalize, backend)[0]
