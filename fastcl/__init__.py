"""fastcl: fast, memory-flat contrastive losses for PyTorch.

>>> import torch, fastcl
>>> loss = fastcl.NTXentLoss(temperature=0.5)(torch.randn(16, 128), torch.randn(16, 128))
"""

from __future__ import annotations

__version__ = "0.1.0"

from fastcl import (
    compat,  # drop-in replacements for other code bases' losses
    functional,
)
from fastcl.dispatch import available_backends
from fastcl.modules import DCLLoss, DirectCLRLoss, InfoNCELoss, NTXentLoss, SigLIPLoss, SupConLoss

__all__ = [
    "NTXentLoss",
    "InfoNCELoss",
    "DirectCLRLoss",
    "SupConLoss",
    "DCLLoss",
    "SigLIPLoss",
    "functional",
    "compat",
    "available_backends",
    "__version__",
]
