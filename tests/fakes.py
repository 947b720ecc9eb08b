"""Tiny stand-ins for on-disk datasets, written in the exact layouts the loaders read.

The fake CIFAR-10 has the right file names and pickle format but random pixels, so its md5 sums
cannot match torchvision's table of the official files: load it with
``TorchvisionDataModule(..., check_integrity=False)``, which checks that the files exist instead.
(Monkeypatching ``CIFAR10._check_integrity`` alone would not be enough: torchvision checks the
md5 of ``batches.meta`` a second time in ``_load_meta``.) MNIST has no md5 check on load.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["make_fake_cifar10", "make_fake_mnist", "make_image_folder"]

CIFAR10_CLASSES = [
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
]


def _dump(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_fake_cifar10(root: str | Path, n_train: int = 64, n_test: int = 16) -> Path:
    """Write random uint8 images in torchvision's CIFAR-10 layout; return ``root``.

    Creates ``root/cifar-10-batches-py/`` with ``data_batch_1`` … ``data_batch_5`` (the
    ``n_train`` images split across them), ``test_batch`` (``n_test`` images) and
    ``batches.meta``; each batch is a pickled dict with ``"data"`` uint8 ``(N, 3072)`` (CHW
    flattened) and ``"labels"``, as in the official archive. Deterministic (seed 0).
    """
    rng = np.random.default_rng(0)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict[str, object]:
        return {
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n).tolist(),
        }

    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump(batch(len(part)), folder / f"data_batch_{i}")
    _dump(batch(n_test), folder / "test_batch")
    _dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 10000}, folder / "batches.meta")
    return Path(root)


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX format: magic = 0x08 (uint8) << 8 | ndim, then each dim as big-endian uint32.
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fake_mnist(root: str | Path, n_train: int = 64, n_test: int = 16) -> Path:
    """Write random 28×28 uint8 digits in torchvision's MNIST layout; return ``root``.

    Creates the four unzipped IDX files in ``root/MNIST/raw/``. The images are zero (black)
    on a 2-pixel border, like real MNIST, with random pixels inside. Deterministic (seed 0).
    """
    rng = np.random.default_rng(0)
    folder = Path(root) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 2:-2, 2:-2] = rng.integers(0, 256, size=(n, 24, 24), dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, size=n))
    return Path(root)


def make_image_folder(root: str | Path, n: int = 8, size: int = 16) -> Path:
    """Write ``n`` small random RGB images under ``root``; return ``root``.

    Exercises what the folder loader must handle: half the images sit in a subfolder
    (recursive search), every third one is a JPEG, and the images are not square
    (``size × (size + 4)``, so they must be centre-cropped). Deterministic (seed 0).
    """
    rng = np.random.default_rng(0)
    root = Path(root)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
        folder = root / "sub" if i % 2 else root
        suffix = ".jpg" if i % 3 == 0 else ".png"
        Image.fromarray(pixels).save(folder / f"img_{i:03d}{suffix}")
    return root


class VelocityNet(torch.nn.Module):
    """A plain velocity net ``model(x, t)`` as TorchCFM or Meta's flow_matching write one (for the
    foreign-teacher tests): no flowmap base class, weights saved with safetensors."""

    def __init__(self, dim: int = 64, width: int = 32) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, dim)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        out = self.body(torch.cat([flat, t.reshape(-1, 1).to(flat)], 1))
        return out.reshape(x.shape)
