"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upsampled to 32x32 RGB uint8.

Nothing is downloaded: the data ships inside scikit-learn. The split is a fixed 80/20 random
split seeded by ``split_seed``, so every run sees the same test set.

>>> x_train, y_train, x_test, y_test = load_digits()
>>> x_train.shape, x_train.dtype, int(y_train.max())
(torch.Size([1438, 3, 32, 32]), torch.uint8, 9)
"""

from __future__ import annotations

import torch


def load_digits(size: int = 32, test_fraction: float = 0.2, split_seed: int = 0):
    """Return ``(x_train, y_train, x_test, y_test)``: uint8 ``[N, 3, size, size]`` images, int64 labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).float()[:, None] / 16.0  # values 0..16
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]
