"""Two independent evaluations of every loss, for tests and benchmarks (the registry points at them).

* Float64 formulas (``nt_xent``, ``info_nce``, ``supcon``, ...): the obvious transcription of the math in
  docs/spec.md, loops over anchors and all, independent of every backend. They materialise the full
  similarity matrix on purpose; use them on small inputs.
* Naive PyTorch (``naive_nt_xent``, ...): the materialising code most people run today, in the inputs'
  dtype, for the profiler's "vs naive" ratios and the 16-bit accuracy bar ("no worse than naive"):

  - ``naive_nt_xent``: lightly's ``NTXentLoss(memory_bank_size=0)``: four N×N einsum blocks, the self
    similarities cut out with a boolean mask, concatenated into 2N×(2N−1) logits, ``cross_entropy``.
  - ``naive_info_nce``: DirectCLR's ``infoNCE(z1, z2)/2 + infoNCE(z2, z1)/2``: normalize, ``q @ kᵀ / τ``,
    ``cross_entropy`` against ``arange``, once per direction.
  - ``naive_supcon``: SupContrast's ``SupConLoss``: view-major contrast features, full logits minus the
    row max, exp, a dense float mask for positives and one for "not self".

  Inputs are L2-normalized first, so the values equal :mod:`fastcl.functional` with ``normalize=True``.

    >>> z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    >>> torch.allclose(naive_nt_xent(z1, z2, 0.5).double(), nt_xent(z1, z2, 0.5), atol=1e-5)
    True
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# --- float64 formulas ---------------------------------------------------------------------------------


def _rows(x: Tensor, sub_dim: Optional[int], normalize: bool) -> Tensor:
    x = x.double()
    if sub_dim is not None:
        x = x[..., :sub_dim]
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x


def _tau(temperature) -> Tensor | float:
    return temperature.double() if isinstance(temperature, Tensor) else float(temperature)


def _reduce(terms: Tensor, counted: Tensor, weight, reduction: str, groups: int = 1, sample_axis: int = -1) -> Tensor:
    """docs/spec.md, "Reductions and weights": ``terms`` ℓ_a (0 where not counted) in the user's per-anchor
    shape; ``weight`` is that shape or [N] per sample, broadcast along ``sample_axis``. "mean" averages
    each of ``groups`` equal slices along dim 0 (the two directions of symmetric InfoNCE) over its counted
    anchors, then averages the slices."""
    if weight is not None:
        w = weight.double().cpu()
        if w.dim() < terms.dim():
            w = w.unsqueeze(1 if sample_axis == 0 else 0)
        terms = terms * w.expand(terms.shape)
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    slices = zip(terms.chunk(groups), counted.chunk(groups))
    return sum(t.sum() / max(float(c.sum()), 1.0) for t, c in slices) / groups


def _hard_negative_term(s_pos: Tensor, s_neg: Tensor, tau, beta, tau_plus) -> Tensor:
    """docs/spec.md, "Hard negatives": −log(pos / (pos + Ng)) with Ng the debiased (τ⁺), reweighted (β)
    estimate of the negatives' sum, clamped below at N·exp(−1/τ); plain exponentials (float64)."""
    pos, neg, count = torch.exp(s_pos), torch.exp(s_neg), s_neg.shape[0]
    tau = float(tau.detach()) if isinstance(tau, Tensor) else tau
    importance = torch.exp(float(beta or 0.0) * s_neg)
    reweighted = (importance * neg).sum() / importance.mean()
    tau_plus = float(tau_plus or 0.0)
    estimate = (reweighted - tau_plus * count * pos) / (1 - tau_plus)
    estimate = torch.clamp(estimate, min=count * math.exp(-1.0 / tau))
    return -torch.log(pos / (pos + estimate))


def nt_xent(
    z1, z2, temperature=0.5, sub_dim=None, normalize=True, reduction="mean", weight=None, beta=None, tau_plus=None
) -> Tensor:
    """``beta`` / ``tau_plus``: the hard-negative estimators over the 2N − 2 negatives of each anchor."""
    z = torch.cat([_rows(z1, sub_dim, normalize), _rows(z2, sub_dim, normalize)])
    m, n = z.shape[0], z.shape[0] // 2
    s = z @ z.T / _tau(temperature)
    hard = beta is not None or tau_plus is not None
    terms = []
    for i in range(m):
        pos = i + n if i < n else i - n
        if hard:
            negatives = s[i, [j for j in range(m) if j not in (i, pos)]]
            terms.append(_hard_negative_term(s[i, pos], negatives, _tau(temperature), beta, tau_plus))
            continue
        others = torch.cat([s[i, :i], s[i, i + 1 :]])
        terms.append(-s[i, pos] + torch.logsumexp(others, 0))
    return _reduce(torch.stack(terms).view(2, n), torch.ones(2, n), weight, reduction)


def _info_nce_one_way(q, k, tau, targets=None, beta=None, tau_plus=None) -> tuple[Tensor, Tensor]:
    """(ℓ_i per query, 0 without a positive key; counted_i)."""
    s = q @ k.T / tau
    if beta is not None or tau_plus is not None:
        n = q.shape[0]
        terms = [
            _hard_negative_term(s[i, i], s[i, [j for j in range(n) if j != i]], tau, beta, tau_plus) for i in range(n)
        ]
        return torch.stack(terms), torch.ones(n, dtype=torch.float64)
    positives = torch.arange(q.shape[0]) if targets is None else targets.cpu()
    zero = torch.zeros((), dtype=torch.float64)
    valid = [0 <= t < k.shape[0] for t in positives.tolist()]
    terms = [-s[i, t] + torch.logsumexp(s[i], 0) if ok else zero for i, (t, ok) in enumerate(zip(positives, valid))]
    return torch.stack(terms), torch.tensor(valid, dtype=torch.float64)


def info_nce(
    q,
    k,
    temperature=0.1,
    sub_dim=None,
    normalize=True,
    symmetric=True,
    targets=None,
    reduction="mean",
    weight=None,
    beta=None,
    tau_plus=None,
) -> Tensor:
    """Query i's positive is key ``targets[i]`` (default i); queries whose target is no key are left out.
    ``beta`` / ``tau_plus``: the hard-negative estimators over the other N − 1 keys."""
    q, k, tau = _rows(q, sub_dim, normalize), _rows(k, sub_dim, normalize), _tau(temperature)
    hard = dict(beta=beta, tau_plus=tau_plus)
    if not symmetric:
        return _reduce(*_info_nce_one_way(q, k, tau, targets, **hard), weight, reduction)
    (forward, counted), (backward, _) = _info_nce_one_way(q, k, tau, **hard), _info_nce_one_way(k, q, tau, **hard)
    return _reduce(torch.stack([forward, backward]), torch.stack([counted, counted]), weight, reduction, groups=2)


def supcon(
    features,
    labels=None,
    mask=None,
    temperature=0.07,
    base_temperature=0.07,
    contrast_mode="all",
    sub_dim=None,
    normalize=True,
    positives_missing="drop",
    reduction="mean",
    weight=None,
) -> Tensor:
    """A floating ``mask`` weighs the positives (soft mask); anchors without positives are left out of
    the mean ("drop") or add 0 to it ("zero")."""
    f = _rows(features, sub_dim, normalize)
    n, views, _ = f.shape
    z = torch.cat([f[:, v] for v in range(views)])  # view-major: row v·N + n
    sample = torch.arange(views * n) % n
    if mask is None:
        lab = torch.arange(n) if labels is None else labels.cpu()
        pair_weight = (lab[:, None] == lab[None, :]).double()
    else:
        pair_weight = mask.cpu().double() if mask.is_floating_point() else (mask.cpu() != 0).double()
    tau = _tau(temperature)
    s = z @ z.T / tau
    n_anchors = n if contrast_mode == "one" else views * n
    terms = [torch.zeros((), dtype=torch.float64)] * n_anchors
    counted = torch.full((n_anchors,), float(positives_missing == "zero"), dtype=torch.float64)
    for a in range(n_anchors):
        others = [c for c in range(views * n) if c != a]
        positives = [p for p in others if pair_weight[sample[a], sample[p]] != 0]
        if not positives:
            continue
        log_denominator = torch.logsumexp(s[a, others], 0)
        w = [pair_weight[sample[a], sample[p]] for p in positives]
        mean_log_prob = sum(wp * (s[a, p] - log_denominator) for wp, p in zip(w, positives)) / sum(w)
        terms[a] = -(tau / base_temperature) * mean_log_prob
        counted[a] = 1.0
    terms = torch.stack(terms)
    if contrast_mode == "all":  # view-major anchors → the user's [N, V]
        terms, counted = terms.view(views, n).T, counted.view(views, n).T
    return _reduce(terms, counted, weight, reduction, sample_axis=0)


def dcl(
    z1, z2, temperature=0.1, sub_dim=None, normalize=True, weight_sigma=None, reduction="mean", weight=None
) -> Tensor:
    """DCL (Yeh et al. 2022, Eq. 6): per anchor, −w_i·s_pos + log Σ over every other row of both views
    but the positive (one log-sum-exp); the mean over each view's anchors, the two views averaged.
    w_i = 1, or DCLW's 2 − N·softmax_i(⟨ẑ1_i, ẑ2_i⟩/σ) (constant: no gradient through it)."""
    a, b, tau = _rows(z1, sub_dim, normalize), _rows(z2, sub_dim, normalize), _tau(temperature)
    n = a.shape[0]
    w = [1.0] * n
    if weight_sigma is not None:
        pair = torch.stack([a[i].detach() @ b[i].detach() for i in range(n)]) / weight_sigma
        w = (2 - n * torch.softmax(pair, dim=0)).tolist()

    def one_view(u, v):
        terms = []
        for i in range(n):
            others = [j for j in range(n) if j != i]
            negatives = torch.cat([u[i] @ u[others].T, u[i] @ v[others].T]) / tau
            terms.append(-w[i] * (u[i] @ v[i]) / tau + torch.logsumexp(negatives, 0))
        return torch.stack(terms)

    return _reduce(torch.stack([one_view(a, b), one_view(b, a)]), torch.ones(2, n), weight, reduction)


def siglip(
    x,
    y,
    logit_scale=None,
    logit_bias=-10.0,
    sub_dim=None,
    normalize=True,
    temperature=None,
    reduction="mean",
    weight=None,
) -> Tensor:
    """SigLIP: −(1/N) Σ_ij log σ(label_ij (t·⟨x̂_i, ŷ_j⟩ + b)), label +1 for i = j, −1 otherwise;
    t = ``logit_scale`` (default 10) or 1/``temperature``."""
    a, b = _rows(x, sub_dim, normalize), _rows(y, sub_dim, normalize)
    if temperature is not None:
        t = 1.0 / _tau(temperature)
    else:
        t = (
            logit_scale.double()
            if isinstance(logit_scale, Tensor)
            else float(10.0 if logit_scale is None else logit_scale)
        )
    bias = logit_bias.double() if isinstance(logit_bias, Tensor) else float(logit_bias)
    n = a.shape[0]
    labels = 2 * torch.eye(n, dtype=torch.float64) - 1
    terms = -F.logsigmoid(labels * (t * a @ b.T + bias)).sum(dim=1)  # per x row
    return _reduce(terms, torch.ones(n), weight, reduction)


# --- naive PyTorch ------------------------------------------------------------------------------------


def naive_nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR 2N-way NT-Xent computed as lightly does (2N×(2N−1) logits)."""
    n = z1.shape[0]
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    logits_11 = torch.einsum("nc,mc->nm", z1, z1) / temperature
    logits_12 = torch.einsum("nc,mc->nm", z1, z2) / temperature
    logits_21 = torch.einsum("nc,mc->nm", z2, z1) / temperature
    logits_22 = torch.einsum("nc,mc->nm", z2, z2) / temperature
    not_self = ~torch.eye(n, device=z1.device, dtype=torch.bool)
    logits_11 = logits_11[not_self].view(n, -1)
    logits_22 = logits_22[not_self].view(n, -1)
    logits = torch.cat([torch.cat([logits_12, logits_11], dim=1), torch.cat([logits_21, logits_22], dim=1)], dim=0)
    # The positive of row i sits in column i of the cross-view block, which comes first in both halves.
    targets = torch.arange(n, device=z1.device).repeat(2)
    return F.cross_entropy(logits, targets)


def _naive_info_nce_one_direction(anchors: Tensor, others: Tensor, temperature: float) -> Tensor:
    anchors = F.normalize(anchors, dim=1)
    others = F.normalize(others, dim=1)
    logits = anchors @ others.T / temperature
    targets = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(logits, targets)


def naive_info_nce(q: Tensor, k: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric cross-view InfoNCE as DirectCLR computes it (two N×N logit matrices)."""
    return _naive_info_nce_one_direction(q, k, temperature) / 2 + _naive_info_nce_one_direction(k, q, temperature) / 2


def naive_supcon(
    features: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> Tensor:
    """SupCon L_out (``contrast_mode="all"``) as SupContrast computes it (dense NV×NV logits and masks)."""
    n, views, _ = features.shape
    features = F.normalize(features, dim=2)
    if labels is None:
        labels = torch.arange(n, device=features.device)
    labels = labels.view(-1, 1)
    same_label = torch.eq(labels, labels.T).float()
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_dot_contrast = contrast @ contrast.T / temperature
    row_max, _ = anchor_dot_contrast.max(dim=1, keepdim=True)
    logits = anchor_dot_contrast - row_max.detach()
    positives = same_label.repeat(views, views)
    rows = n * views
    not_self = torch.scatter(torch.ones_like(positives), 1, torch.arange(rows, device=features.device).view(-1, 1), 0)
    positives = positives * not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    positive_count = positives.sum(1)
    positive_count = torch.where(positive_count < 1e-6, 1, positive_count)
    mean_log_prob_pos = (positives * log_prob).sum(1) / positive_count
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def naive_dcl(z1: Tensor, z2: Tensor, temperature: float = 0.1, weight_sigma: Optional[float] = None) -> Tensor:
    """DCL (DCLW with ``weight_sigma``) the way the paper's code computes it: N×N einsum blocks, boolean
    masks cut out the diagonal, one log-sum-exp over both views' negatives."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z1.device)
    weight = 1.0
    if weight_sigma is not None:
        weight = 2 - n * torch.softmax(torch.einsum("nm,nm->n", z1.detach(), z2.detach()) / weight_sigma, dim=0)

    def one_view(u, v):
        same = torch.einsum("nc,mc->nm", u, u) / temperature
        cross = torch.einsum("nc,mc->nm", u, v) / temperature
        positive = -cross.diagonal() * weight
        same, cross = same[off_diagonal].view(n, -1), cross[off_diagonal].view(n, -1)
        return (positive + torch.logsumexp(torch.cat([same, cross], dim=1), dim=1)).mean()

    return 0.5 * (one_view(z1, z2) + one_view(z2, z1))


def naive_siglip(x: Tensor, y: Tensor, temperature: float = 0.1, logit_bias: float = -10.0) -> Tensor:
    """SigLIP as open_clip's ``SigLipLoss`` computes it (N×N logits, ±1 labels, ``logsigmoid``), with
    logit_scale = 1/temperature so that the profiler can call every naive loss the same way."""
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    logits = x @ y.T / temperature + logit_bias
    labels = 2 * torch.eye(x.shape[0], device=x.device, dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]
