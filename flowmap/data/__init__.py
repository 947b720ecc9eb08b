"""DataModules yielding plain float32 batches ``x1`` of shape ``(B, *data_shape)`` (t = 1 is data).

The finite datasets (digits, MNIST, CIFAR-10, image folders) take ``labels=True`` to yield
``[x1, y]`` batches instead, ``y`` int64 ``(B,)`` class labels in ``0..num_classes-1``, for
class-conditional models; their ``labelled_reference`` gives class-balanced labelled samples for
metrics either way.

``make_datamodule(name, **kwargs)`` picks the DataModule for a dataset name: any toy 2D name
(:data:`TOY2D_NAMES`), ``"digits"``, ``"mnist"``, ``"cifar10"`` or ``"folder"``.
"""

from __future__ import annotations

from typing import Any

from flowmap.data.base import FlowDataModule, from_uint8, to_uint8
from flowmap.data.couplings import CouplingDataModule
from flowmap.data.digits import DigitsDataModule, load_digits_split
from flowmap.data.image_folder import ImageFolderDataModule
from flowmap.data.torchvision_data import TORCHVISION_NAMES, TorchvisionDataModule
from flowmap.data.toy2d import TOY2D_NAMES, Toy2DDataModule, toy2d_sample

__all__ = [
    "DATASET_NAMES",
    "CouplingDataModule",
    "TOY2D_NAMES",
    "DigitsDataModule",
    "FlowDataModule",
    "ImageFolderDataModule",
    "Toy2DDataModule",
    "TorchvisionDataModule",
    "from_uint8",
    "load_digits_split",
    "make_datamodule",
    "to_uint8",
    "toy2d_sample",
]

#: Every name accepted by :func:`make_datamodule`.
DATASET_NAMES: tuple[str, ...] = (*TOY2D_NAMES, "digits", *TORCHVISION_NAMES, "folder")


def make_datamodule(name: str, **kwargs: Any) -> FlowDataModule:
    """Build the DataModule for dataset ``name``, passing ``kwargs`` to its constructor.

    Toy 2D names -> :class:`Toy2DDataModule` (``name`` forwarded), ``"digits"`` ->
    :class:`DigitsDataModule`, ``"mnist"``/``"cifar10"`` -> :class:`TorchvisionDataModule`
    (``name`` forwarded; needs ``root``), ``"folder"`` -> :class:`ImageFolderDataModule`
    (needs ``root``).

    Raises:
        ValueError: if ``name`` is not in :data:`DATASET_NAMES`.
    """
    if name in TOY2D_NAMES:
        return Toy2DDataModule(name=name, **kwargs)
    if name == "digits":
        return DigitsDataModule(**kwargs)
    if name in TORCHVISION_NAMES:
        return TorchvisionDataModule(name=name, **kwargs)
    if name == "folder":
        return ImageFolderDataModule(**kwargs)
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.")
