"""Built-in datasets for the reference trainer; nothing is downloaded at run time.

``build_source(name, ...)`` returns a view source (see :mod:`fastcl.data.sources`) on the device:

- ``spirograph``: generated (Foster et al. 2021), regression targets, rendered on the device.
- ``digits``: scikit-learn's bundled 8x8 digits upsampled to 32x32 RGB.
- ``cifar10`` / ``cifar100``: the python-pickle archives in ``data_dir``.
- ``folder``: ``data_dir/<class>/<image>`` (optionally ``data_dir/{train,test}/<class>/<image>``).
- ``synthetic``: uniform-noise uint8 images with random labels -- for timing only (``--time-epoch``).

>>> source = build_source("spirograph", train_size=8, test_size=4)
>>> source.views(torch.arange(3)).shape
torch.Size([3, 2, 3, 32, 32])
"""

from __future__ import annotations

import torch

from fastcl._extras import require

require("numpy", "train", "fastcl.data")

from .cifar import load_cifar  # noqa: E402
from .digits import load_digits  # noqa: E402
from .folder import load_folder  # noqa: E402
from .sources import VIEWS, ImageSource, SpirographSource, Task  # noqa: E402
from .spirograph import NUISANCE_RANGES, TARGET_RANGES, render_spirograph, sample_uniform, unit_targets  # noqa: E402

DATASETS = ("spirograph", "digits", "cifar10", "cifar100", "folder", "synthetic")
_DEFAULT_SIZES = {"spirograph": (100_000, 20_000), "synthetic": (50_000, 10_000)}


def build_source(
    name: str,
    data_dir: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    aug_preset: str = "simclr",
    aug_strength: float = 1.0,
):
    """Load (or generate) dataset ``name`` onto ``device``; ``train_size``/``test_size`` take fixed subsets."""
    device = torch.device(device)
    for arg, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}")
    if name == "spirograph":
        default_train, default_test = _DEFAULT_SIZES[name]
        return SpirographSource(train_size or default_train, test_size or default_test, device, seed)
    if name == "digits":
        x_train, y_train, x_test, y_test = load_digits()
        num_classes = 10
    elif name in ("cifar10", "cifar100"):
        x_train, y_train, x_test, y_test, num_classes = load_cifar(name, data_dir)
    elif name == "folder":
        x_train, y_train, x_test, y_test, classes = load_folder(data_dir)
        num_classes = len(classes)
    elif name == "synthetic":
        g = torch.Generator().manual_seed(0)
        n_train, n_test = train_size or _DEFAULT_SIZES[name][0], test_size or _DEFAULT_SIZES[name][1]
        x_train = torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8)
        x_test = torch.randint(0, 256, (n_test, 3, 32, 32), generator=g, dtype=torch.uint8)
        y_train, y_test, num_classes = (
            torch.randint(0, 10, (n_train,), generator=g),
            torch.randint(0, 10, (n_test,), generator=g),
            10,
        )
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    x_train, y_train = _subset(x_train, y_train, train_size, "train_size")
    x_test, y_test = _subset(x_test, y_test, test_size, "test_size")
    return ImageSource(x_train, y_train, x_test, y_test, num_classes, device, aug_preset, aug_strength, seed)


def _subset(images: torch.Tensor, labels: torch.Tensor, size: int | None, arg: str):
    """A fixed random subset (seed 0, the same in every run) of ``size`` items; all of them if None."""
    if size is None:
        return images, labels
    if size > len(labels):
        raise ValueError(f"{arg} must be <= the split's size {len(labels)}, got {size}")
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:size]
    return images[keep], labels[keep]


__all__ = [
    "DATASETS",
    "NUISANCE_RANGES",
    "TARGET_RANGES",
    "VIEWS",
    "ImageSource",
    "SpirographSource",
    "Task",
    "build_source",
    "load_cifar",
    "load_digits",
    "load_folder",
    "render_spirograph",
    "sample_uniform",
    "unit_targets",
]
