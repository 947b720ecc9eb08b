"""sklearn's digits (8×8, 1 channel), scaled to [-1, 1], with a fixed train/test split."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_digits_split"]


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` float32 in [-1, 1].

    The split is a fixed permutation drawn with ``seed`` (1797 images; 20% test by default).
    The data ships with scikit-learn, so this works offline.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
