"""Global-batch contrastive losses across ranks of a torch.distributed process group.

``distributed`` on every loss: "auto" (global negatives whenever a process group with world size > 1
is initialized), "local", "gather" (all-gather with gradient), "ring" (key blocks rotate around ranks).
"""
from __future__ import annotations

import torch.distributed as dist

MODES = ("auto", "local", "gather", "ring")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_mode(distributed: str) -> str:
    """"local", "gather" or "ring" for this call."""
    if distributed not in MODES:
        raise ValueError(f"distributed: expected one of {list(MODES)}, got {distributed!r}")
    if distributed == "auto":
        return "gather" if world_size() > 1 else "local"
    if distributed != "local" and world_size() == 1:
        return "local"
    return distributed
