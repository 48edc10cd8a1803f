"""The ``torch`` backend: chunked pure PyTorch, every device, never allocates an M×M tensor.

Every backend exposes the block primitive ``block_forward`` / ``block_backward`` (docs/block-engine.md;
this backend's reference is :mod:`fastcl.torch_backend.block`) that the engine runs in every mode, and
the fused local fast paths below.

Fast-path contract (the Triton backend in ``fastcl.kernels`` implements the same six functions). Inputs
are the user's tensors as given (any strides, any floating dtype); the loss uses the first ``sub_dim``
features of each row (read through strides, never copied by the fused backends) and, when
``normalize``, the rows divided by max(‖row[:sub_dim]‖, 1e-12). ``tau`` is a 0-dim float32 (float64
for float64 rows) tensor on the rows' device, ``grad`` the 0-dim upstream gradient.

    ntxent_forward(z1[N, D], z2[N, D], tau, sub_dim, normalize) -> (loss, lse[2N], inv_norms[2N] | [0])
    ntxent_backward(grad, z1, z2, tau, sub_dim, normalize, lse, inv_norms) -> (dz1, dz2, gs)
    infonce_forward(q[N, D], k[N, D], tau, sub_dim, normalize, symmetric)
        -> (loss, lse_rows[N], lse_cols[N] | [0] when not symmetric, inv_norms_q[N] | [0], inv_norms_k[N] | [0])
    infonce_backward(grad, q, k, tau, sub_dim, normalize, symmetric, lse_rows, lse_cols, inv_norms_q, inv_norms_k)
        -> (dq, dk, gs)
    supcon_forward(features[N, V, D], labels[N] | None, bool mask[N, N] | None, tau, base_temperature,
                   n_anchors, sub_dim, normalize) -> (loss, lse[n_anchors], int32 |P(a)|[n_anchors],
                   int32 classes[N] | [0], inv_norms[V·N] | [0])
    supcon_backward(grad, features, labels, mask, tau, base_temperature, n_anchors, sub_dim, normalize,
                    lse, counts, classes, inv_norms) -> (dfeatures, gs)

Rows are Z = [z1; z2] for NT-Xent and view-major (row v·N + n = features[n, v]) for SupCon, whose
anchors are rows 0..n_anchors-1; ``classes`` gives each sample a class id in [0, N) when there are
labels (``torch_backend.supcon.label_classes``), so the backward never sorts. ``inv_norms`` are
1/max(‖row[:sub_dim]‖, 1e-12) (empty when not normalizing). Gradients have the inputs' shapes and dtypes
and are exactly zero after ``sub_dim``. ``gs`` = Σ_ij G_ij s_ij with G = grad·∂L/∂S, a 0-dim tensor the
op turns into dL/dτ.
Losses and log-sum-exps are float32 (float64 for float64 rows); gradients have the rows' dtype.
Each pass walks anchor row blocks of ``rows_per_chunk`` rows against all columns, so the largest
temporary is a few ``rows × M`` float32 tiles (see :func:`chunk_rows`).
"""

from fastcl.torch_backend._tiles import chunk_rows, chunk_size
from fastcl.torch_backend.block import block_backward, block_forward
from fastcl.torch_backend.infonce import infonce_backward, infonce_forward
from fastcl.torch_backend.ntxent import ntxent_backward, ntxent_forward
from fastcl.torch_backend.supcon import supcon_backward, supcon_forward

__all__ = [
    "block_forward",
    "block_backward",
    "chunk_rows",
    "chunk_size",
    "ntxent_forward",
    "ntxent_backward",
    "infonce_forward",
    "infonce_backward",
    "supcon_forward",
    "supcon_backward",
]
