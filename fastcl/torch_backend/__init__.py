"""The ``torch`` backend: chunked pure PyTorch, every device, never allocates an M×M tensor.

Like every backend it exposes the block primitive ``block_forward`` / ``block_backward`` (docs/block-
engine.md) that the engine (:mod:`fastcl.engine`) runs for every loss in every mode; this backend's
:mod:`fastcl.torch_backend.block` is the readable reference of that contract, and the CPU path.
``SUPPORTS_OWN_BLOCK`` says the backward honours ``Layout.own_block``. Each block walks anchor chunks
of ``chunk_rows`` rows against all keys, so the largest temporary is a few ``rows × K`` float32 tiles
(see :func:`chunk_rows`, :func:`chunk_size`).
"""

from fastcl.torch_backend._tiles import chunk_rows, chunk_size
from fastcl.torch_backend.block import SUPPORTS_OWN_BLOCK, block_backward, block_forward

__all__ = ["block_forward", "block_backward", "SUPPORTS_OWN_BLOCK", "chunk_rows", "chunk_size"]
