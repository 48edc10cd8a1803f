"""The ``cuda`` backend: the block primitive of docs/block-engine.md from the CUDA C++ extension in csrc/.

The kernels (``csrc/block_kernels.cu``) are registered as the torch ops ``fastcl_cuda::block_forward`` /
``fastcl_cuda::block_backward`` (``csrc/block_ops.cpp``), so autograd custom ops and ``torch.compile`` treat
them as ordinary operators (fake implementations are registered here). The extension comes from:

- ``fastcl._C``, built ahead of time by ``pip install --no-build-isolation .`` when a CUDA toolkit and a
  CUDA build of torch are present (``FASTCL_BUILD_CUDA=0`` opts out); else
- a just-in-time build with ninja on first use (``torch.utils.cpp_extension.load``, cached under
  ``TORCH_EXTENSIONS_DIR``; a message and a progress line go to stderr while it compiles, about a
  minute; ``TORCH_CUDA_ARCH_LIST`` picks the architectures, default: the visible GPU's).

A CPU-only install never compiles anything: :func:`unavailable_reason` says why the backend cannot run.

Example:
    >>> from fastcl import cuda_backend
    >>> reason = cuda_backend.unavailable_reason()
    >>> reason is None or isinstance(reason, str)
    True
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from fastcl.contract import Layout, accumulation_dtype

__all__ = ["block_forward", "block_backward", "layout_arguments", "unavailable_reason", "SUPPORTS_OWN_BLOCK"]

# The Positives and Epilogue enums of csrc/block_math.cuh (tests/test_csrc_host.py runs the kernels with
# these very codes, through layout_arguments).
_POSITIVES = {"none": 0, "index": 1, "labels": 2, "mask": 3}
_EPILOGUES = {"softmax": 0, "sigmoid": 1}
_SOURCES = ("block_ops.cpp", "block_kernels.cu")
_JIT_NAME = "fastcl_cuda_jit"


def _sources_dir() -> Optional[Path]:
    """csrc/ in a source checkout, or the fastcl/csrc package data of an installed wheel."""
    package = Path(__file__).resolve().parent.parent  # fastcl/
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCES):
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why the CUDA extension cannot run here (None when it can: built, or buildable just in time).

    Returns:
        None, or a sentence naming what is missing.

    Example:
        >>> import torch
        >>> torch.cuda.is_available() or unavailable_reason() is not None
        True
    """
    if not torch.cuda.is_available():
        return "it needs a CUDA device and torch.cuda.is_available() is False"
    if importlib.util.find_spec("fastcl._C") is not None:
        return None
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "torch is not a CUDA build, so the extension (csrc/) cannot be compiled against it"
    if cpp_extension.CUDA_HOME is None:
        return "the extension is not built in this install and no CUDA toolkit (nvcc, CUDA_HOME) is found to build it"
    if not cpp_extension.is_ninja_available():
        return "the extension is not built in this install and ninja (pip install ninja) is needed to build it"
    if _sources_dir() is None:
        return "the extension is not built in this install and its sources (csrc/) are missing"
    return None


class _Progress:
    """Prints a line every `every` seconds while a build runs, so a first call is not a silent minute."""

    def __init__(self, every: float = 15.0):
        self._every, self._done = every, threading.Event()

    def __enter__(self):
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._done.wait(self._every):
            elapsed = time.monotonic() - self._start
            print(f"fastcl: still compiling the CUDA extension ({elapsed:.0f} s)", file=sys.stderr)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        if exc[0] is None:
            print(f"fastcl: CUDA extension ready ({time.monotonic() - self._start:.0f} s)", file=sys.stderr)


def _build_just_in_time() -> None:
    from torch.utils import cpp_extension

    sources = _sources_dir()
    print(
        "fastcl: compiling the CUDA extension for backend='cuda' (first use only; cached under "
        "TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)",
        file=sys.stderr,
    )
    with _Progress():
        cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(sources / name) for name in _SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            is_python_module=True,
            verbose=False,
        )


@functools.lru_cache(maxsize=None)
def _ops():
    """torch.ops.fastcl_cuda after loading the extension (ahead-of-time build, else just in time)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend='cuda' cannot run here: {reason}")
    if importlib.util.find_spec("fastcl._C") is not None:
        importlib.import_module("fastcl._C")
    else:
        _build_just_in_time()
    _register_fakes()
    return torch.ops.fastcl_cuda


def _register_fakes() -> None:
    """Shapes for torch.compile / FakeTensor tracing (the ops' outputs are in the accumulation dtype)."""

    @torch.library.register_fake("fastcl_cuda::block_forward")
    def _(a, a_inv, k, k_inv, tau, sub_dim, *layout):
        stat = a.new_empty((a.shape[0],), dtype=accumulation_dtype(a.dtype))
        return stat, torch.empty_like(stat), torch.empty_like(stat)

    @torch.library.register_fake("fastcl_cuda::block_backward")
    def _(a, a_inv, k, k_inv, tau, sub_dim, *rest):
        acc = accumulation_dtype(a.dtype)
        return (
            a.new_empty((a.shape[0], sub_dim), dtype=acc),
            a.new_empty((k.shape[0], sub_dim), dtype=acc),
            a.new_empty((a.shape[0], 2), dtype=acc),
        )


def layout_arguments(layout: Layout, like: Tensor) -> tuple:
    """A :class:`~fastcl.contract.Layout` as the ops' layout arguments (the same order as their schema).

    Args:
        layout: the block's layout.
        like: the anchor rows; tensors go to its device, weights and bias to its accumulation dtype.

    Returns:
        (has_self, self_offset, positives, exclude_positives, epilogue, bias, pos_index, a_labels,
        k_labels, mask): flags and enum codes of csrc/block_math.cuh, then contiguous tensors or None.

    Example:
        >>> import torch
        >>> layout = Layout(positives="index", self_offset=0, pos_index=torch.tensor([1, 0]))
        >>> layout_arguments(layout, torch.zeros(2, 3))[:5]
        (True, 0, 1, False, 0)
    """
    acc = accumulation_dtype(like.dtype)

    def vector(x: Optional[Tensor], dtype) -> Optional[Tensor]:
        return None if x is None else x.to(device=like.device, dtype=dtype).contiguous()

    return (
        layout.self_offset is not None,
        layout.self_offset or 0,
        _POSITIVES[layout.positives],
        layout.exclude_positives,
        _EPILOGUES[layout.epilogue],
        vector(layout.bias, acc),
        vector(layout.pos_index, torch.int64),
        vector(layout.a_labels, torch.int64),
        vector(layout.k_labels, torch.int64),
        vector(layout.mask, acc),
    )


SUPPORTS_OWN_BLOCK = True  # block_backward honours Layout.own_block (as d_a + d_k of the regular kernels)


def block_forward(
    a: Tensor, a_inv: Optional[Tensor], k: Tensor, k_inv: Optional[Tensor], tau: Tensor, sub_dim: int, layout: Layout
) -> tuple[Tensor, Tensor, Tensor]:
    """One block's forward statistics (docs/block-engine.md), computed by the CUDA kernels.

    Args:
        a: [A, D] anchor rows, CUDA, float16 / bfloat16 / float32 / float64, any strides.
        a_inv: [A] inverse norms in the accumulation dtype, or None (no normalization).
        k: [K, D] key rows, same device and dtype as ``a``.
        k_inv: [K] inverse norms, or None.
        tau: 0-dim temperature (accumulation dtype).
        sub_dim: the number of leading features the block compares (read in place).
        layout: positives and exclusions of the block.

    Returns:
        (lse [A], pos_sum [A], pos_weight [A]) in the accumulation dtype.

    Raises:
        RuntimeError: the extension cannot run here (the message says why), or an argument is invalid
            (the message names it).

    Example:
        >>> import torch
        >>> from fastcl.contract import Layout
        >>> if unavailable_reason() is None:
        ...     a = torch.randn(4, 8, device="cuda")
        ...     lse, pos_sum, pos_weight = block_forward(a, None, a, None, torch.tensor(0.5, device="cuda"), 8,
        ...                                              Layout(self_offset=0))
    """
    tau = tau.to(device=a.device, dtype=accumulation_dtype(a.dtype))
    return tuple(_ops().block_forward(a, a_inv, k, k_inv, tau, sub_dim, *layout_arguments(layout, a)))


def block_backward(
    a: Tensor,
    a_inv: Optional[Tensor],
    k: Tensor,
    k_inv: Optional[Tensor],
    tau: Tensor,
    sub_dim: int,
    layout: Layout,
    lse: Tensor,
    alpha: Tensor,
    beta: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One block's gradients with respect to the raw rows (normalization backward fused), and Σ G·s.

    Args:
        a, a_inv, k, k_inv, tau, sub_dim, layout: as :func:`block_forward`.
        lse: [A] the GLOBAL per-anchor statistic (merged over all blocks).
        alpha, beta: [A] per-anchor coefficients of G = alpha·exp(s − lse) − beta·P (sigmoid: alpha·σ(s + b)).

    Returns:
        (d_a [A, sub_dim], d_k [K, sub_dim] or None for ``layout.own_block``, whose d_a is the rows' whole
        gradient, gs) in the accumulation dtype; gs is 0-dim (Σ G·s) for the
        softmax epilogue and [2] (Σ G·s, Σ G) for the sigmoid epilogue. Deterministic: every output is
        summed in a fixed order.

    Raises:
        RuntimeError: as :func:`block_forward`.

    Example:
        >>> import torch
        >>> from fastcl.contract import Layout
        >>> if unavailable_reason() is None:
        ...     a, tau = torch.randn(4, 8, device="cuda"), torch.tensor(0.5, device="cuda")
        ...     lse, _, _ = block_forward(a, None, a, None, tau, 8, Layout(self_offset=0))
        ...     ones = torch.ones(4, device="cuda")
        ...     d_a, d_k, gs = block_backward(a, None, a, None, tau, 8, Layout(self_offset=0), lse, ones, ones)
    """
    acc = accumulation_dtype(a.dtype)
    tau = tau.to(device=a.device, dtype=acc)
    lse, alpha, beta = (x.to(device=a.device, dtype=acc).contiguous() for x in (lse, alpha, beta))
    layout_args = layout_arguments(layout, a)
    d_a, d_k, grad_sums = _ops().block_backward(a, a_inv, k, k_inv, tau, sub_dim, *layout_args, lse, alpha, beta)
    sums = grad_sums.sum(0)
    gs = sums if layout.epilogue == "sigmoid" else sums[0]
    if layout.own_block:
        # The rows' whole gradient from the regular two-sided backward (4 GEMM-units, not the 3 an own
        # block allows): the key side of a block whose keys are its anchors lands on the same rows.
        return d_a + d_k, None, gs
    return d_a, d_k, gs
