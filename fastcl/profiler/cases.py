"""What one benchmark case is, and the implementations a case can run.

The losses come from the loss registry (``fastcl.registry``): their names, default temperatures, FLOP
models, naive PyTorch forms and input makers. ``M`` is always the number of rows of the similarity
matrix; the registry's input maker says which tensors that means (e.g. NT-Xent and DCL: two views of M/2
rows; InfoNCE and SigLIP: two sets of M rows; SupCon: M/2 samples × 2 views with labels). A new registry
entry is benchmarked with no change here.

Implementations (``IMPLS``):

- ``torch``, ``triton``, ``cuda``: the fastcl functional with ``backend=`` that name;
- ``naive``: the registry's naive PyTorch loss, which materialises the M×M logits;
- ``compile``: ``torch.compile(naive, dynamic=False)``;
- ``compat``: the drop-in module of :mod:`fastcl.compat` for the loss (lightly's NT-Xent and DCL,
  open_clip's ClipLoss and SigLipLoss, SupContrast's SupConLoss), on rows normalized as the peer's
  model does where the peer's loss does not normalize;
- ``pml``, ``infcl``, ``open_clip``: the peer libraries, where installed and where they implement the
  loss (open_clip's ``loss.py`` is loaded from its installed files alone: the package's ``__init__``
  needs torchvision).

    >>> case = Case("info_nce", "naive", m=64, dim=8)
    >>> call, leaves = build_workload(case)
    >>> bool(call() > 0), [tuple(t.shape) for t in leaves]
    (True, [(64, 8), (64, 8)])
    >>> loss_entry("info_nce").flops(1024, 128)
    1073741824
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from fastcl import registry

__all__ = [
    "LOSSES",
    "IMPLS",
    "CEILING",
    "FUSED",
    "PEERS",
    "COMPAT",
    "DTYPES",
    "Case",
    "ImplUnavailable",
    "loss_entry",
    "unavailable_reason",
    "build_workload",
    "check_size",
]

LOSSES = tuple(registry.LOSSES)
CEILING = "matmul"  # the pseudo-implementation every run measures first: the loss's GEMMs alone
FUSED = ("torch", "triton", "cuda")
PEERS = ("pml", "infcl", "open_clip")
COMPAT = "compat"
IMPLS = ("naive", *FUSED, "compile", COMPAT, *PEERS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One measurement, JSON-serialisable so a worker process can receive it.

    Args:
        loss: a registry name (``LOSSES``).
        impl: one of ``IMPLS``, or ``CEILING`` for the matmul ceiling of (loss, m).
        m: rows of the similarity matrix.
        dim: embedding width D.
        sub_dim: the prefix D' the loss reads (None: all of D).
        dtype: a key of ``DTYPES``.
        device: ``"cpu"`` or ``"cuda"``.
        repeats: timed forward+backward runs (0: memory only).
        warmup: untimed runs first (compilation happens here).
        mem_limit: bytes the case may allocate beyond what the process holds (None: no limit).
        profile_path: write a chrome trace of one run there.
        seed: inputs' seed.
    """

    loss: str
    impl: str
    m: int
    dim: int
    sub_dim: Optional[int] = None
    dtype: str = "fp32"
    device: str = "cpu"
    repeats: int = 3
    warmup: int = 1
    mem_limit: Optional[int] = None
    profile_path: Optional[str] = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def width(self) -> int:
        """D', the width the similarity GEMMs run over."""
        return self.sub_dim or self.dim

    def label(self) -> str:
        return f"{self.loss} · {self.impl} · M={self.m}"


class ImplUnavailable(Exception):
    """The implementation cannot run here (not installed, wrong device, not applicable to the loss)."""


def loss_entry(name: str) -> registry.LossEntry:
    """The registry entry of loss ``name``.

    Raises:
        ValueError: ``name`` is not a registered loss (the message names ``--loss`` and lists them).
    """
    if name not in registry.LOSSES:
        raise ValueError(f"--loss: expected one of {list(LOSSES)}, got {name!r}")
    return registry.LOSSES[name]


def _input_shapes(loss: str, m: int) -> list[tuple[int, ...]]:
    tensors, _ = loss_entry(loss).make_inputs(m, 1, dtype=torch.float32, device="cpu")
    return [tuple(t.shape) for t in tensors]


def check_size(loss: str, m: int) -> None:
    """Rejects an M for which ``loss`` has no inputs with exactly M similarity rows.

    Raises:
        ValueError: naming ``--sizes`` (e.g. an odd M for a two-view loss, whose inputs hold M/2 rows per view).
    """
    if m < 2:
        raise ValueError(f"--sizes: expected M >= 2 (rows of the similarity), got {m}")
    if _input_shapes(loss, m) == _input_shapes(loss, m - 1):
        raise ValueError(
            f"--sizes: {loss} has no inputs with exactly M = {m} similarity rows (its input maker "
            f"gives the same shapes for M = {m - 1}; two views of M/2 rows need an even M)"
        )


def _prefix(sub_dim: Optional[int]) -> Callable[[Tensor], Tensor]:
    # DirectCLR-style sub-vector: a view of the first D' features, as the reference code slices it.
    return (lambda z: z) if sub_dim is None else (lambda z: z[..., :sub_dim])


def _pml_nt_xent(tau: float) -> Callable[..., Tensor]:
    from pytorch_metric_learning import losses

    # Two views with instance labels: pml's own SimCLR recipe (SelfSupervisedLoss, symmetric).
    return losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=tau), symmetric=True)


def _pml_info_nce(tau: float) -> Callable[..., Tensor]:
    from pytorch_metric_learning import losses

    # Cross-view only: q against k (ref_emb), then k against q, averaged.
    one_way = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=tau), symmetric=False)
    return lambda q, k: (one_way(q, k) + one_way(k, q)) / 2


def _pml_supcon(tau: float) -> Callable[..., Tensor]:
    from pytorch_metric_learning import losses

    supcon = losses.SupConLoss(temperature=tau)
    return lambda feats, labels: supcon(torch.cat(torch.unbind(feats, dim=1)), labels.repeat(feats.shape[1]))


def _infcl_info_nce(tau: float) -> Callable[..., Tensor]:
    import torch.nn.functional as F
    from inf_cl import cal_inf_loss

    def infcl_info_nce(q: Tensor, k: Tensor) -> Tensor:
        # inf-cl takes the logit scale 1/τ; averaging both argument orders gives the symmetric form whether
        # cal_inf_loss computes one direction or both (its API could not be exercised without a GPU).
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return (cal_inf_loss(q, k, scale=1.0 / tau).mean() + cal_inf_loss(k, q, scale=1.0 / tau).mean()) / 2

    return infcl_info_nce


def _open_clip_loss_module():
    """open_clip's ``loss.py`` from the installed distribution's files (its package ``__init__`` imports
    torchvision, which may not load next to this torch); the module needs torch only."""
    path = importlib.metadata.distribution("open_clip_torch").locate_file("open_clip/loss.py")
    spec = importlib.util.spec_from_file_location("_fastcl_bench_open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unit(x: Tensor) -> Tensor:
    import torch.nn.functional as F

    return F.normalize(x, dim=-1)


def _open_clip_info_nce(tau: float) -> Callable[..., Tensor]:
    # CLIP's symmetric loss with logit_scale = 1/τ on the rows open_clip's model normalizes.
    loss = _open_clip_loss_module().ClipLoss()
    return lambda q, k: loss(_unit(q), _unit(k), 1.0 / tau)


def _open_clip_siglip(tau: float) -> Callable[..., Tensor]:
    loss = _open_clip_loss_module().SigLipLoss()
    return lambda x, y: loss(_unit(x), _unit(y), 1.0 / tau, -10.0)


@dataclass(frozen=True)
class _Peer:
    """A peer library: its import name, how to install it, and per loss it implements, a builder
    ``builder(τ) -> fn(*tensors, **targets)``."""

    module: str
    install: str
    losses: dict
    needs_cuda: bool = False
    distribution: bool = False  # ``module`` names an installed distribution, not an importable module


_PEERS = {
    "pml": _Peer(
        "pytorch_metric_learning",
        "pip install pytorch-metric-learning",
        {"nt_xent": _pml_nt_xent, "info_nce": _pml_info_nce, "supcon": _pml_supcon},
    ),
    "infcl": _Peer("inf_cl", "pip install inf_cl", {"info_nce": _infcl_info_nce}, needs_cuda=True),
    "open_clip": _Peer(
        "open_clip_torch",
        "pip install --no-deps open_clip_torch",
        {"info_nce": _open_clip_info_nce, "siglip": _open_clip_siglip},
        distribution=True,
    ),
}


def _compat_losses() -> dict:
    """Registry loss → builder ``(τ) -> fn(*tensors, **targets)`` of its fastcl.compat drop-in."""
    from fastcl.compat import lightly, open_clip, supcontrast

    def supcon(tau: float):
        loss = supcontrast.SupConLoss(tau, "all", tau)  # τ_b = τ: the registry's SupCon L_out
        return lambda feats, labels: loss(_unit(feats), labels)

    def info_nce(tau: float):
        loss = open_clip.ClipLoss()
        return lambda q, k: loss(_unit(q), _unit(k), 1.0 / tau)

    def siglip(tau: float):
        loss = open_clip.SigLipLoss()
        return lambda x, y: loss(_unit(x), _unit(y), 1.0 / tau, -10.0)

    return {
        "nt_xent": lightly.NTXentLoss,
        "dcl": lightly.DCLLoss,
        "info_nce": info_nce,
        "supcon": supcon,
        "siglip": siglip,
    }


def unavailable_reason(impl: str, loss: str, device: str) -> Optional[str]:
    """Why ``impl`` cannot run ``loss`` on ``device`` here, or None when it can. Imports nothing heavy.

    Raises:
        ValueError: ``impl`` or ``loss`` is unknown.

    Example:
        >>> unavailable_reason("infcl", "nt_xent", "cpu")
        'infcl implements only info_nce'
    """
    loss_entry(loss)
    if impl in FUSED:
        from fastcl import dispatch

        reason = dispatch.unavailable_reason(impl, torch.device(device))
        return None if reason is None else f"fastcl backend {impl!r}: {reason}"
    if impl in ("naive", "compile"):
        return None
    if impl == COMPAT:
        return None if loss in _compat_losses() else f"compat has no drop-in for {loss}"
    if impl not in _PEERS:
        raise ValueError(f"--impl: expected names from {list(IMPLS)}, got {impl!r}")
    peer = _PEERS[impl]
    if loss not in peer.losses:
        return f"{impl} implements only {', '.join(peer.losses)}"
    if not _installed(peer):
        return f"{impl}: {peer.module} is not installed ({peer.install})"
    if peer.needs_cuda and not device.startswith("cuda"):
        return f"{impl}: {peer.module} needs a CUDA device"
    return None


def _installed(peer: _Peer) -> bool:
    if not peer.distribution:
        return importlib.util.find_spec(peer.module) is not None
    try:
        importlib.metadata.distribution(peer.module)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def build_workload(case: Case) -> tuple[Callable[[], Tensor], list[Tensor]]:
    """``(call, leaves)``: ``call()`` runs the forward of ``case`` and returns the 0-dim loss; ``leaves`` are
    the input tensors that receive gradients.

    Raises:
        ImplUnavailable: the implementation cannot run here (the message says why).
        ValueError: unknown loss, implementation or dtype, or an M the loss has no inputs for.
    """
    entry = loss_entry(case.loss)
    check_size(case.loss, case.m)
    if case.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {case.dtype!r}")
    reason = unavailable_reason(case.impl, case.loss, case.device)
    if reason is not None:
        raise ImplUnavailable(reason)
    tensors, targets = entry.make_inputs(case.m, case.dim, dtype=DTYPES[case.dtype], device=case.device, seed=case.seed)
    leaves = [t.detach().requires_grad_() for t in tensors]
    tau, cut = entry.default_temperature, _prefix(case.sub_dim)
    if case.impl in FUSED:
        backend, sub_dim = case.impl, case.sub_dim
        return (lambda: entry.functional(*leaves, temperature=tau, sub_dim=sub_dim, backend=backend, **targets)), leaves
    if case.impl in ("naive", "compile"):

        def naive_loss(*tensors: Tensor) -> Tensor:
            return entry.naive(*(cut(t) for t in tensors), temperature=tau, **targets)

        if case.impl == "compile":
            # A fresh dynamo cache per case: dynamic=False recompiles per shape, and past the recompile
            # limit dynamo would silently fall back to eager.
            torch._dynamo.reset()
            naive_loss = torch.compile(naive_loss, dynamic=False)
        return (lambda: naive_loss(*leaves)), leaves
    builder = _compat_losses()[case.loss] if case.impl == COMPAT else _PEERS[case.impl].losses[case.loss]
    peer = builder(tau)
    return (lambda: peer(*(cut(t) for t in leaves), **targets)), leaves
