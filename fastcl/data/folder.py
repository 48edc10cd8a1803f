"""A folder of class sub-directories of images (``ROOT/<class>/<image>``), resized to a square uint8 tensor.

If ``ROOT/train`` and ``ROOT/test`` both exist they are the splits; otherwise a fixed, seeded 80/20 split
of ``ROOT`` is used. Everything is loaded into memory, so this is meant for small datasets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_folder(data_dir: str | Path | None, size: int = 32, test_fraction: float = 0.2, split_seed: int = 0):
    """Return ``(x_train, y_train, x_test, y_test, class_names)``; images uint8 ``[N, 3, size, size]``."""
    if data_dir is None:
        raise ValueError("--dataset folder needs --data-dir ROOT with one sub-directory of images per class")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root} is not a directory (expected ROOT/<class>/<image files>)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _class_names(root / "train")
        x_train, y_train = _load_split(root / "train", classes, size)
        x_test, y_test = _load_split(root / "test", classes, size)
        return x_train, y_train, x_test, y_test, classes
    classes = _class_names(root)
    images, labels = _load_split(root, classes, size)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * len(labels)))
    return images[order[n_test:]], labels[order[n_test:]], images[order[:n_test]], labels[order[:n_test]], classes


def _class_names(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"--data-dir {root} must contain at least 2 class sub-directories, found {classes}")
    return classes


def _load_split(root: Path, classes: list[str], size: int):
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(path) as img:
                    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
                    images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
                labels.append(label)
    if not images:
        raise ValueError(f"no images ({sorted(IMAGE_SUFFIXES)}) found under {root}/<class>/")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)
