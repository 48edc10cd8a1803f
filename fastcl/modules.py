"""Drop-in ``nn.Module`` losses (SPEC.md §4): thin wrappers over :mod:`fastcl.functional`."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastcl import functional
from fastcl._validate import Temperature

__all__ = ["NTXentLoss", "InfoNCELoss", "DirectCLRLoss", "SupConLoss"]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent over two views; replaces lightly's ``NTXentLoss(memory_bank_size=0)``.

    Example:
        >>> import torch
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss = loss_fn(torch.randn(8, 32), torch.randn(8, 32))
    """

    def __init__(
        self,
        temperature: Temperature = 0.5,
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
    ):
        super().__init__()
        self.temperature, self.sub_dim, self.normalize = temperature, sub_dim, normalize
        self.backend, self.distributed = backend, distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return functional.nt_xent(
            z1, z2, self.temperature, sub_dim=self.sub_dim, normalize=self.normalize,
            backend=self.backend, distributed=self.distributed,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, sub_dim={self.sub_dim}, normalize={self.normalize}, backend={self.backend!r}, distributed={self.distributed!r}"


class InfoNCELoss(nn.Module):
    """Cross-view InfoNCE (DirectCLR / CLIP form), symmetric by default.

    Example:
        >>> import torch
        >>> loss = InfoNCELoss(temperature=0.1)(torch.randn(8, 32), torch.randn(8, 32))
    """

    def __init__(
        self,
        temperature: Temperature = 0.1,
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        symmetric: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
    ):
        super().__init__()
        self.temperature, self.sub_dim, self.normalize = temperature, sub_dim, normalize
        self.symmetric, self.backend, self.distributed = symmetric, backend, distributed

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return functional.info_nce(
            q, k, self.temperature, sub_dim=self.sub_dim, normalize=self.normalize,
            symmetric=self.symmetric, backend=self.backend, distributed=self.distributed,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sub_dim={self.sub_dim}, normalize={self.normalize}, "
            f"symmetric={self.symmetric}, backend={self.backend!r}, distributed={self.distributed!r}"
        )


class DirectCLRLoss(InfoNCELoss):
    """DirectCLR (Jing et al. 2022): symmetric InfoNCE on the first ``sub_dim`` features of the
    representation, no projector. The kernel reads the prefix through strides.

    Example:
        >>> import torch
        >>> loss = DirectCLRLoss(sub_dim=360)(torch.randn(8, 2048), torch.randn(8, 2048))
    """

    def __init__(self, sub_dim: int = 360, temperature: Temperature = 0.1, backend: str = "auto", distributed: str = "auto"):
        super().__init__(temperature, sub_dim=sub_dim, normalize=True, symmetric=True, backend=backend, distributed=distributed)


class SupConLoss(nn.Module):
    """Supervised contrastive loss with SupContrast's signature and semantics.

    Example:
        >>> import torch
        >>> feats, labels = torch.randn(8, 2, 32), torch.randint(0, 3, (8,))
        >>> loss = SupConLoss(temperature=0.07)(feats, labels)
    """

    def __init__(
        self,
        temperature: Temperature = 0.07,
        base_temperature: float = 0.07,
        contrast_mode: str = "all",
        sub_dim: Optional[int] = None,
        normalize: bool = True,
        backend: str = "auto",
        distributed: str = "auto",
    ):
        super().__init__()
        self.temperature, self.base_temperature, self.contrast_mode = temperature, base_temperature, contrast_mode
        self.sub_dim, self.normalize, self.backend, self.distributed = sub_dim, normalize, backend, distributed

    def forward(self, features: Tensor, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        return functional.supcon(
            features, labels, mask, self.temperature, base_temperature=self.base_temperature,
            contrast_mode=self.contrast_mode, sub_dim=self.sub_dim, normalize=self.normalize,
            backend=self.backend, distributed=self.distributed,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
            f"contrast_mode={self.contrast_mode!r}, sub_dim={self.sub_dim}, backend={self.backend!r}, distributed={self.distributed!r}"
        )
