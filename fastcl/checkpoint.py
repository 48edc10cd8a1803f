"""Atomic checkpoints and RNG state capture for exact resumption.

``save_atomic`` writes to ``<path>.tmp`` and renames it over ``path`` (``os.replace`` is atomic on POSIX
and Windows), so a run killed while saving leaves the previous checkpoint intact.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
>>> save_atomic({"epoch": 3}, path)
>>> torch.load(path)["epoch"]
3
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from fastcl._extras import require

np = require("numpy", "train", "fastcl.checkpoint")


def save_atomic(state: dict, path: str | Path) -> None:
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state(*generators: torch.Generator) -> dict:
    """Python, NumPy, torch CPU, CUDA and the given generators' states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if len(state["generators"]) != len(generators):
        raise ValueError(f"checkpoint holds {len(state['generators'])} generator states, expected {len(generators)}")
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)
