"""Test configuration: Triton kernels run through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import importlib.util
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


# Test modules that import an optional extra at collection. Where it is missing (the GPU machines have no
# network, so no kornia or pytorch-metric-learning unless they travel as wheels) they are left out, and the
# header says so, instead of failing the collection of every other test (bench/run_gpu.sh first-contact).
_NEEDS = {
    "kornia": (
        "test_augment.py",
        "test_augment_fused.py",
        "test_docs.py",
        "test_trainer.py",
        "test_gradcache_trainer.py",
    ),
    "pytorch_metric_learning": ("test_compat.py", "test_compat_ddp.py", "test_parity.py"),
}
_MISSING = sorted(module for module in _NEEDS if not _installed(module))
collect_ignore = [name for module in _MISSING for name in _NEEDS[module]]


def pytest_report_header(config):
    if _MISSING:
        return [f"left out for want of {', '.join(_MISSING)}: {', '.join(collect_ignore)}"]
    return []


# The device Triton tests run their tensors on: CUDA when present, else CPU through the interpreter.
TRITON_DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def triton_device() -> torch.device:
    """Skips when triton is not installed; otherwise the device the triton backend runs on here."""
    pytest.importorskip("triton")
    return TRITON_DEVICE


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)
