"""What one benchmark case is: the loss, how ``M`` maps to inputs, the implementation, and its FLOP count.

``M`` is always the number of rows of the similarity matrix:

============  ==========================================  =====================================
loss          inputs built for a given M                  FLOP model (SPEC.md §6)
============  ==========================================  =====================================
``ntxent``    z1, z2: [M/2, D] (N = M/2 per view)         3 GEMM-units of M×M: 6·M²·D'
``infonce``   q, k: [M, D] (N = M, similarity M×M)        4 GEMM-units of M×M: 8·M²·D'
``supcon``    features [M/2, 2, D], labels in 0..9        3 GEMM-units of M×M: 6·M²·D'
============  ==========================================  =====================================

D' is ``sub_dim`` when given, else D. Temperatures are the SPEC defaults (0.5, 0.1, 0.07). SupCon labels
are drawn uniformly from 10 classes (CIFAR-10-like, SupContrast's main setting); with two views every
anchor has at least one positive, so all implementations compute the same value.

    >>> flops("infonce", m=1024, dim=128)
    1073741824
    >>> [t.shape for t in make_inputs("supcon", 8, 4, torch.float32, "cpu")]
    [torch.Size([4, 2, 4]), torch.Size([4])]
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "LOSSES", "IMPLS", "DTYPES", "Case", "ImplUnavailable", "flops", "make_inputs", "build_loss_fn", "check_size",
]

LOSSES = ("ntxent", "infonce", "supcon")
FASTCL_BACKENDS = ("torch", "triton", "cuda")
IMPLS = FASTCL_BACKENDS + ("naive", "compile", "pml", "infcl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEMPERATURE = {"ntxent": 0.5, "infonce": 0.1, "supcon": 0.07}
# GEMM-units of M×M per fwd+bwd (SPEC §6).
GEMM_UNITS = {"ntxent": 3, "infonce": 4, "supcon": 3}
SUPCON_VIEWS = 2
SUPCON_CLASSES = 10


@dataclass(frozen=True)
class Case:
    """One measurement: everything the worker subprocess needs, JSON-serialisable."""

    loss: str
    impl: str
    m: int
    dim: int
    sub_dim: Optional[int]
    dtype: str
    device: str
    repeats: int
    warmup: int
    mem_limit: Optional[int] = None
    profile_path: Optional[str] = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class ImplUnavailable(Exception):
    """The implementation cannot run here (not installed, wrong device, not applicable to the loss)."""


def check_size(loss: str, m: int) -> None:
    """Rejects an M that has no input shape for ``loss`` (ValueError naming ``--sizes``)."""
    if m < 2:
        raise ValueError(f"--sizes: expected M >= 2 (rows of the similarity), got {m}")
    if loss in ("ntxent", "supcon") and m % 2:
        raise ValueError(f"--sizes: {loss} uses M = 2·N (two views), so M must be even, got {m}")


def flops(loss: str, m: int, dim: int) -> int:
    """FLOPs of one forward + backward by the SPEC §6 model (one GEMM-unit = 2·M·M·D')."""
    return GEMM_UNITS[loss] * 2 * m * m * dim


def make_inputs(loss: str, m: int, dim: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[Tensor]:
    """Random inputs whose similarity has ``m`` rows; floating tensors are leaves that require grad."""
    check_size(loss, m)
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    if loss == "ntxent":
        return [leaf(m // 2, dim), leaf(m // 2, dim)]
    if loss == "infonce":
        return [leaf(m, dim), leaf(m, dim)]
    if loss == "supcon":
        labels = torch.randint(0, SUPCON_CLASSES, (m // SUPCON_VIEWS,), generator=gen).to(device)
        return [leaf(m // SUPCON_VIEWS, SUPCON_VIEWS, dim), labels]
    raise ValueError(f"--loss: expected one of {list(LOSSES)}, got {loss!r}")


def _fastcl_fn(loss: str, backend: str, sub_dim: Optional[int], device: str) -> Callable[..., Tensor]:
    from fastcl import dispatch, functional

    reason = dispatch.unavailable_reason(backend, torch.device(device))
    if reason is not None:
        raise ImplUnavailable(f"fastcl backend {backend!r}: {reason}")
    tau = TEMPERATURE[loss]
    if loss == "ntxent":
        return lambda z1, z2: functional.nt_xent(z1, z2, tau, sub_dim=sub_dim, backend=backend)
    if loss == "infonce":
        return lambda q, k: functional.info_nce(q, k, tau, sub_dim=sub_dim, backend=backend)
    return lambda feats, labels: functional.supcon(feats, labels, temperature=tau, sub_dim=sub_dim, backend=backend)


def _prefix(sub_dim: Optional[int]) -> Callable[[Tensor], Tensor]:
    # DirectCLR-style sub-vector: a view of the first D' features, as the reference code slices it.
    return (lambda z: z) if sub_dim is None else (lambda z: z[..., :sub_dim])


def _naive_fn(loss: str, sub_dim: Optional[int]) -> Callable[..., Tensor]:
    from fastcl.profiler import naive

    cut, tau = _prefix(sub_dim), TEMPERATURE[loss]
    if loss == "ntxent":
        return lambda z1, z2: naive.nt_xent(cut(z1), cut(z2), tau)
    if loss == "infonce":
        return lambda q, k: naive.info_nce(cut(q), cut(k), tau)
    return lambda feats, labels: naive.supcon(cut(feats), labels, tau)


def _pml_fn(loss: str, sub_dim: Optional[int]) -> Callable[..., Tensor]:
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        raise ImplUnavailable("pml: pytorch-metric-learning is not installed (pip install pytorch-metric-learning)")
    from pytorch_metric_learning import losses

    cut, tau = _prefix(sub_dim), TEMPERATURE[loss]
    if loss == "ntxent":
        # Two views with instance labels: pml's own SimCLR recipe (SelfSupervisedLoss, symmetric).
        ntxent = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=tau), symmetric=True)
        return lambda z1, z2: ntxent(cut(z1), cut(z2))
    if loss == "infonce":
        # Cross-view only: q against k (ref_emb), then k against q, averaged.
        one_way = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=tau), symmetric=False)
        return lambda q, k: (one_way(cut(q), cut(k)) + one_way(cut(k), cut(q))) / 2
    supcon = losses.SupConLoss(temperature=tau)

    def pml_supcon(feats: Tensor, labels: Tensor) -> Tensor:
        views = feats.shape[1]
        return supcon(torch.cat(torch.unbind(cut(feats), dim=1)), labels.repeat(views))

    return pml_supcon


def _infcl_fn(loss: str, sub_dim: Optional[int], device: str) -> Callable[..., Tensor]:
    if loss != "infonce":
        raise ImplUnavailable("infcl: inf-cl implements only the cross-view (CLIP) form, i.e. --loss infonce")
    if importlib.util.find_spec("inf_cl") is None:
        raise ImplUnavailable("infcl: the inf-cl package is not installed (pip install inf_cl)")
    if not device.startswith("cuda"):
        raise ImplUnavailable("infcl: inf-cl's Triton kernels need a CUDA device")
    import torch.nn.functional as F
    from inf_cl import cal_inf_loss

    cut, tau = _prefix(sub_dim), TEMPERATURE["infonce"]

    def infcl_info_nce(q: Tensor, k: Tensor) -> Tensor:
        # inf-cl takes the logit scale 1/τ; averaging both argument orders gives the symmetric form whether
        # cal_inf_loss computes one direction or both (its API could not be exercised without a GPU).
        q, k = F.normalize(cut(q), dim=-1), F.normalize(cut(k), dim=-1)
        return (cal_inf_loss(q, k, scale=1.0 / tau).mean() + cal_inf_loss(k, q, scale=1.0 / tau).mean()) / 2

    return infcl_info_nce


def build_loss_fn(loss: str, impl: str, sub_dim: Optional[int], device: str) -> Callable[..., Tensor]:
    """The callable ``fn(*make_inputs(...)) -> 0-dim loss`` for ``impl``; raises ImplUnavailable if it cannot run."""
    if loss not in LOSSES:
        raise ValueError(f"--loss: expected one of {list(LOSSES)}, got {loss!r}")
    if impl in FASTCL_BACKENDS:
        return _fastcl_fn(loss, impl, sub_dim, device)
    if impl == "naive":
        return _naive_fn(loss, sub_dim)
    if impl == "compile":
        return torch.compile(_naive_fn(loss, sub_dim), dynamic=False)
    if impl == "pml":
        return _pml_fn(loss, sub_dim)
    if impl == "infcl":
        return _infcl_fn(loss, sub_dim, device)
    raise ValueError(f"--impl: expected names from {list(IMPLS)}, got {impl!r}")
