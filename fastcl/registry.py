"""The one registry of losses: what the profiler, the trainer's ``--method`` and the tests iterate.

Each :class:`LossEntry` is keyed by the loss's one spelling, the name of its functional, and names the
docs/spec.md section that defines its formula and options (``formula``; the module's docstring links it,
tests/test_docs.py checks both). Adding a loss touches the files docs/block-engine.md lists ("Adding a
loss touches"); this module gets one entry.

    >>> entry = get("nt_xent")
    >>> entry.module.__name__, entry.default_temperature, entry.method, entry.formula
    ('NTXentLoss', 0.5, 'simclr', 'NT-Xent')
    >>> tensors, targets = entry.make_inputs(8, 4)
    >>> [tuple(t.shape) for t in tensors], targets
    ([(4, 4), (4, 4)], {})
    >>> entry.flops(1024, 128) == 3 * 2 * 1024 * 1024 * 128
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from fastcl import functional, modules, reference

__all__ = ["LossEntry", "LOSSES", "METHODS", "get"]

SUPCON_VIEWS = 2
SUPCON_CLASSES = 10  # CIFAR-10-like labels: with two views every anchor has a positive


@dataclass(frozen=True)
class LossEntry:
    """One loss.

    Attributes:
        name: the one spelling (the functional's name), used by the profiler, trainer and tests.
        functional: ``fastcl.functional.<name>``.
        module: its ``nn.Module`` class.
        default_temperature: τ when none is given.
        method: the trainer's ``--method`` that trains with it, or None.
        gemm_units: GEMM-units of M×M per forward+backward (docs/spec.md, "FLOP model").
        formula: the name docs/spec.md's section on this loss begins with (where its formula and
            options are written, once).
        reference: the float64 formula, called like the functional.
        naive: the naive PyTorch loss, ``naive(*tensors, temperature=τ, **targets)``.
        make_inputs: ``make_inputs(m, dim, dtype=float32, device="cpu", seed=0) -> (tensors, targets)``,
            random inputs whose similarity matrix has ``m`` rows.
        views_input: True when the loss takes [N, V, D] features and labels (SupCon), False for two
            [N, D] views.

    Example:
        >>> entry = get("supcon")
        >>> tensors, targets = entry.make_inputs(8, 16)
        >>> loss = entry.functional(*tensors, **targets)
        >>> bool(torch.isclose(loss.double(), entry.reference(*(t.double() for t in tensors), **targets)))
        True
    """

    name: str
    functional: Callable[..., Tensor]
    module: type
    default_temperature: float
    method: Optional[str]
    gemm_units: int
    reference: Callable[..., Tensor]
    naive: Callable[..., Tensor]
    make_inputs: Callable[..., tuple[tuple[Tensor, ...], dict]]
    formula: str
    views_input: bool = False

    def flops(self, m: int, dim: int) -> int:
        """FLOPs of one forward+backward at ``m`` similarity rows over ``dim`` (= sub_dim) features."""
        return self.gemm_units * 2 * m * m * dim


def _randn(gen: torch.Generator, dtype: torch.dtype, device, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _two_views(rows_per_view: Callable[[int], int]) -> Callable:
    def make_inputs(m: int, dim: int, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        n = rows_per_view(m)
        return (_randn(gen, dtype, device, n, dim), _randn(gen, dtype, device, n, dim)), {}

    return make_inputs


def _supcon_inputs(m: int, dim: int, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = m // SUPCON_VIEWS
    labels = torch.randint(0, SUPCON_CLASSES, (n,), generator=gen).to(device)
    return (_randn(gen, dtype, device, n, SUPCON_VIEWS, dim),), {"labels": labels}


LOSSES: dict[str, LossEntry] = {
    entry.name: entry
    for entry in (
        LossEntry(
            "nt_xent",
            functional.nt_xent,
            modules.NTXentLoss,
            0.5,
            "simclr",
            3,
            reference.nt_xent,
            reference.naive_nt_xent,
            _two_views(lambda m: m // 2),
            formula="NT-Xent",
        ),
        LossEntry(
            "info_nce",
            functional.info_nce,
            modules.InfoNCELoss,
            0.1,
            "directclr",
            4,
            reference.info_nce,
            reference.naive_info_nce,
            _two_views(lambda m: m),
            formula="Cross-view InfoNCE",
        ),
        LossEntry(
            "supcon",
            functional.supcon,
            modules.SupConLoss,
            0.07,
            "supcon",
            3,
            reference.supcon,
            reference.naive_supcon,
            _supcon_inputs,
            formula="Supervised contrastive loss",
            views_input=True,
        ),
        LossEntry(
            "dcl",
            functional.dcl,
            modules.DCLLoss,
            0.1,
            "dcl",
            3,
            reference.dcl,
            reference.naive_dcl,
            _two_views(lambda m: m // 2),
            formula="DCL",
        ),
        # default τ = 1/t with SigLIP's t = 10
        LossEntry(
            "siglip",
            functional.siglip,
            modules.SigLIPLoss,
            0.1,
            None,
            4,
            reference.siglip,
            reference.naive_siglip,
            _two_views(lambda m: m),
            formula="SigLIP",
        ),
    )
}

# The trainer's --method names, each the registry name of the loss it trains with.
METHODS: dict[str, str] = {entry.method: entry.name for entry in LOSSES.values() if entry.method is not None}


def get(name: str) -> LossEntry:
    """The entry of loss ``name``.

    Args:
        name: a registered loss name (``LOSSES``'s keys, e.g. ``"nt_xent"``).

    Raises:
        ValueError: ``name`` is not registered (the message lists the losses).

    Example:
        >>> get("nt_xent").default_temperature
        0.5
    """
    if name not in LOSSES:
        raise ValueError(f"loss: expected one of {list(LOSSES)}, got {name!r}")
    return LOSSES[name]
