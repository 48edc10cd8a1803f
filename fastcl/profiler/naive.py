"""The naive, materialising losses under their short names; they live in :mod:`fastcl.reference` (the
registry's ``naive`` entries), this module only re-exports them for code that imports them from here.

    >>> import torch
    >>> from fastcl.profiler import naive
    >>> naive.nt_xent(torch.randn(4, 8), torch.randn(4, 8), 0.5).shape
    torch.Size([])
"""

from fastcl.reference import naive_info_nce as info_nce
from fastcl.reference import naive_nt_xent as nt_xent
from fastcl.reference import naive_supcon as supcon

__all__ = ["nt_xent", "info_nce", "supcon"]
