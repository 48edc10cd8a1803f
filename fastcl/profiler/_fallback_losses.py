"""The profiler's own loss table, used only while ``fastcl.registry`` does not exist in this install.

Each entry has the attributes of a registry ``LossEntry`` that the profiler reads (see
``docs/block-engine.md``, "Registry"): ``name``, ``functional``, ``default_temperature``, ``gemm_units``,
``flops(m, dim)``, ``naive(*tensors, temperature, **targets)`` and
``make_inputs(m, dim, dtype, device, seed) -> (tensors, targets)``.

    >>> LOSSES["info_nce"].flops(1024, 128)
    1073741824
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastcl import functional
from fastcl.profiler import naive

__all__ = ["LOSSES", "get"]

_SUPCON_VIEWS = 2
_SUPCON_CLASSES = 10


@dataclass(frozen=True)
class _Entry:
    name: str
    functional: Callable
    default_temperature: float
    gemm_units: int
    naive: Callable
    make_inputs: Callable

    def flops(self, m: int, dim: int) -> int:
        return self.gemm_units * 2 * m * m * dim


def _randn(gen: torch.Generator, dtype: torch.dtype, device, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _two_views(rows_per_view: Callable[[int], int]) -> Callable:
    def make_inputs(m: int, dim: int, dtype=torch.float32, device="cpu", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        n = rows_per_view(m)
        return (_randn(gen, dtype, device, n, dim), _randn(gen, dtype, device, n, dim)), {}

    return make_inputs


def _supcon_inputs(m: int, dim: int, dtype=torch.float32, device="cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = m // _SUPCON_VIEWS
    labels = torch.randint(0, _SUPCON_CLASSES, (n,), generator=gen).to(device)
    return (_randn(gen, dtype, device, n, _SUPCON_VIEWS, dim),), {"labels": labels}


LOSSES = {
    entry.name: entry
    for entry in (
        _Entry("nt_xent", functional.nt_xent, 0.5, 3, naive.nt_xent, _two_views(lambda m: m // 2)),
        _Entry("info_nce", functional.info_nce, 0.1, 4, naive.info_nce, _two_views(lambda m: m)),
        _Entry("supcon", functional.supcon, 0.07, 3, naive.supcon, _supcon_inputs),
    )
}


def get(name: str) -> _Entry:
    """The entry called ``name``; KeyError if there is none."""
    return LOSSES[name]
