"""The ``cuda`` backend: the block primitive (``block_forward`` / ``block_backward``, the signature of
:class:`fastcl.contract.BlockForward` / :class:`~fastcl.contract.BlockBackward`) from the CUDA C++
extension in csrc/, and :func:`unavailable_reason`. Housed as the torch backend is (``fastcl.torch_backend``:
a package whose ``block`` module holds the primitive); how the extension is built or loaded is
:mod:`fastcl.cuda_backend.block`'s header.
"""

from fastcl.cuda_backend.block import (
    SUPPORTS_OWN_BLOCK,
    block_backward,
    block_forward,
    layout_arguments,
    unavailable_reason,
)

__all__ = ["block_forward", "block_backward", "SUPPORTS_OWN_BLOCK", "layout_arguments", "unavailable_reason"]
