"""An op log of a loss's forward and backward: every aten op, flagged when PyTorch lists it as
nondeterministic on CUDA or when it synchronizes the host with the device (tests/test_oplog.py).

The nondeterministic list is PyTorch's own: the docstring of ``torch.use_deterministic_algorithms``
(torch 2.13), both its lists (ops made deterministic by the flag, and ops that raise under it), mapped
to the aten ops that do the nondeterministic part (often the backward: ``torch.gather``'s is
``scatter_add``). ``test_nondeterministic_list_covers_torch_docs`` fails when the installed torch
documents an entry this map lacks.

Host syncs: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``if t:``), ``nonzero``,
``unique*``, ``masked_select``, ``equal``, ``bincount``/``histc``, ``repeat_interleave`` with tensor
repeats, boolean-mask indexing, tensors built from Python values (``aten.lift_fresh``: ``torch.tensor``,
``new_tensor``), and the Python methods that read a tensor without an aten op on the CPU
(``Tensor.item`` / ``tolist`` / ``cpu`` / ``numpy``, patched while the log is on).

fastcl's losses are custom ops, which a dispatch mode sees as one op: the log runs their Python
implementations under itself, so it records the ops inside them. Triton kernel launches under
``TRITON_INTERPRET=1`` are opaque (a GPU launch is one kernel), so the interpreter's own tensor traffic
is not logged.
"""

from __future__ import annotations

import contextlib

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

# torch.use_deterministic_algorithms' docstring entry -> aten ops (overload packets) that carry the
# nondeterminism on CUDA. An empty tuple: fastcl never meets the op in a form the entry is about.
NONDETERMINISTIC_ON_CUDA = {
    "torch.nn.Conv1d": ("convolution", "_convolution", "convolution_backward", "cudnn_convolution"),
    "torch.nn.Conv2d": ("convolution", "_convolution", "convolution_backward", "cudnn_convolution"),
    "torch.nn.Conv3d": ("convolution", "_convolution", "convolution_backward", "cudnn_convolution"),
    "torch.nn.ConvTranspose1d": ("convolution", "_convolution", "convolution_backward", "cudnn_convolution_transpose"),
    "torch.nn.ConvTranspose2d": ("convolution", "_convolution", "convolution_backward", "cudnn_convolution_transpose"),
    "torch.nn.ConvTranspose3d": ("convolution", "_convolution", "convolution_backward", "cudnn_convolution_transpose"),
    "torch.nn.ReplicationPad1d": ("replication_pad1d_backward",),
    "torch.nn.ReplicationPad2d": ("replication_pad2d_backward",),
    "torch.nn.ReplicationPad3d": ("replication_pad3d_backward",),
    "torch.bmm": (),  # sparse-dense only: checked by _sparse_bmm
    "torch.Tensor.__getitem__": ("index_put", "index_put_", "_index_put_impl_"),  # its backward
    "torch.Tensor.index_put": ("index_put", "index_put_", "_index_put_impl_"),
    "torch.Tensor.put_": ("put", "put_"),
    "torch.Tensor.scatter_add_": ("scatter_add", "scatter_add_"),
    "torch.gather": ("scatter_add", "scatter_add_"),  # its backward
    "torch.index_add": ("index_add", "index_add_"),
    "torch.index_select": ("index_add", "index_add_", "index_select_backward"),  # its backward
    "torch.repeat_interleave": ("repeat_interleave",),
    "torch.Tensor.index_copy": ("index_copy", "index_copy_"),
    "torch.Tensor.scatter": (),  # the src-tensor overloads: _SCATTER_SRC
    "torch.Tensor.scatter_reduce": ("scatter_reduce", "scatter_reduce_"),
    "torch.nn.MaxPool3d": ("max_pool3d_with_indices_backward",),
    "torch.nn.AvgPool3d": ("avg_pool3d_backward",),
    "torch.nn.AdaptiveAvgPool2d": ("_adaptive_avg_pool2d_backward",),
    "torch.nn.AdaptiveAvgPool3d": ("_adaptive_avg_pool3d_backward",),
    "torch.nn.AdaptiveMaxPool2d": ("adaptive_max_pool2d_backward",),
    "torch.nn.FractionalMaxPool2d": ("fractional_max_pool2d_backward",),
    "torch.nn.FractionalMaxPool3d": ("fractional_max_pool3d_backward",),
    "torch.nn.MaxUnpool1d": ("max_unpool2d",),
    "torch.nn.MaxUnpool2d": ("max_unpool2d",),
    "torch.nn.MaxUnpool3d": ("max_unpool3d",),
    "torch.nn.functional.interpolate": (
        "upsample_linear1d_backward",
        "upsample_bilinear2d_backward",
        "upsample_bicubic2d_backward",
        "upsample_trilinear3d_backward",
        "_upsample_bilinear2d_aa_backward",
        "_upsample_bicubic2d_aa_backward",
    ),
    "torch.nn.ReflectionPad1d": ("reflection_pad1d_backward",),
    "torch.nn.ReflectionPad2d": ("reflection_pad2d_backward",),
    "torch.nn.ReflectionPad3d": ("reflection_pad3d_backward",),
    "torch.nn.NLLLoss": ("nll_loss_forward", "nll_loss2d_forward", "nll_loss", "nll_loss_nd"),
    "torch.nn.CTCLoss": ("_ctc_loss_backward",),
    "torch.nn.EmbeddingBag": ("_embedding_bag_backward", "_embedding_bag_dense_backward"),
    "torch.histc": ("histc",),
    "torch.bincount": ("bincount",),
    "torch.median": (),  # with indices: _MEDIAN_WITH_INDICES
    "torch.nn.functional.grid_sample": ("grid_sampler_2d_backward", "grid_sampler_3d_backward"),
    "torch.cumsum": (),  # floating or complex only: _floating_cumsum
    "torch.Tensor.resize_": (),  # quantized tensors only; fastcl has none
}
_FLAGGED = {name for ops in NONDETERMINISTIC_ON_CUDA.values() for name in ops}
_SCATTER_SRC = {"scatter.src", "scatter_.src", "scatter.reduce", "scatter_.reduce", "scatter.src_out"}
_MEDIAN_WITH_INDICES = {"median.dim", "median.dim_values", "nanmedian.dim"}

HOST_SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "masked_select",
    "equal",
    "lift_fresh",
    "bincount",
    "histc",
}
SYNC_METHODS = ("item", "tolist", "cpu", "numpy")


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def nondeterministic(func, args) -> bool:
    """Whether PyTorch lists ``func`` (an aten OpOverload) called with ``args`` as nondeterministic on CUDA."""
    packet, full = func.__name__.split(".")[0], func.__name__
    if packet in _FLAGGED or full in _SCATTER_SRC or full in _MEDIAN_WITH_INDICES:
        return True
    if packet in ("cumsum", "cumsum_") and args and (args[0].is_floating_point() or args[0].is_complex()):
        return True
    return packet == "bmm" and any(t.is_sparse for t in _tensors(args))


def host_sync(func, args, kwargs) -> bool:
    """Whether ``func`` makes the host wait for the device (or copies host values to it) on CUDA."""
    packet = func.__name__.split(".")[0]
    if packet in HOST_SYNC_OPS:
        return True
    if packet == "repeat_interleave" and func.__name__ != "repeat_interleave.self_int":
        return kwargs.get("output_size") is None
    if packet in ("index", "index_put", "index_put_", "_index_put_impl_"):  # boolean-mask indexing: a nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    return False


class OpLog(TorchDispatchMode):
    """Records every aten op (``ops``: (phase, name)); ``flagged`` lists (phase, kind, op) for the ones
    PyTorch lists as nondeterministic on CUDA and the host syncs; ``sanctioned`` the calls of functions
    made :meth:`opaque` with a name (e.g. the one size exchange of an uneven-batch step)."""

    def __init__(self):
        super().__init__()
        self.phase, self.paused = "forward", 0
        self.ops, self.flagged, self.sanctioned = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        self.ops.append((self.phase, name))
        if nondeterministic(func, args):
            self.flagged.append((self.phase, "nondeterministic on CUDA", name))
        if host_sync(func, args, kwargs):
            self.flagged.append((self.phase, "host sync", name))
        opdef = custom_ops.OPDEFS.get(func._schema.name)
        if opdef is not None:  # a fastcl custom op: log the ops inside it too
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def pause(self):
        """Nothing is logged inside (an opaque kernel launch, a sanctioned exchange)."""
        self.paused += 1
        try:
            with _disable_current_modes():
                yield
        finally:
            self.paused -= 1

    @contextlib.contextmanager
    def patched_methods(self):
        """Tensor.item / tolist / cpu / numpy record a host sync while the log is on (and not paused)."""
        originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

        def watch(name):
            def method(tensor, *args, **kwargs):
                if not self.paused:
                    self.flagged.append((self.phase, "host sync", f"Tensor.{name}"))
                return originals[name](tensor, *args, **kwargs)

            return method

        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, watch(name))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    @contextlib.contextmanager
    def opaque(self, owner, attribute: str, record: str | None = None):
        """``owner.attribute`` (a callable) runs paused (e.g. the Triton interpreter's kernel launch); with
        ``record``, each call is listed in ``sanctioned``."""
        original = getattr(owner, attribute)

        def call(*args, **kwargs):
            if record is not None:
                self.sanctioned.append((self.phase, record))
            with self.pause():
                return original(*args, **kwargs)

        setattr(owner, attribute, call)
        try:
            yield
        finally:
            setattr(owner, attribute, original)
