"""Any folder of PNG/JPEG images, resized and centre-cropped to a square, in ``[-1, 1]``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from flowmap.data.base import FiniteFlowDataModule, from_uint8

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataModule", "list_images"]

#: File extensions read by :class:`ImageFolderDataModule` (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def list_images(root: str | Path) -> list[Path]:
    """All files under ``root`` (recursively) with an :data:`IMAGE_EXTENSIONS` suffix, sorted."""
    return sorted(
        p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def load_image(path: str | Path, image_size: int, channels: int) -> Tensor:
    """Read one image as uint8 ``(channels, image_size, image_size)``.

    The image is converted to grey (``channels=1``) or RGB (``channels=3``), its shorter side
    resized to ``image_size`` (bicubic) and the centre square cropped.
    """
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataModule(FiniteFlowDataModule):
    """Images read recursively from ``root`` (``.png``/``.jpg``/``.jpeg``), as
    ``(channels, image_size, image_size)`` in ``[-1, 1]`` (pixel ``p / 127.5 − 1``).

    The file list is taken (and checked non-empty) in the constructor; the pixels are decoded on
    first use and held in memory as uint8, so this suits small images (≤ 64 px). A fixed,
    seeded ``test_fraction`` of the files (at least one) is held out as the ``"test"`` split;
    the rest is ``"train"``.

    A batch is ``(B, *data_shape)`` float32, or with ``labels=True`` ``[x, y]`` with ``y`` int64
    ``(B,)``: the class of an image is the first-level sub-folder of ``root`` it lies in (at any
    depth below it), classes numbered in sorted name order as torchvision's ``ImageFolder`` does
    (:attr:`class_names` are the folder names). Labels need every image in a sub-folder and at
    least two of them; the constructor raises ``ValueError`` otherwise. The split is not
    stratified: a small class may be missing from the test split.

    Args:
        root: folder searched recursively.
        image_size: side of the square output.
        channels: 1 (greyscale) or 3 (RGB).
        batch_size: training batch size (``drop_last=True``).
        n_val: size of the fixed validation set (test images; capped at the test split size).
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
        test_fraction: fraction of files held out as the test split (fixed by ``split_seed``).
        split_seed: seed of the train/test split.
        labels: yield ``[x, y]`` batches with the sub-folder class labels, for class-conditional
            models.
    """

    is_image = True

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 128,
        n_val: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        labels: bool = False,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}.")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
        super().__init__(
            batch_size=batch_size, n_val=n_val, num_workers=num_workers, seed=seed, labels=labels
        )
        self.save_hyperparameters()
        self.root = os.path.expanduser(root)
        self.image_size = image_size
        self.channels = channels
        self.dataset_name = f"the image folder {self.root}"
        if not Path(self.root).is_dir():
            raise FileNotFoundError(
                f"Image folder {self.root} does not exist; create it and put .png or .jpg images "
                f"in it (subfolders are searched), or point --data.root at such a folder."
            )
        files = list_images(self.root)
        if len(files) < 2:
            raise FileNotFoundError(
                f"Found {len(files)} .png/.jpg/.jpeg images under {self.root} (searched "
                f"recursively) but need at least 2 (a train and a test split); put images there "
                f"or point --data.root at a folder that has them."
            )
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(split_seed))
        n_test = min(max(1, round(test_fraction * len(files))), len(files) - 1)
        self._files = {
            "test": [str(files[i]) for i in perm[:n_test].sort().values],
            "train": [str(files[i]) for i in perm[n_test:].sort().values],
        }
        self._classes: tuple[str, ...] | None = None
        if labels:
            self._load_class_names()  # a folder without classes fails here, not in a loader

    @property
    def data_shape(self) -> tuple[int, ...]:
        """``(channels, image_size, image_size)``."""
        return (self.channels, self.image_size, self.image_size)

    def files(self, split: str) -> list[str]:
        """Paths of the images of ``split`` (``"train"`` or ``"test"``), sorted."""
        return list(self._files[split])

    def num_samples(self, split: str) -> int:
        return len(self._files[split])

    def iter_split(self, split: str, chunk: int) -> Iterator[Tensor]:
        """The files of ``split`` decoded ``chunk`` at a time, never all held (a latent cache of
        a large folder streams through this)."""
        files = self._files[split]
        for i in range(0, len(files), chunk):
            part = [load_image(p, self.image_size, self.channels) for p in files[i : i + chunk]]
            yield from_uint8(torch.stack(part))

    def _load_split(self, split: str) -> Tensor:
        images = [load_image(p, self.image_size, self.channels) for p in self._files[split]]
        return torch.stack(images)

    def _class_of(self, path: str) -> str | None:
        """The first-level sub-folder of ``root`` holding ``path``; ``None`` if directly in root."""
        parts = Path(path).relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else None

    def _load_class_names(self) -> tuple[str, ...]:
        """Sorted names of the first-level sub-folders holding images (computed once).

        Raises:
            ValueError: if an image lies directly in ``root``, or all images are in one class.
        """
        if self._classes is None:
            paths = self._files["train"] + self._files["test"]
            loose = [p for p in paths if self._class_of(p) is None]
            if loose:
                raise ValueError(
                    f"Class labels of the image folder {self.root} are its first-level "
                    f"sub-folders, but {len(loose)} of its images lie directly in it (e.g. "
                    f"{Path(loose[0]).name}); move each image into a sub-folder named after its "
                    f"class, or pass labels=False."
                )
            classes = tuple(sorted({self._class_of(p) for p in paths}))
            if len(classes) < 2:
                raise ValueError(
                    f"Class labels of the image folder {self.root} are its first-level "
                    f"sub-folders, but all its images are in one, {classes[0]!r}; put each class "
                    f"in its own sub-folder of {self.root} (at least two), or pass labels=False."
                )
            self._classes = classes
        return self._classes

    def _load_labels(self, split: str) -> Tensor:
        index = {c: i for i, c in enumerate(self._load_class_names())}
        return torch.tensor([index[self._class_of(p)] for p in self._files[split]])
