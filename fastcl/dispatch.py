"""The one place that decides which backend computes a loss, and looks up its implementation.

A backend is a module exposing the block primitive ``block_forward`` / ``block_backward`` (docs/block-
engine.md; the engine runs it for every loss in every distributed mode) and, when its backward honours
``Layout.own_block``, ``SUPPORTS_OWN_BLOCK = True``. Nothing else imports a backend module by name.

"auto"'s choice for CUDA tensors is fastcl/selfcheck.py's: the self-check runs losses from the registry, which
resolve their backend here, so it sits above this module and hands its verdict down (:func:`set_auto_choice`;
``import fastcl`` imports it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, Optional

import torch

from fastcl.contract import triton_interpreted

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)


def constant_for_compile(fn):
    """Marks ``fn``'s result as a constant for torch.compile, as ``torch.compiler.assume_constant_result``
    does (it sets exactly this attribute), without importing torch._dynamo when fastcl is imported: that
    import would add about a second to every ``import fastcl``."""
    fn._dynamo_marked_constant = True
    return fn


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _cuda_extension_error() -> str | None:
    """None when the csrc extension can run here (built, or buildable just in time), else the reason it cannot."""
    return importlib.import_module(_MODULES["cuda"]).unavailable_reason()


def unavailable_reason(backend: str, device: torch.device | None = None) -> str | None:
    """Why ``backend`` cannot run tensors on ``device`` here (None when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_importable():
            return (
                "the 'triton' package is not installed (CUDA builds of torch bring it; otherwise "
                "pip install 'fastcl[triton]', and TRITON_INTERPRET=1 to run it on the CPU)"
            )
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if on_cuda or triton_interpreted():
            return None
        if device is not None:
            return (
                f"it needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 to run it on the CPU interpreter"
            )
        return "no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU interpreter)"
    if backend == "cuda":
        reason = _cuda_extension_error()
        if reason is None and device is not None and device.type != "cuda":
            reason = f"it needs CUDA tensors, got device {device}"
        return reason
    raise ValueError(f"backend: expected one of {list(_CHOICES)}, got {backend!r}")


def available_backends() -> list[str]:
    """Backends that can run on this machine, e.g. ``["torch", "triton"]`` on a GPU machine.

    Returns:
        The names, in preference order; ``"torch"`` is always there. ``"triton"`` needs triton and a CUDA
        device (or ``TRITON_INTERPRET=1``); ``"cuda"`` needs the csrc extension and a CUDA device.

    Example:
        >>> "torch" in available_backends()
        True
    """
    return [b for b in BACKENDS if unavailable_reason(b) is None]


# (device, dtype, loss) -> whether "auto" runs triton: fastcl.selfcheck.auto_uses_triton, set when fastcl is imported.
AutoChoice = Callable[[torch.device, Optional[torch.dtype], Optional[str]], bool]
_auto_uses_triton: AutoChoice = lambda device, dtype, loss: False  # noqa: E731  (until the self-check sets it)


def set_auto_choice(choice: AutoChoice) -> None:
    """Installs "auto"'s choice for the triton backend (fastcl.selfcheck does, once; tests may override it)."""
    global _auto_uses_triton
    _auto_uses_triton = choice


def resolve(backend: str, device: torch.device, dtype: torch.dtype | None = None, loss: str | None = None) -> str:
    """Maps ``backend`` (possibly "auto", possibly overridden by ``FASTCL_BACKEND``) to a concrete one.

    ``dtype`` and ``loss`` (a registry name) name the case for "auto"'s self-check; the losses pass both.
    """
    if not isinstance(backend, str) or backend not in _CHOICES:
        raise ValueError(f"backend: expected one of {list(_CHOICES)}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("FASTCL_BACKEND", "auto") or "auto"
        if backend not in _CHOICES:
            raise ValueError(f"FASTCL_BACKEND: expected one of {list(_CHOICES)}, got {backend!r}")
    if backend == "auto":
        return "triton" if _auto_uses_triton(device, dtype, loss) else "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        available = [b for b in BACKENDS if unavailable_reason(b, device) is None]
        raise RuntimeError(f"backend={backend!r} cannot run here: {reason}. Available for {device}: {available}")
    return backend


_MODULES = {"torch": "fastcl.torch_backend", "triton": "fastcl.kernels", "cuda": "fastcl.cuda_backend"}


def module(backend: str) -> ModuleType:
    """The module implementing ``backend`` (a concrete name from :func:`resolve`)."""
    return importlib.import_module(_MODULES[backend])


@constant_for_compile  # an import and attribute lookups: constant for a traced graph
def block_primitive_error(backend: str) -> str | None:
    """Why ``backend``'s module has no block primitive (None when it has ``block_forward`` and ``block_backward``)."""
    try:
        impl = module(backend)
    except ImportError as error:
        return f"its module {_MODULES[backend]} cannot be imported ({error})"
    missing = [name for name in ("block_forward", "block_backward") if not hasattr(impl, name)]
    if missing:
        return f"its module {_MODULES[backend]} does not expose {' / '.join(missing)} (docs/block-engine.md)"
    return None


def resolve_block(backend: str, device: torch.device, dtype: torch.dtype | None = None, loss: str | None = None) -> str:
    """Like :func:`resolve`, for the block engine: the backend must also expose the block primitive.

    "auto" on CUDA picks triton when its primitive is there, else torch; an explicit backend without the
    primitive raises a ``RuntimeError`` that says why.
    """
    explicit = backend if backend != "auto" else (os.environ.get("FASTCL_BACKEND", "auto") or "auto")
    concrete = resolve(backend, device, dtype, loss)
    reason = block_primitive_error(concrete)
    if reason is None:
        return concrete
    if explicit == "auto":
        return "torch"
    raise RuntimeError(f"backend={concrete!r} cannot run the losses (the block engine needs its primitive): {reason}")


def block_primitive(backend: str):
    """(block_forward, block_backward) of a backend that :func:`resolve_block` accepted."""
    impl = module(backend)
    return impl.block_forward, impl.block_backward


def supports_own_block(backend: str) -> bool:
    """Whether ``backend``'s block backward honours ``Layout.own_block`` (its module's ``SUPPORTS_OWN_BLOCK``)."""
    return bool(getattr(module(backend), "SUPPORTS_OWN_BLOCK", False))
