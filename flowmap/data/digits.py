"""sklearn's digits (8×8, 1 channel), scaled to [-1, 1], with a fixed train/test split."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from flowmap.data.base import FiniteFlowDataModule

__all__ = ["DigitsDataModule", "load_digits_split"]


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` float32 in [-1, 1].

    The split is a fixed permutation drawn with ``seed`` (1797 images; 20% test by default).
    The data ships with scikit-learn, so this works offline.
    """
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


class DigitsDataModule(FiniteFlowDataModule):
    """sklearn's 8×8 digits as images ``(1, 8, 8)`` in ``[-1, 1]`` (pixel ``p/16 · 2 − 1``).

    The split is always :func:`load_digits_split` with its defaults (1438 train / 359 test
    images), whatever ``seed`` is: every run, and the digits feature classifier, see the same
    test set. ``seed`` only drives the shuffling of training batches.

    A batch is ``(B, 1, 8, 8)`` float32, or with ``labels=True`` ``[x, y]`` with ``y`` the digit
    shown, int64 ``(B,)`` in ``0..9`` (:attr:`class_names` ``"0"`` … ``"9"``).

    Args:
        batch_size: training batch size (``drop_last=True``; 5 batches per epoch at 256).
        seed: seed of the training shuffle.
        n_val: size of the fixed validation set (test images; capped at 359).
        num_workers: DataLoader workers.
        labels: yield ``[x, y]`` batches with class labels, for class-conditional models.
    """

    is_image = True
    dataset_name = "digits"

    def __init__(
        self,
        batch_size: int = 256,
        seed: int = 0,
        n_val: int = 256,
        num_workers: int = 0,
        labels: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size, n_val=n_val, num_workers=num_workers, seed=seed, labels=labels
        )
        self.save_hyperparameters()
        self.name = "digits"

    @property
    def data_shape(self) -> tuple[int, ...]:
        """``(1, 8, 8)``."""
        return (1, 8, 8)

    def _load_split(self, split: str) -> Tensor:
        x_train, _, x_test, _ = load_digits_split()
        return x_train if split == "train" else x_test

    def _load_labels(self, split: str) -> Tensor:
        _, y_train, _, y_test = load_digits_split()
        return y_train if split == "train" else y_test

    def _load_class_names(self) -> tuple[str, ...]:
        return tuple(str(d) for d in range(10))
