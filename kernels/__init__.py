"""Triton kernels, installed as ``fastcl.kernels`` (the ``triton`` backend of :mod:`fastcl.dispatch`).

One loss-kernel family: ``block.py`` holds the block primitive (``block_forward`` / ``block_backward``,
docs/block-engine.md) that the engine runs for every loss in every mode; this package re-exports it (and
``SUPPORTS_OWN_BLOCK``, once ``block.py`` defines it) lazily, so that importing it does not import triton.
"""

import importlib

_EXPORTS = {"block_forward": "block", "block_backward": "block", "SUPPORTS_OWN_BLOCK": "block"}


def compile_specs(dtype, precision: str, sub_dim: int, layout: str = "contiguous") -> list:
    """Every shipped tile kernel as ``kernels._common.CompileSpec`` rows, for the compile-only report
    (``fastcl.profiler.compile_report``): rows of ``dtype`` in ``layout`` (``_common.LAYOUTS``), dots in
    ``precision``, width ``sub_dim``."""
    return importlib.import_module(f"{__name__}.block").compile_specs(dtype, precision, sub_dim, layout=layout)


def auxiliary_specs(dtype, sub_dim: int, layout: str = "contiguous") -> list:
    """The kernels outside the tile tables (the row epilogues, the augmentation kernels) as ``CompileSpec``
    rows of kind ``"launch"`` (compiled with their launch's own block sizes and 4 warps), for the address
    check (``compile_only.address_check``)."""
    specs = []
    for module in ("block", "augment"):
        specs += importlib.import_module(f"{__name__}.{module}").auxiliary_specs(dtype, sub_dim, layout=layout)
    return specs


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
