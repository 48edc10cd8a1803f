"""CIFAR-10 / CIFAR-100 from a local directory in the standard python-pickle format.

Nothing is downloaded. ``data_dir`` is either the extracted archive folder itself
(``cifar-10-batches-py`` / ``cifar-100-python``) or a folder that contains it.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def load_cifar(name: str, data_dir: str | Path | None):
    """Return ``(x_train, y_train, x_test, y_test, num_classes)`` with uint8 ``[N, 3, 32, 32]`` images."""
    if name not in _LAYOUT:
        raise ValueError(f"name must be one of {sorted(_LAYOUT)}, got {name!r}")
    folder, train_files, test_files, label_key, num_classes = _LAYOUT[name]
    root = _find_root(name, data_dir, folder, train_files + test_files)
    x_train, y_train = _read(root, train_files, label_key)
    x_test, y_test = _read(root, test_files, label_key)
    return x_train, y_train, x_test, y_test, num_classes


def _find_root(name: str, data_dir, folder: str, files: list[str]) -> Path:
    how = (
        f"--dataset {name} reads the python-pickle version of the dataset from --data-dir; nothing is "
        f"downloaded. Extract the official archive (https://www.cs.toronto.edu/~kriz/cifar.html, "
        f"'python version') so that DIR/{folder}/{files[0]} exists, then pass --data-dir DIR "
        f"(or --data-dir DIR/{folder})."
    )
    if data_dir is None:
        raise ValueError(f"--data-dir is required. {how}")
    for root in (Path(data_dir), Path(data_dir) / folder):
        if all((root / f).is_file() for f in files):
            return root
    raise FileNotFoundError(f"no {name} files {files} found in {data_dir!s} or {Path(data_dir) / folder}. {how}")


def _read(root: Path, files: list[str], label_key: bytes):
    images, labels = [], []
    for name in files:
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
