"""Test configuration: Triton kernels run through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
