"""Triton kernels, installed as ``fastcl.kernels`` (the ``triton`` backend of :mod:`fastcl.dispatch`).

Each loss's file holds its kernels, host launchers and backward; this package re-exports the backend
contract (``<loss>_forward`` / ``<loss>_backward``, see ``fastcl/torch_backend/__init__.py``) lazily, so
that importing it does not import triton.
"""
import importlib

_EXPORTS = {
    "ntxent_forward": "ntxent",
    "ntxent_backward": "ntxent",
    "infonce_forward": "infonce",
    "infonce_backward": "infonce",
    "supcon_forward": "supcon",
    "supcon_backward": "supcon",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
