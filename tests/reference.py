"""Float64 evaluations of SPEC.md's formulas, written from the spec and independent of every backend.

They materialise the full similarity matrix on purpose: they are the obvious transcription of the math.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _rows(x: Tensor, sub_dim: Optional[int], normalize: bool) -> Tensor:
    x = x.double()
    if sub_dim is not None:
        x = x[..., :sub_dim]
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x


def _tau(temperature) -> Tensor | float:
    return temperature.double() if isinstance(temperature, Tensor) else float(temperature)


def nt_xent(z1, z2, temperature=0.5, sub_dim=None, normalize=True) -> Tensor:
    z = torch.cat([_rows(z1, sub_dim, normalize), _rows(z2, sub_dim, normalize)])
    m, n = z.shape[0], z.shape[0] // 2
    s = z @ z.T / _tau(temperature)
    total = 0.0
    for i in range(m):
        pos = i + n if i < n else i - n
        others = torch.cat([s[i, :i], s[i, i + 1 :]])
        total = total + (-s[i, pos] + torch.logsumexp(others, 0))
    return total / m


def _info_nce_one_way(q, k, tau, targets=None):
    s = q @ k.T / tau
    positives = torch.arange(q.shape[0]) if targets is None else targets.cpu()
    terms = [-s[i, t] + torch.logsumexp(s[i], 0) for i, t in enumerate(positives.tolist()) if 0 <= t < k.shape[0]]
    return torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)


def info_nce(q, k, temperature=0.1, sub_dim=None, normalize=True, symmetric=True, targets=None) -> Tensor:
    """Query i's positive is key ``targets[i]`` (default i); queries whose target is no key are left out."""
    q, k, tau = _rows(q, sub_dim, normalize), _rows(k, sub_dim, normalize), _tau(temperature)
    if not symmetric:
        return _info_nce_one_way(q, k, tau, targets)
    return 0.5 * _info_nce_one_way(q, k, tau) + 0.5 * _info_nce_one_way(k, q, tau)


def supcon(
    features, labels=None, mask=None, temperature=0.07, base_temperature=0.07, contrast_mode="all",
    sub_dim=None, normalize=True, positives_missing="drop",
) -> Tensor:
    """A floating ``mask`` weighs the positives (soft mask); anchors without positives are left out of
    the mean ("drop") or add 0 to it ("zero")."""
    f = _rows(features, sub_dim, normalize)
    n, views, _ = f.shape
    z = torch.cat([f[:, v] for v in range(views)])  # view-major: row v·N + n
    sample = torch.arange(views * n) % n
    if mask is None:
        lab = torch.arange(n) if labels is None else labels.cpu()
        weight = (lab[:, None] == lab[None, :]).double()
    else:
        weight = mask.cpu().double() if mask.is_floating_point() else (mask.cpu() != 0).double()
    tau = _tau(temperature)
    s = z @ z.T / tau
    anchors = range(n) if contrast_mode == "one" else range(views * n)
    terms, missing = [], 0
    for a in anchors:
        others = [c for c in range(views * n) if c != a]
        positives = [p for p in others if weight[sample[a], sample[p]] != 0]
        if not positives:
            missing += 1
            continue
        log_denominator = torch.logsumexp(s[a, others], 0)
        w = [weight[sample[a], sample[p]] for p in positives]
        mean_log_prob = sum(wp * (s[a, p] - log_denominator) for wp, p in zip(w, positives)) / sum(w)
        terms.append(-(tau / base_temperature) * mean_log_prob)
    if not terms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(terms).sum() / (len(terms) + (missing if positives_missing == "zero" else 0))
