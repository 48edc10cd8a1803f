"""The ``torch`` backend: chunked pure PyTorch, every device, never allocates an M×M tensor.

Backend contract (the Triton backend in ``fastcl.kernels`` implements the same six functions). Inputs
are prepared rows (sliced to D', maybe L2-normalized; possibly strided), ``tau`` is a 0-dim float32
(float64 for float64 rows) tensor on the rows' device, ``grad`` the 0-dim upstream gradient.

    ntxent_forward(z[M, D'], tau) -> (loss, lse[M])
    ntxent_backward(grad, z, tau, lse) -> dz
    infonce_forward(q[N, D'], k[N, D'], tau, symmetric) -> (loss, lse_rows[N], lse_cols[N] or [0])
    infonce_backward(grad, q, k, tau, symmetric, lse_rows, lse_cols) -> (dq, dk)
    supcon_forward(z[V·N, D'], labels[N] | None, mask[N, N] bool | None, tau, base_temperature, n_anchors)
        -> (loss, lse[n_anchors])
    supcon_backward(grad, z, labels, mask, tau, base_temperature, n_anchors, lse) -> dz

Losses and log-sum-exps are float32 (float64 for float64 rows); gradients have the rows' dtype.
Each pass walks anchor row blocks of ``rows_per_chunk`` rows against all columns, so the largest
temporary is a few ``rows × M`` float32 tiles (see :func:`chunk_rows`).
"""
from fastcl.torch_backend._tiles import chunk_rows, chunk_size
from fastcl.torch_backend.infonce import infonce_backward, infonce_forward
from fastcl.torch_backend.ntxent import ntxent_backward, ntxent_forward
from fastcl.torch_backend.supcon import supcon_backward, supcon_forward

__all__ = [
    "chunk_rows",
    "chunk_size",
    "ntxent_forward",
    "ntxent_backward",
    "infonce_forward",
    "infonce_backward",
    "supcon_forward",
    "supcon_backward",
]
