"""fastcl: fast, memory-flat contrastive losses for PyTorch.

``import fastcl`` imports torch and the losses only. The public submodules (``fastcl.registry``,
``fastcl.augment``, ``fastcl.torch_backend``, ... — ``fastcl.SUBMODULES``) are attributes that import on
first use (PEP 562), so an extra's dependencies (kornia, scikit-learn, matplotlib, triton) load only when
its module is used; a missing one raises an ``ImportError`` that names the extra.

>>> import torch, fastcl
>>> loss = fastcl.NTXentLoss(temperature=0.5)(torch.randn(16, 128), torch.randn(16, 128))
>>> "nt_xent" in fastcl.registry.LOSSES
True
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from fastcl import functional
from fastcl import selfcheck as _selfcheck  # noqa: F401  (sets "auto"'s self-checked choice in fastcl.dispatch)
from fastcl.dispatch import available_backends
from fastcl.gradcache import GradCache
from fastcl.memory_bank import MemoryBank
from fastcl.modules import CLIPLoss, DCLLoss, DirectCLRLoss, InfoNCELoss, NTXentLoss, SigLIPLoss, SupConLoss

__all__ = [
    "NTXentLoss",
    "InfoNCELoss",
    "DirectCLRLoss",
    "SupConLoss",
    "DCLLoss",
    "SigLIPLoss",
    "CLIPLoss",
    "MemoryBank",
    "GradCache",
    "functional",
    "compat",
    "available_backends",
    "__version__",
]

# Public submodules reachable as ``fastcl.<name>`` without an import statement; each is imported on first
# access. Those behind an extra: augment (kornia), data / train / repro (the train extra), kernels (triton).
SUBMODULES = (
    "augment",
    "compat",
    "data",
    "dispatch",
    "distributed",
    "evaluation",
    "functional",
    "kernels",
    "models",
    "optim",
    "profiler",
    "reference",
    "registry",
    "repro",
    "torch_backend",
    "train",
)


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import also binds it on the package
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
