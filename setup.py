"""Ahead-of-time build of the CUDA extension ``fastcl._C`` (csrc/); all other metadata is in pyproject.toml.

The extension is built only when torch is importable at build time, is a CUDA build, and a CUDA toolkit is
found; ``FASTCL_BUILD_CUDA=0`` opts out. pip builds in an isolated environment without torch unless told
otherwise, so an ahead-of-time build needs ``pip install --no-build-isolation .`` with the CUDA torch
already installed. Everything else (CPU-only machines, no toolkit, isolated builds) installs the pure
Python package, and ``backend="cuda"`` then compiles the same sources just in time on first use.
``TORCH_CUDA_ARCH_LIST`` picks the architectures (default here: sm_80 and sm_90, plus PTX for newer GPUs).
"""

import os

from setuptools import setup


def cuda_extension() -> dict:
    if os.environ.get("FASTCL_BUILD_CUDA", "1") == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    extension = CUDAExtension(
        "fastcl._C",
        sources=["csrc/block_ops.cpp", "csrc/block_kernels.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension())
