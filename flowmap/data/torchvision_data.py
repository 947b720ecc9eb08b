"""MNIST and CIFAR-10 from torchvision's on-disk formats, as images in ``[-1, 1]``."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.datasets import CIFAR10, MNIST

from flowmap.data.base import FiniteFlowDataModule

__all__ = ["TORCHVISION_NAMES", "TorchvisionDataModule"]

#: Valid ``name`` values of :class:`TorchvisionDataModule`.
TORCHVISION_NAMES: tuple[str, ...] = ("mnist", "cifar10")

#: Class names by label: CIFAR-10's as torchvision reads them from ``batches.meta``; MNIST's
#: digits.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    "mnist": tuple(str(d) for d in range(10)),
}


class _UncheckedCIFAR10(CIFAR10):
    """CIFAR-10 that checks files exist instead of checking their md5 sums.

    For copies that are not byte-identical to the official archive (re-pickled, or the tiny
    stand-ins of ``tests/fakes.py``). Overrides torchvision's two md5 checks,
    ``_check_integrity`` and ``_load_meta``.
    """

    def _check_integrity(self) -> bool:
        return not _missing_files("cifar10", self.root)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def _folder(name: str, root: str | Path) -> Path:
    """The folder torchvision reads ``name`` from under ``root``."""
    if name == "cifar10":
        return Path(root) / CIFAR10.base_folder
    return Path(root) / "MNIST" / "raw"


def _expected_files(name: str) -> list[str]:
    """File names torchvision needs for ``name`` (both splits), inside :func:`_folder`."""
    if name == "cifar10":
        files = [f for f, _ in CIFAR10.train_list + CIFAR10.test_list]
        return [*files, CIFAR10.meta["filename"]]
    return [os.path.splitext(url)[0] for url, _ in MNIST.resources]  # unzipped idx files


def _missing_files(name: str, root: str | Path) -> list[str]:
    folder = _folder(name, root)
    return [f for f in _expected_files(name) if not (folder / f).is_file()]


class TorchvisionDataModule(FiniteFlowDataModule):
    """MNIST ``(1, 28, 28)`` (or ``(1, 32, 32)`` with ``pad_to_32``) or CIFAR-10 ``(3, 32, 32)``.

    Pixels ``p`` map to ``p / 127.5 − 1 ∈ [-1, 1]``. The official splits are used (60k/10k
    MNIST, 50k/10k CIFAR-10); each split is held in memory as uint8 and converted batch by batch.
    A batch is ``(B, *data_shape)`` float32, or with ``labels=True`` ``[x, y]`` with ``y`` the
    torchvision targets, int64 ``(B,)`` in ``0..9`` (:attr:`class_names`: CIFAR-10's
    ``"airplane"`` … ``"truck"``, MNIST's ``"0"`` … ``"9"``).

    Without ``download``, the constructor checks that the files torchvision reads are under
    ``root`` (``root/cifar-10-batches-py/`` or ``root/MNIST/raw/``, unzipped idx files) and
    raises ``FileNotFoundError`` before any training if not. With ``download=True`` the files
    are fetched in ``prepare_data`` (rank 0 only).

    Args:
        name: ``"mnist"`` or ``"cifar10"``.
        root: directory holding the dataset in torchvision's layout.
        batch_size: training batch size (``drop_last=True``).
        download: download missing files (needs internet).
        num_workers: DataLoader workers.
        n_val: size of the fixed validation set (test images).
        pad_to_32: MNIST only: pad 2 background pixels (value −1) on each side to 32×32, the
            size U-Nets with several downsamplings want. Ignored for CIFAR-10.
        seed: seed of the training shuffle.
        check_integrity: verify CIFAR-10's md5 sums as torchvision does. Pass ``False`` for a
            copy that is not byte-identical to the official files (a re-pickled copy, or the
            fake of ``tests/fakes.py``): only the presence of the files is then checked.
            MNIST has no md5 check on load, so this does not affect it.
        labels: yield ``[x, y]`` batches with class labels, for class-conditional models.
    """

    is_image = True

    def __init__(
        self,
        name: str,
        root: str,
        batch_size: int = 128,
        download: bool = False,
        num_workers: int = 0,
        n_val: int = 1024,
        pad_to_32: bool = False,
        seed: int = 0,
        check_integrity: bool = True,
        labels: bool = False,
    ) -> None:
        if name not in TORCHVISION_NAMES:
            raise ValueError(
                f"Unknown torchvision dataset {name!r}; choose one of "
                f"{', '.join(TORCHVISION_NAMES)}."
            )
        super().__init__(
            batch_size=batch_size, n_val=n_val, num_workers=num_workers, seed=seed, labels=labels
        )
        self.save_hyperparameters()
        self.name = name
        self.root = os.path.expanduser(root)
        self.download = download
        self.pad_to_32 = pad_to_32
        self.check_integrity = check_integrity
        self.dataset_name = {"mnist": "MNIST", "cifar10": "CIFAR-10"}[name]
        if not download:
            self._check_files()

    def _check_files(self) -> None:
        missing = _missing_files(self.name, self.root)
        if missing:
            folder = _folder(self.name, self.root)
            what = f"missing {', '.join(missing)}" if folder.is_dir() else "no such folder"
            raise FileNotFoundError(
                f"{self.dataset_name} is not in {folder} ({what}); put "
                f"torchvision's {self.dataset_name} files there, point --data.root at the "
                f"folder that holds them, or pass --data.download=true when online."
            )

    @property
    def data_shape(self) -> tuple[int, ...]:
        """``(3, 32, 32)`` for CIFAR-10; ``(1, 28, 28)``, or ``(1, 32, 32)`` padded, for MNIST."""
        if self.name == "cifar10":
            return (3, 32, 32)
        return (1, 32, 32) if self.pad_to_32 else (1, 28, 28)

    def _dataset(self, train: bool, download: bool = False) -> CIFAR10 | MNIST:
        if self.name == "mnist":
            return MNIST(self.root, train=train, download=download)
        cls = CIFAR10 if self.check_integrity else _UncheckedCIFAR10
        try:
            return cls(self.root, train=train, download=download)
        except RuntimeError as e:  # a user's files, not a bug: one sentence, no traceback
            raise ValueError(
                f"torchvision rejected the CIFAR-10 files in {_folder(self.name, self.root)} "
                f"({e}); replace them with the official files, or pass "
                f"--data.check_integrity=false if they are a deliberately different copy."
            ) from None

    def prepare_data(self) -> None:
        """Download both splits when ``download=True`` (called on one process only)."""
        if self.download:
            self._dataset(train=True, download=True)
            self._dataset(train=False, download=True)

    def _read(self, split: str) -> tuple[Tensor, Tensor]:
        """Images (uint8 ``(N, *data_shape)``) and int64 targets ``(N,)`` of ``split``."""
        if not self.download:
            self._check_files()
        ds = self._dataset(train=split == "train")
        y = torch.as_tensor(ds.targets, dtype=torch.long)
        if self.name == "cifar10":
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), y
        x = ds.data.to(torch.uint8)[:, None]
        return (F.pad(x, (2, 2, 2, 2), value=0) if self.pad_to_32 else x), y

    def _load_split(self, split: str) -> Tensor:
        x, y = self._read(split)
        # torchvision reads the targets with the images: keep them rather than read twice.
        self._label_cache.setdefault(split, y)
        return x

    def _load_labels(self, split: str) -> Tensor:
        return self._read(split)[1]

    def _load_class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES[self.name]
