"""Input checks shared by every loss (docs/spec.md, "Bad input").

Every failure is a ``ValueError`` (``TypeError`` for wrong types) whose message names the argument, what
was expected and what was received. Shape checks are free; value checks (finite inputs, τ > 0 for a tensor
τ) read the data and are only run when ``check_finite`` is on (never on meta tensors, which have no data).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

Temperature = Union[float, int, torch.Tensor]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


_SHAPES = {2: "2-D [N, D]", 3: "3-D [N, V, D]"}


def embeddings(name: str, t, ndim: Union[int, tuple[int, ...]]) -> None:
    """A floating tensor of rank ``ndim`` (or one of the ranks ``ndim``) with at least one row and one feature."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor (float64/float32/bfloat16/float16), got dtype {t.dtype}")
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ranks:
        raise ValueError(f"{name}: expected a {' or '.join(_SHAPES[r] for r in ranks)} tensor, got {_describe(t)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (N = 0), got {_describe(t)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name}: feature dimension D = 0, got {_describe(t)}")


def same_layout(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Views of one batch: same shape, dtype and device."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (as {first_name}), got {t.device}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name}: expected dtype {first.dtype} (as {first_name}), got {t.dtype}")
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name}: expected N = {first.shape[0]} rows (as {first_name}), got shape {tuple(t.shape)}"
            )
        if t.shape[-1] != first.shape[-1]:
            raise ValueError(
                f"{name}: expected D = {first.shape[-1]} features (as {first_name}), got shape {tuple(t.shape)}"
            )


def sub_dim(value: Optional[int], dim: int) -> int:
    """Returns the number of leading features the loss uses (D' = sub_dim or D)."""
    if value is None:
        return dim
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"sub_dim: expected an int or None, got {type(value).__name__}")
    if not 1 <= value <= dim:
        raise ValueError(f"sub_dim: expected 1 <= sub_dim <= D = {dim}, got {value}")
    return value


def temperature(
    name: str, value: Temperature, device: torch.device, check_values: bool, allow_tensor: bool = True
) -> None:
    if isinstance(value, torch.Tensor) and allow_tensor:
        if value.dim() != 0:
            raise ValueError(f"{name}: expected a Python float or a 0-dim tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor, got dtype {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name}: expected device {device} (as the embeddings), got {value.device}")
        if check_values and value.device.type != "meta":  # a meta tensor has no value to read
            v = float(value.detach())
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite value > 0, got {v}")
        return
    # numbers.Real admits NumPy scalars (numpy.float32 is not a float subclass) and Python ints.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a float or a 0-dim tensor" if allow_tensor else "a Python float"
        raise TypeError(f"{name}: expected {expected} > 0, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite value > 0, got {value}")


def flag(name: str, value) -> None:
    """A Python bool (a string such as "yes" is refused rather than read as True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool (True or False), got {type(value).__name__} {value!r}")


def finite(name: str, t: torch.Tensor) -> None:
    """Raises on NaN/Inf in ``t`` (reads the data: one device sync); a meta tensor has no data and passes."""
    if t.device.type == "meta":
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or Inf ({_describe(t)}); pass check_finite=False to skip this check")


def labels(value, n: int, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor of integer class ids, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer dtype, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"labels: expected shape ({n},) (one label per sample), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"labels: expected device {device} (as features), got {value.device}")


def targets(value, n: int, device: torch.device) -> None:
    """InfoNCE's explicit positives: [N] integer key indices, one per query."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor of integer key indices, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer dtype, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(f"targets: expected shape ({n},) (one key index per query), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"targets: expected device {device} (as q), got {value.device}")


def mask(value, n: int, device: torch.device) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2 or tuple(value.shape) != (n, n):
        raise ValueError(f"mask: expected shape ({n}, {n}) (N x N), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"mask: expected device {device} (as features), got {value.device}")


def choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def weight(value, shapes: Sequence[tuple[int, ...]], device: torch.device) -> None:
    """Per-anchor weights: a floating tensor of one of ``shapes`` (per sample, or the shape of the
    per-anchor losses) on the embeddings' device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor of per-anchor weights, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"weight: expected a floating dtype, got {value.dtype}")
    if tuple(value.shape) not in [tuple(s) for s in shapes]:
        expected = " or ".join(str(tuple(s)) for s in shapes)
        raise ValueError(f"weight: expected shape {expected} (per sample, or per anchor), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"weight: expected device {device} (as the embeddings), got {value.device}")
