"""The feature extractors FID, KID and precision/recall are measured in: one registry, by name.

:data:`FEATURE_EXTRACTORS` maps a torch-fidelity extractor name to its loader; a loader makes
the extractor constructible offline (registers it with torch-fidelity if it is ours, resolves
and safety-checks its weights) and returns the weights file to build it from:

* ``"flowmap-digits"``: the shipped digits CNN (:mod:`flowmap.metrics.digits_extractor`), the
  default for 8×8 grey digits;
* ``"inception-v3-compat"``: Inception-v3, weights from disk (:mod:`flowmap.metrics.inception`),
  the default for every other image shape.

:class:`FeatureExtractor` builds a registered extractor at its FID layer and maps uint8 images
to float64 features; :class:`~flowmap.metrics.evaluation.Evaluator` measures with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from flowmap.io import file_sha256
from flowmap.metrics.digits_extractor import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    DIGITS_WEIGHTS_PATH,
    register_digits_feature_extractor,
)
from flowmap.metrics.inception import INCEPTION_FEATURE_EXTRACTOR_NAME, verified_inception_weights

__all__ = [
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "UInt8ImageDataset",
    "check_uint8_images",
    "default_feature_extractor",
]

#: A loader: weights file given (``None``: the default) → the checked file to build from.
Loader = Callable[[str | os.PathLike[str] | None], Path]


def _digits_weights(weights: str | os.PathLike[str] | None) -> Path:
    """Register ``"flowmap-digits"`` with torch-fidelity; ``weights`` or the shipped CNN."""
    register_digits_feature_extractor()
    return Path(weights) if weights else DIGITS_WEIGHTS_PATH


#: Extractor name → loader. The one place that knows which extractors exist.
FEATURE_EXTRACTORS: dict[str, Loader] = {
    DIGITS_FEATURE_EXTRACTOR_NAME: _digits_weights,
    INCEPTION_FEATURE_EXTRACTOR_NAME: verified_inception_weights,  # one sentence offline
}


def default_feature_extractor(data_shape: tuple[int, ...]) -> str:
    """``"flowmap-digits"`` for 8×8 grey digits, ``"inception-v3-compat"`` for other images."""
    return (
        DIGITS_FEATURE_EXTRACTOR_NAME
        if tuple(data_shape) == (1, 8, 8)
        else INCEPTION_FEATURE_EXTRACTOR_NAME
    )


def check_uint8_images(x: Tensor, name: str) -> None:
    """Raise unless ``x`` is a uint8 tensor ``(N, C, H, W)`` with ``C ∈ {1, 3}``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of uint8 images, got {type(x).__name__}.")
    if x.dtype != torch.uint8:
        raise TypeError(
            f"{name} must be uint8 pixels (N, C, H, W); convert model-space images with "
            f"flowmap.data.base.to_uint8 (got {x.dtype})."
        )
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape (N, 1 or 3, H, W), got {tuple(x.shape)}.")


class UInt8ImageDataset(Dataset):
    """Dataset over uint8 images ``(N, C, H, W)``, ``C ∈ {1, 3}``, yielding uint8 ``3×H×W``.

    This is torch-fidelity's input convention; single-channel images are repeated to 3.
    """

    def __init__(self, images: Tensor) -> None:
        check_uint8_images(images, "images")
        self.images = images.detach().cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        x = self.images[index]
        return (x.expand(3, -1, -1) if x.shape[0] == 1 else x).contiguous()


class FeatureExtractor:
    """The registered extractor ``name`` at its FID layer, built offline on CPU.

    ``weights`` picks another weights file than the loader's default. ``weights_digest`` (the
    file's SHA-256) identifies the features, e.g. in cache keys.
    """

    def __init__(
        self, name: str, weights: str | os.PathLike[str] | None = None, batch_size: int = 500
    ) -> None:
        if name not in FEATURE_EXTRACTORS:
            known = " or ".join(repr(k) for k in FEATURE_EXTRACTORS)
            raise ValueError(f"Unknown feature extractor {name!r}; use {known}.")
        weights_file = str(FEATURE_EXTRACTORS[name](weights))
        self.name, self.batch_size = name, batch_size
        self.layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        self.weights_digest = file_sha256(weights_file)
        self.extractor = create_feature_extractor(
            name,
            [self.layer],
            cuda=False,
            verbose=False,
            feature_extractor_weights_path=weights_file,
        )

    def __call__(self, images: Tensor) -> Tensor:
        """Float64 features ``(N, d)`` of uint8 images ``(N, C, H, W)``."""
        feats = get_featuresdict_from_dataset(
            UInt8ImageDataset(images), self.extractor, self.batch_size, False, True, False
        )[self.layer]
        return feats.to(torch.float64)
