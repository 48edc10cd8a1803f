"""Optional dependencies: the core (the losses) needs torch only; each extra's module checks what it needs
when it is imported, and says which extra brings it.

Example:
    >>> from fastcl._extras import require
    >>> require("math", "train", "fastcl train").pi  # present: returns the module
    3.141592653589793
"""

from __future__ import annotations

import importlib
from types import ModuleType

# pip name of each import name that differs
_PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; ``extra`` names the fastcl extra that brings it."""

    def __init__(self, message: str, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Imports ``module`` or raises an ImportError naming the extra that installs it.

    Args:
        module: the import name, e.g. ``"kornia"``.
        extra: the fastcl extra that brings it, e.g. ``"augment"``.
        feature: what needs it, for the message, e.g. ``"fastcl.augment"``.

    Raises:
        MissingExtraError: an ImportError: ``module`` is not installed; the message says
            ``pip install 'fastcl[<extra>]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = _PIP_NAMES.get(module, module)
        raise MissingExtraError(
            f"{feature} needs the '{package}' package, which is not installed: pip install 'fastcl[{extra}]' "
            f"(or pip install {package})",
            extra,
        ) from error
