"""Functional API: validate, pick a backend and a distributed mode, run the loss (the math is in docs/spec.md).

Options every loss takes:

* ``sub_dim``: use only the first ``sub_dim`` features of each row (DirectCLR); the gradient on the rest
  of the row is exactly zero. Every backend reads the prefix through strides: nothing copies it.
* ``normalize``: L2-normalize the rows inside the loss, ẑ = z / max(‖z[:sub_dim]‖, 1e-12).
* ``backend``: "auto" (Triton for CUDA tensors, the chunked PyTorch backend otherwise; ``FASTCL_BACKEND``
  overrides it), "torch", "triton" or "cuda". A backend that cannot run here raises ``RuntimeError``.
* ``distributed``: "auto" ("gather" under an initialized process group of world size > 1, else
  "local"), "local", "gather" or "ring" (docs/distributed.md). The backend is honoured in every mode.
* ``reduction``: "mean" (default), "sum" or "none" (the per-anchor losses ℓ_a, shaped as the inputs'
  anchors); ``weight``: per-anchor weights w_a, [N] per sample or the shape of the per-anchor losses.
  docs/spec.md, "Reductions and weights", defines both; they run on the block engine.
* ``check_finite``: raise ``ValueError`` on NaN/Inf embeddings or a non-finite or non-positive tensor
  temperature, a debugging aid that reads the data (one device sync). Off by default on every backend
  (docs/spec.md, "Non-finite input"): NaN/Inf propagate to the loss and its gradients, as AMP's
  ``GradScaler`` needs to skip the step, and nothing syncs the host.

Which code runs (docs/block-engine.md): every loss, in every mode, is :func:`fastcl.engine.block_loss`
on the backend's block primitive, given the user's tensors as its parts (z1 and z2, q and k, SupCon's
views ``features[:, v]``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl import _validate, dispatch
from fastcl import distributed as _distributed
from fastcl._validate import Temperature
from fastcl.contract import NORM_EPS, accumulation_dtype
from fastcl.engine import Pass, Plan, block_loss

__all__ = ["nt_xent", "info_nce", "supcon", "dcl", "siglip"]

MISSING_POLICIES = ("drop", "zero")
REDUCTIONS = ("mean", "sum", "none")


def _temperature_tensor(value: Temperature, like: Tensor, checked: bool) -> Tensor:
    acc = accumulation_dtype(like.dtype)
    if not isinstance(value, Tensor):
        return torch.full((), float(value), dtype=acc, device=like.device)
    tau = value.to(device=like.device, dtype=acc)
    if not checked:
        # No host sync: the device raises if a learnable τ has drifted to ≤ 0; NaN/Inf propagate to the
        # loss like NaN/Inf embeddings (docs/spec.md, "Non-finite input").
        torch._assert_async(~(tau <= 0), "temperature: expected a value > 0")
    return tau


def _checking(check_finite: bool) -> bool:
    # Reading the data costs a device sync: only on request, and never while torch.compile traces (it
    # would be a data-dependent branch).
    return check_finite and not torch.compiler.is_compiling()


@dataclass(frozen=True)
class _Call:
    """A validated call: what a loss hands the engine, decided once."""

    backend: str  # the concrete backend (resolved once per call)
    mode: str  # "local", "gather" or "ring"
    sub_dim: int  # D', the leading features the loss reads
    tau: Tensor  # 0-dim temperature in the accumulation dtype

    def engine_options(self, **extra) -> dict:
        return dict(sub_dim=self.sub_dim, mode=self.mode, backend=self.backend, **extra)


def _settle_call(
    loss: str, named: dict, temperature, *, sub_dim: int, mode: str, backend: str, check_finite, name="temperature"
) -> _Call:
    """The checks every loss ends with (the temperature, called ``name``; NaN/Inf when ``check_finite``), the
    backend resolved to a concrete one (``loss`` and the first tensor name "auto"'s self-check case) and
    τ as a tensor."""
    like = next(iter(named.values()))
    concrete = dispatch.resolve_block(backend, like.device, like.dtype, loss)
    checking = _checking(check_finite)
    _validate.temperature(name, temperature, like.device, checking)
    if checking:
        for name, t in named.items():
            _validate.finite(name, t)
    return _Call(concrete, mode, sub_dim, _temperature_tensor(temperature, like, checking))


def _check_queue(queue, q: Tensor, n_q: int, n_k: int, symmetric: bool, targets, distributed: str) -> None:
    if not isinstance(queue, Tensor):
        raise TypeError(f"queue: expected a torch.Tensor [K, D] of keys, got {type(queue).__name__}")
    if not queue.is_floating_point() or queue.dim() != 2 or queue.shape[0] == 0 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"queue: expected a floating [K, {q.shape[1]}] tensor (K >= 1 keys of q's D), got shape "
            f"{tuple(queue.shape)}, dtype {queue.dtype}"
        )
    if queue.device != q.device:
        raise ValueError(f"queue: expected device {q.device} (as q), got {queue.device}")
    if symmetric:
        raise ValueError("queue: MoCo's loss is one-directional (queries against keys); pass symmetric=False")
    if targets is not None:
        raise ValueError("queue: query i's positive is key i; targets cannot be combined with a queue")
    if n_q != n_k:
        raise ValueError(f"k: expected N = {n_q} rows (one key per query) with a queue, got {n_k}")
    _validate.choice("distributed", distributed, ("auto", "local"))


def _check_two_views(names, a: Tensor, b: Tensor, sub_dim, *, paired: bool = True) -> int:
    """Validates two [N, D] inputs (the same N when ``paired``); returns D' (sub_dim or D)."""
    for name, t in zip(names, (a, b)):
        _validate.embeddings(name, t, 2)
    if paired or a.shape[0] == b.shape[0]:
        _validate.same_layout(names, (a, b))
    else:  # the same checks but N
        _validate.same_layout(names, (a[: b.shape[0]], b[: a.shape[0]]))
    return _validate.sub_dim(sub_dim, a.shape[1])


def _check_flags(normalize, check_finite) -> None:
    _validate.flag("normalize", normalize)
    _validate.flag("check_finite", check_finite)


def _check_reduction(reduction: str) -> None:
    _validate.choice("reduction", reduction, REDUCTIONS)


def _anchor_weight(weight: Optional[Tensor], grid: tuple[int, ...], transposed: bool, device) -> Optional[Tensor]:
    """The engine's per-anchor weight vector from the user's ``weight``. ``grid`` is the anchors' shape in
    the engine's order ((parts, N) or (N,), flattened row-major); the user sees it transposed for SupCon's
    [N, V]. A per-sample [N] weight applies to every part's anchor of the sample."""
    if weight is None:
        return None
    per_anchor = grid[::-1] if transposed else grid
    _validate.weight(weight, list(dict.fromkeys([(grid[-1],), per_anchor])), device)
    if weight.dim() == 2 and transposed:
        weight = weight.T
    return weight.expand(grid).reshape(-1)


def _part_sizes(parts: list[Tensor]) -> list[int]:
    return [part.shape[0] for part in parts]


def _engine_loss(parts, plan, tau, grid, weight, reduction, *, transposed=False, **options) -> Tensor:
    """block_loss of the user's tensors ``parts`` with ``reduction`` and ``weight``; "none" gives w_a·ℓ_a in
    the user's per-anchor shape."""
    w = _anchor_weight(weight, grid, transposed, parts[0].device)
    sizes = _part_sizes(parts)
    if reduction != "none":
        return block_loss(parts, plan, sizes, tau, anchor_weight=w, reduction=reduction, **options)
    terms = block_loss(parts, plan, sizes, tau, reduction="none", **options)
    if w is not None:
        terms = terms * w.to(terms.dtype)
    terms = terms.view(grid)
    return terms.T if transposed else terms


def _reduce(terms: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    """docs/spec.md's reductions of per-anchor losses that are all counted, in one process."""
    if weight is not None:
        terms = terms * weight.to(terms.dtype)
    if reduction == "none":
        return terms
    return terms.sum() if reduction == "sum" else terms.sum() / terms.numel()


def _check_hard_negatives(beta, tau_plus, mode: str, negatives: int) -> bool:
    """Validates HCL's β ≥ 0 and the debiasing prior 0 ≤ τ⁺ < 1; True when either is in use."""
    if beta is None and tau_plus is None:
        return False
    for name, value, upper in (("beta", beta, math.inf), ("tau_plus", tau_plus, 1.0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a float or None, got {type(value).__name__}")
        if not 0.0 <= float(value) < upper:
            raise ValueError(f"{name}: expected 0 <= {name} < {upper}, got {value}")
    if mode != "local":
        raise ValueError(
            f"beta, tau_plus: the hard-negative estimators run in one process only (distributed={mode!r}); "
            "pass distributed='local'"
        )
    if negatives < 1:
        raise ValueError("beta, tau_plus: the estimators need at least one negative per anchor (N >= 2)")
    return True


def _positive_logits(a: Tensor, b: Tensor, tau: Tensor, normalize: bool) -> Tensor:
    """s(a_i, b_i) row by row in the accumulation dtype, with the engine's normalization (O(N·D))."""
    a, b = a.to(tau.dtype), b.to(tau.dtype)
    if normalize:
        a, b = F.normalize(a, dim=1, eps=NORM_EPS), F.normalize(b, dim=1, eps=NORM_EPS)
    return (a * b).sum(dim=1) / tau


def _hard_negative_loss(parts, plan, tau, grid, positive, negatives, beta, tau_plus, weight, **options):
    """Per-anchor loss of the hard-negative estimators (docs/spec.md, "Hard negatives"), reduced.

    ``plan`` leaves self and the positive out of the denominator, so the engine's per-anchor output at
    temperature τ/c is log Σ_neg exp(c·s) − c·s_pos; ``positive`` is s_pos per anchor (engine order)."""
    reduction = options.pop("reduction")

    def log_sum_neg(scale: float) -> Tensor:  # log Σ_{j neg} exp(scale·s_ij)
        terms = block_loss(parts, plan, _part_sizes(parts), tau / scale, reduction="none", **options)
        return terms + scale * positive

    beta, tau_plus = float(beta or 0.0), float(tau_plus or 0.0)
    # log of the reweighted negative sum  N_neg · Σ exp((1+β)s) / Σ exp(βs)   (Σ exp(s) when β = 0)
    log_reweighted = log_sum_neg(1.0 + beta)
    if beta > 0:
        log_reweighted = log_reweighted - log_sum_neg(beta) + math.log(negatives)
    # Ng = (reweighted − τ⁺·N_neg·exp(s_pos)) / (1 − τ⁺), clamped below at N_neg·exp(−1/τ) (the authors'
    # constant bound), all scaled by exp(−shift) so that no exponential overflows at small τ.
    shift = torch.maximum(log_reweighted, positive).detach()
    estimate = (torch.exp(log_reweighted - shift) - tau_plus * negatives * torch.exp(positive - shift)) / (1 - tau_plus)
    estimate = torch.clamp(estimate, min=negatives * torch.exp(-1.0 / tau.detach() - shift))
    terms = shift + torch.log(torch.exp(positive - shift) + estimate) - positive
    w = _anchor_weight(weight, grid, False, parts[0].device)
    return _reduce(terms, w, reduction).view(grid) if reduction == "none" else _reduce(terms, w, reduction)


def _queue_loss(q, k, queue, call: _Call, normalize, batch_negatives, reduction, weight) -> Tensor:
    """One-directional InfoNCE of q against key k_i and the queue's rows (MoCo), on the block engine."""
    n, d, tau = q.shape[0], call.sub_dim, call.tau
    # The queue as it is at the call (MoCo clones it too): callers enqueue the new keys before backward.
    parts = [q, k, queue.detach().to(q.dtype, copy=True)]
    options = call.engine_options(normalize=normalize)
    if batch_negatives:
        return _engine_loss(parts, _queue_plan(True), tau, (n,), weight, reduction, **options)
    lse_queue = block_loss(parts, _queue_plan(False), _part_sizes(parts), tau, reduction="none", **options)
    positive = _positive_logits(q[:, :d], k[:, :d], tau, normalize)
    terms = torch.logaddexp(positive, lse_queue) - positive
    return _reduce(terms, _anchor_weight(weight, (n,), False, q.device), reduction)


# The plans are built outside the traced graph (torch.compile sees their encoded strings as constants).


@dispatch.constant_for_compile
def _nt_xent_plan() -> str:
    return Plan(passes=(Pass((0, 2), (0, 2), "pairs", exclude_self=True),)).encode()


@dispatch.constant_for_compile
def _info_nce_plan(targets: bool, symmetric: bool, exclude_positives: bool = False) -> str:
    """``exclude_positives``: the positive key also leaves the denominator (the hard-negative estimators'
    log-sum-exp over negatives)."""
    if targets:
        return Plan(passes=(Pass((0, 1), (1, 2), "labels"),), labels="targets").encode()
    if symmetric:
        passes = (Pass((0, 1), (1, 2), "diagonal", weight=0.5), Pass((1, 2), (0, 1), "diagonal", weight=0.5))
    else:
        passes = (Pass((0, 1), (1, 2), "diagonal"),)
    return Plan(passes=passes, exclude_positives=exclude_positives).encode()


@dispatch.constant_for_compile
def _queue_plan(batch_negatives: bool) -> str:
    """Rows [q; k; queue]. With the batch's keys as negatives, one pass of the queries against [k; queue]
    (positive: key i). Without (MoCo), the queue alone is a key block without positives; the positive
    logit joins the log-sum-exp outside the engine (:func:`_queue_loss`)."""
    if batch_negatives:
        return Plan(passes=(Pass((0, 1), (1, 3), "diagonal"),)).encode()
    return Plan(passes=(Pass((0, 1), (2, 3), "none"),)).encode()


@dispatch.constant_for_compile
def _supcon_plan(views: int, contrast_mode: str, given: str, base_temperature: float, missing: str) -> str:
    """``given``: "labels", "mask" or "none" (every sample its own class)."""
    anchors = (0, 1) if contrast_mode == "one" else (0, views)
    positives = "mask" if given == "mask" else "labels"
    row_labels = {"labels": "given", "mask": "none", "none": "samples"}[given]
    return Plan(
        passes=(Pass(anchors, (0, views), positives, exclude_self=True),),
        labels=row_labels,
        base_temperature=base_temperature,
        missing=missing,
    ).encode()


@dispatch.constant_for_compile
def _dcl_plan(weight_sigma: Optional[float]) -> str:
    # NT-Xent's one pass over the 2N rows, with each row's positive also left out of its denominator.
    passes = (Pass((0, 2), (0, 2), "pairs", exclude_self=True),)
    return Plan(passes=passes, exclude_positives=True, pair_weight_sigma=weight_sigma).encode()


@dispatch.constant_for_compile
def _siglip_plan() -> str:
    return Plan(passes=(Pass((0, 1), (1, 2), "diagonal"),), epilogue="sigmoid").encode()


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = 0.5,
    *,
    beta: Optional[float] = None,
    tau_plus: Optional[float] = None,
    sub_dim: Optional[int] = None,
    normalize: bool = True,
    backend: str = "auto",
    distributed: str = "auto",
    reduction: str = "mean",
    weight: Optional[Tensor] = None,
    check_finite: bool = False,
) -> Tensor:
    """SimCLR's 2N-way NT-Xent over the rows of Z = [z1; z2] (M = 2N).

    ℓ_i = −s_{i,pos(i)} + log Σ_{j≠i} exp(s_ij) with pos(i) = i ± N and s_ij = ẑ_i·ẑ_j/τ; L = mean over
    the M rows. N = 1 is well defined: each row's only other row is its positive, so L = 0.

    Args:
        z1, z2: [N, D] the two views (same shape, dtype and device; any strides, any float dtype).
        temperature: τ > 0, a float or a 0-dim tensor (dL/dτ when it requires grad).
        beta, tau_plus: the hard-negative estimators (docs/spec.md, "Hard negatives"): HCL's concentration
            β ≥ 0 (Robinson et al. 2021) and the debiasing positive-class prior 0 ≤ τ⁺ < 1 (Chuang et al.
            2020); None: off. Single process, N ≥ 2.
        sub_dim, normalize, backend, distributed, reduction, weight, check_finite: see the module docstring.

    Returns:
        The 0-dim loss, float32 (float64 for float64 inputs); under gather/ring the global-batch loss.
        ``reduction="none"``: [2, N], row 0 the z1 anchors' ℓ_i, row 1 the z2 anchors'.

    Raises:
        TypeError, ValueError: bad input, naming the argument. RuntimeError: a backend that cannot run here.

    Example:
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = nt_xent(z1, z2, temperature=0.5)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> float(nt_xent(torch.randn(1, 4), torch.randn(1, 4)))  # one pair: nothing to contrast
        0.0
    """
    d = _check_two_views(("z1", "z2"), z1, z2, sub_dim)
    _check_flags(normalize, check_finite)
    _check_reduction(reduction)
    mode = _distributed.resolve_mode(distributed)
    n = z1.shape[0]
    hard = _check_hard_negatives(beta, tau_plus, mode, 2 * n - 2)
    call = _settle_call(
        "nt_xent", {"z1": z1, "z2": z2}, temperature, sub_dim=d, mode=mode, backend=backend, check_finite=check_finite
    )
    options = call.engine_options(normalize=normalize)
    if hard:
        positive = _positive_logits(z1[:, :d], z2[:, :d], call.tau, normalize).repeat(2)
        return _hard_negative_loss(
            [z1, z2], _dcl_plan(None), call.tau, (2, n), positive, 2 * n - 2, beta, tau_plus, weight,
            reduction=reduction, **options,
        )  # fmt: skip
    return _engine_loss([z1, z2], _nt_xent_plan(), call.tau, (2, n), weight, reduction, **options)


def info_nce(
    q: Tensor,
    k: Tensor,
    temperature: Temperature = 0.1,
    *,
    targets: Optional[Tensor] = None,
    queue: Optional[Tensor] = None,
    batch_negatives: bool = False,
    beta: Optional[float] = None,
    tau_plus: Optional[float] = None,
    sub_dim: Optional[int] = None,
    normalize: bool = True,
    symmetric: bool = True,
    backend: str = "auto",
    distributed: str = "auto",
    reduction: str = "mean",
    weight: Optional[Tensor] = None,
    check_finite: bool = False,
) -> Tensor:
    """Cross-view InfoNCE: ``q_i`` against all keys ``k_j``, no same-view negatives.

    ℓ(q, k) = mean_i [−s(q_i, k_{t(i)}) + log Σ_j exp(s(q_i, k_j))] with t(i) = i unless ``targets`` are
    given. ``symmetric=True`` averages ℓ(q, k) and ℓ(k, q) (DirectCLR; CLIP with τ = 1/logit_scale).

    Args:
        q: [Nq, D] queries. k: [Nk, D] keys, same D, dtype and device; Nk = Nq unless ``symmetric=False``.
        temperature: τ > 0, a float or a 0-dim tensor.
        targets: [Nq] int64, the index of each query's positive key (Inf-CL's ``cal_inf_loss`` labels);
            under gather/ring an index into the rank-major concatenation of every rank's keys. A query
            whose target matches no key has no positive and is left out of the mean. Needs
            ``symmetric=False``. None: query i's positive is key i (of the same rank under gather/ring),
            which needs Nq ≤ Nk.
        queue: [K, D] extra negative keys (MoCo's queue, e.g. :attr:`fastcl.MemoryBank.keys`): query i's
            positive is key i and its negatives are the queue's rows only, as MoCo
            (docs/spec.md, "InfoNCE with a queue (MoCo)"). Needs ``symmetric=False``, Nq = Nk and no
            ``targets``; the loss is per process (MoCo's: each rank's queries, DDP averages), so
            ``distributed`` must be "auto" or "local". No gradient reaches the queue.
        batch_negatives: with a queue, also use the batch's other keys k_j (j ≠ i) as negatives.
        beta, tau_plus: the hard-negative estimators, as :func:`nt_xent` (negatives: the other N − 1
            keys; needs Nq = Nk, no ``targets`` and no ``queue``).
        symmetric: average both directions (needs Nq = Nk and no ``targets``).
        sub_dim, normalize, backend, distributed, reduction, weight, check_finite: see the module docstring.

    Returns:
        The 0-dim loss, float32 (float64 for float64 inputs). ``reduction="none"``: [2, N] (row 0 the
        queries' ℓ(q_i, k), row 1 the keys' ℓ(k_i, q)) when symmetric, else [Nq]; a query without a
        positive key has ℓ = 0.

    Raises:
        TypeError, ValueError: bad input, naming the argument. RuntimeError: a backend that cannot run here.

    Example:
        >>> q, k = torch.randn(8, 32), torch.randn(8, 32)
        >>> bool(info_nce(q, k, 0.1, sub_dim=16) > 0)
        True
        >>> keys = torch.randn(12, 32)  # more keys than queries, explicit positives
        >>> info_nce(q, keys, 0.1, targets=torch.arange(8) + 4, symmetric=False).shape
        torch.Size([])
    """
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}")
    d = _check_two_views(("q", "k"), q, k, sub_dim, paired=False)
    _check_flags(normalize, check_finite)
    n_q, n_k = q.shape[0], k.shape[0]
    if symmetric and n_q != n_k:
        raise ValueError(
            f"k: expected N = {n_q} rows (as q) for symmetric InfoNCE, got shape {tuple(k.shape)}; "
            f"more keys than queries needs symmetric=False"
        )
    if symmetric and targets is not None:
        raise ValueError("targets: explicit positives define one direction only; pass symmetric=False with them")
    _validate.flag("batch_negatives", batch_negatives)
    if queue is not None:
        _check_queue(queue, q, n_q, n_k, symmetric, targets, distributed)
    if targets is not None:
        _validate.targets(targets, n_q, q.device)
    elif n_q > n_k:
        raise ValueError(
            f"k: query i's positive is key i, so Nk >= Nq is needed; got Nq = {n_q}, Nk = {n_k} (or pass targets)"
        )
    _check_reduction(reduction)
    mode = "local" if queue is not None else _distributed.resolve_mode(distributed)
    hard = _check_hard_negatives(beta, tau_plus, mode, n_q - 1)
    if hard and (targets is not None or queue is not None or n_q != n_k):
        raise ValueError(
            "beta, tau_plus: the estimators need one positive key per query (Nq = Nk), no targets or queue"
        )
    named = {"q": q, "k": k} if queue is None else {"q": q, "k": k, "queue": queue}
    call = _settle_call(
        "info_nce", named, temperature, sub_dim=d, mode=mode, backend=backend, check_finite=check_finite
    )
    grid = (2, n_q) if symmetric else (n_q,)
    if hard:
        positive = _positive_logits(q[:, :d], k[:, :d], call.tau, normalize)
        return _hard_negative_loss(
            [q, k], _info_nce_plan(False, symmetric, True), call.tau, grid, positive.repeat(len(grid)),
            n_q - 1, beta, tau_plus, weight, reduction=reduction, **call.engine_options(normalize=normalize),
        )  # fmt: skip
    if queue is not None:
        return _queue_loss(q, k, queue.detach(), call, normalize, batch_negatives, reduction, weight)
    plan = _info_nce_plan(targets is not None, symmetric)
    options = call.engine_options(labels=targets, normalize=normalize)
    return _engine_loss([q, k], plan, call.tau, grid, weight, reduction, **options)


def supcon(
    features: Tensor,
    labels: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    temperature: Temperature = 0.07,
    *,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    positives_missing: str = "drop",
    sub_dim: Optional[int] = None,
    normalize: bool = True,
    backend: str = "auto",
    distributed: str = "auto",
    reduction: str = "mean",
    weight: Optional[Tensor] = None,
    check_finite: bool = False,
) -> Tensor:
    """Supervised contrastive loss L_out with SupContrast's semantics.

    Rows are view-major (row v·N + n = features[n, v]). For anchor a, P(a) are the other rows of the
    same class (``labels``) or with positive weight ``mask[n_a, n_p]``, A(a) all other rows:
    ℓ_a = −(τ/τ_b) Σ_p w_ap [s_ap − log Σ_{c∈A(a)} exp(s_ac)] / Σ_p w_ap.

    Args:
        features: [N, V, D] V views of N samples, or [N, D] (one view: with labels, the other samples
            of a class are the positives).
        labels: [N] integer class ids (under gather/ring: ids meaning the same class on every rank).
        mask: [N, N] positive weights, single process only. A bool or integer mask is a set (nonzero =
            positive); a floating mask gives soft weights w_ap = mask[n_a, n_p] (SupContrast's weighted mask).
            Neither labels nor mask: every sample its own class (SimCLR with V views).
        temperature: τ > 0, a float or a 0-dim tensor. base_temperature: τ_b > 0, a float.
        contrast_mode: "all" (every row is an anchor) or "one" (view 0 only).
        positives_missing: anchors without positives are left out of the mean ("drop") or count as 0 in
            it ("zero", SupContrast's mean over all anchors). If no anchor has a positive, L = 0, with a
            ``UserWarning`` where that is known without a device sync: CPU tensors, or ``check_finite=True``
            (single process; one view with all-distinct labels or a mask without a positive pair).
        sub_dim, normalize, backend, distributed, reduction, weight, check_finite: see the module docstring.

    Returns:
        The 0-dim loss, float32 (float64 for float64 inputs). ``reduction="none"``: [N, V] (entry
        [n, v] is anchor features[n, v]'s ℓ_a), [N] with ``contrast_mode="one"``; ℓ_a = 0 for an anchor
        without positives.

    Raises:
        TypeError, ValueError: bad input, naming the argument. RuntimeError: a backend that cannot run here.

    Example:
        >>> feats, y = torch.randn(6, 2, 16), torch.tensor([0, 1, 0, 1, 2, 2])
        >>> supcon(feats, y).dtype
        torch.float32
        >>> soft = torch.rand(6, 6)
        >>> supcon(feats, mask=soft, positives_missing="zero").shape
        torch.Size([])
    """
    _validate.embeddings("features", features, (2, 3))
    _check_flags(normalize, check_finite)
    one_view = features.dim() == 2  # [N, D] with labels: one view, the per-anchor losses [N]
    if one_view:
        features = features.unsqueeze(1)
    n, views, dim = features.shape
    if views == 0:
        raise ValueError(f"features: expected at least one view (V >= 1), got shape {tuple(features.shape)}")
    d = _validate.sub_dim(sub_dim, dim)
    _validate.choice("contrast_mode", contrast_mode, ("all", "one"))
    _validate.choice("positives_missing", positives_missing, MISSING_POLICIES)
    if labels is not None and mask is not None:
        raise ValueError("labels, mask: give at most one of them (SupContrast semantics), got both")
    if labels is not None:
        _validate.labels(labels, n, features.device)
    if mask is not None:
        _validate.mask(mask, n, features.device)
    _validate.temperature("base_temperature", base_temperature, features.device, True, allow_tensor=False)
    mode = _distributed.resolve_mode(distributed)
    if mask is not None and mode != "local":
        raise ValueError(
            f"mask: a per-rank [N, N] mask cannot say which rows on other ranks are positives, so it is "
            f"only supported with distributed='local' (got distributed={mode!r}); pass global class ids "
            f"as labels instead, or distributed='local'"
        )
    _check_reduction(reduction)
    call = _settle_call(
        "supcon", {"features": features}, temperature, sub_dim=d, mode=mode, backend=backend,
        check_finite=check_finite,
    )  # fmt: skip
    # Reading labels / the mask is free on the CPU; on a device only when check_finite asked for reads.
    readable = features.device.type == "cpu" or (check_finite and features.device.type != "meta")
    if mode == "local" and readable and not torch.compiler.is_compiling():
        _warn_if_no_positive(n, views, labels, mask)
    if mask is not None:  # a bool or integer mask is a set (nonzero = positive); a floating one, weights
        mask = (mask if mask.is_floating_point() else mask != 0).to(accumulation_dtype(features.dtype))
    given = "mask" if mask is not None else "labels" if labels is not None else "none"
    plan = _supcon_plan(views, contrast_mode, given, float(base_temperature), positives_missing)
    grid = (n,) if contrast_mode == "one" else (views, n)
    # The rows are view-major: part v is features[:, v] (a strided view of the user's tensor).
    parts = list(features.unbind(1))
    options = call.engine_options(labels=labels, mask=mask, normalize=normalize)
    out = _engine_loss(parts, plan, call.tau, grid, weight, reduction, transposed=len(grid) == 2, **options)
    return out.squeeze(1) if one_view and reduction == "none" and out.dim() == 2 else out


def _warn_if_no_positive(n: int, views: int, labels: Optional[Tensor], mask: Optional[Tensor]) -> None:
    """Warns when no anchor of a single-process SupCon call has a positive (the loss is then 0 and trains
    nothing). With two or more views every sample's other views are positives unless a mask says otherwise."""
    if mask is not None:
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=mask.device)
        positive = bool((mask != 0).any()) if views > 1 else bool(((mask != 0) & off_diagonal).any())
        why = "the mask has no positive pair"
    elif views > 1 or n == 0:
        return
    else:
        positive = labels is not None and bool(labels.unique().numel() < n)
        why = "one view and no two samples share a label" if labels is not None else "one view and no labels"
    if not positive:
        warnings.warn(
            f"supcon: no anchor has a positive ({why}), so the loss is 0 and trains nothing; give two or more "
            "views, labels that samples share, or a mask with positives",
            UserWarning,
            stacklevel=3,
        )


def dcl(
    z1: Tensor,
    z2: Tensor,
    temperature: Temperature = 0.1,
    *,
    weight_sigma: Optional[float] = None,
    sub_dim: Optional[int] = None,
    normalize: bool = True,
    backend: str = "auto",
    distributed: str = "auto",
    reduction: str = "mean",
    weight: Optional[Tensor] = None,
    check_finite: bool = False,
) -> Tensor:
    """Decoupled contrastive loss (DCL, Yeh et al. 2022, Eq. 6): NT-Xent without the positive pair in the
    denominator; with ``weight_sigma``, the weighted DCLW.

    Over the M = 2N rows Z = [z1; z2]: ℓ_i = −w_i·s_{i,pos(i)} + log Σ_{j ∉ {i, pos(i)}} exp(s_ij), one
    log-sum-exp over both views' negatives as in the paper; L = mean over the M rows. w_i = 1 (DCL), or
    DCLW's von Mises-Fisher weight w_i = 2 − N·softmax_i(⟨ẑ1_i, ẑ2_i⟩/σ) over the N pairs (the global
    batch under gather/ring), without gradient through w.

    Args:
        z1, z2: [N, D] the two views (same shape, dtype and device); N ≥ 2 in a single process (under
            gather/ring the other ranks' rows fill the denominators).
        temperature: τ > 0, a float or a 0-dim tensor.
        weight_sigma: σ > 0 of DCLW's weights (lightly's default 0.5), or None for DCL.
        sub_dim, normalize, backend, distributed, reduction, weight, check_finite: see the module docstring.

    Returns:
        The 0-dim loss, float32 (float64 for float64 inputs).

    Raises:
        TypeError, ValueError: bad input, naming the argument. RuntimeError: a backend that cannot run here.

    Example:
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> dcl(z1, z2, 0.1).shape
        torch.Size([])
        >>> dcl(z1, z2, 0.1, weight_sigma=0.5).dtype  # DCLW
        torch.float32
    """
    d = _check_two_views(("z1", "z2"), z1, z2, sub_dim)
    _check_flags(normalize, check_finite)
    if weight_sigma is not None:
        _validate.temperature("weight_sigma", weight_sigma, z1.device, True, allow_tensor=False)
        weight_sigma = float(weight_sigma)
    mode = _distributed.resolve_mode(distributed)
    if z1.shape[0] < 2 and mode == "local":
        raise ValueError(
            f"z1: DCL needs N >= 2 rows per view (its denominators hold the other samples), got shape {tuple(z1.shape)}"
        )
    _check_reduction(reduction)
    call = _settle_call(
        "dcl", {"z1": z1, "z2": z2}, temperature, sub_dim=d, mode=mode, backend=backend, check_finite=check_finite
    )
    options = call.engine_options(normalize=normalize)
    return _engine_loss([z1, z2], _dcl_plan(weight_sigma), call.tau, (2, z1.shape[0]), weight, reduction, **options)


def siglip(
    x: Tensor,
    y: Tensor,
    logit_scale: Optional[Temperature] = None,
    logit_bias: Temperature = -10.0,
    *,
    temperature: Optional[Temperature] = None,
    sub_dim: Optional[int] = None,
    normalize: bool = True,
    backend: str = "auto",
    distributed: str = "auto",
    reduction: str = "mean",
    weight: Optional[Tensor] = None,
    check_finite: bool = False,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023), as open_clip's ``SigLipLoss``.

    With logits z_ij = t·⟨x̂_i, ŷ_j⟩ + b and labels +1 on the diagonal (i = j), −1 elsewhere:
    L = −(1/N) Σ_ij log σ(label_ij · z_ij), computed as softplus terms (exact for any |z|). Under
    gather/ring the sum runs over the global batch and N is the global N (open_clip's ring exchange:
    keys rotate, no normalizer is exchanged).

    Args:
        x, y: [N, D] paired rows (images, texts): same shape, dtype and device.
        logit_scale: t > 0, already exponentiated (SigLIP initialises log t = log 10): a float or a
            0-dim tensor (dL/dt when it requires grad). None: 10, or 1/``temperature``.
        logit_bias: b, a float or a 0-dim tensor (dL/db when it requires grad); SigLIP initialises −10.
        temperature: τ = 1/t instead of ``logit_scale`` (the keyword every fastcl loss takes).
        sub_dim, normalize, backend, distributed, reduction, weight, check_finite: see the module docstring.

    Returns:
        The 0-dim loss, float32 (float64 for float64 inputs).

    Raises:
        TypeError, ValueError: bad input, naming the argument. RuntimeError: a backend that cannot run here.

    Example:
        >>> img, txt = torch.randn(8, 16), torch.randn(8, 16)
        >>> t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        >>> siglip(img, txt, t, b).backward()
        >>> t.grad is not None and b.grad is not None
        True
    """
    d = _check_two_views(("x", "y"), x, y, sub_dim)
    _check_flags(normalize, check_finite)
    _check_reduction(reduction)
    mode = _distributed.resolve_mode(distributed)
    if logit_scale is not None and temperature is not None:
        raise ValueError("logit_scale, temperature: give at most one of them (temperature = 1 / logit_scale), got both")
    if isinstance(logit_bias, Tensor):
        if logit_bias.dim() != 0 or not logit_bias.is_floating_point():
            raise ValueError(
                f"logit_bias: expected a float or a 0-dim floating tensor, "
                f"got shape {tuple(logit_bias.shape)}, dtype {logit_bias.dtype}"
            )
    elif isinstance(logit_bias, bool) or not isinstance(logit_bias, numbers.Real):
        raise TypeError(f"logit_bias: expected a float or a 0-dim tensor, got {type(logit_bias).__name__}")
    if temperature is not None:
        name, value = "temperature", temperature
    else:
        name, value = "logit_scale", 10.0 if logit_scale is None else logit_scale
    call = _settle_call(
        "siglip", {"x": x, "y": y}, value, sub_dim=d, mode=mode, backend=backend, check_finite=check_finite, name=name
    )
    tau = call.tau if temperature is not None else 1.0 / call.tau  # τ = 1/t
    options = call.engine_options(bias=_temperature_tensor(logit_bias, x, True), normalize=normalize)
    return _engine_loss([x, y], _siglip_plan(), tau, (x.shape[0],), weight, reduction, **options)
