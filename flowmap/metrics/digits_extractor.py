"""A small CNN on sklearn's 8×8 digits whose penultimate layer serves as an FID feature space.

Inception-v3 is meaningless on 8×8 grey digits (and its weights are not available offline), so
FID on digits is measured in the features of :class:`DigitsClassifier`, a classifier trained on
the train split of :func:`flowmap.data.digits.load_digits_split` and shipped as
``flowmap/metrics/weights/digits_cnn.pt`` (a plain ``state_dict``) with a sidecar
``digits_cnn.json`` recording its seed, test accuracy, torch version and the command that
regenerates it (the training program lives outside the package, in ``scripts/``)::

    python scripts/train_digits_classifier.py --out flowmap/metrics/weights/digits_cnn.pt

:class:`DigitsFeatureExtractor` exposes the frozen network to torch-fidelity as
``"flowmap-digits"`` (registered by :func:`register_digits_feature_extractor`, uint8
``N×3×H×W`` input); :mod:`flowmap.metrics.extractors` lists it. :func:`load_digits_classifier`
gives the network itself (its logits classify, e.g. for class accuracy).

Floor (torch-fidelity, shipped weights): FID(train split, test split) = 17.33 with 1438 vs 359
images; two disjoint 719-image halves of the train split give 4.9 and 359 vs 359 subsets
16–26. FID of 128-d features is strongly biased upward at these sample sizes, so always
compare against the data floor at the *same* sample sizes.

The extractor maps uint8 pixels ``p`` back to model space with ``p / 127.5 − 1`` (the exact
inverse of :func:`flowmap.data.base.to_uint8`) and uses channel 0 of RGB input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from flowmap.data.base import from_uint8
from flowmap.io import UnsafeFileError, safe_load

__all__ = [
    "DIGITS_FEATURE_EXTRACTOR_NAME",
    "DIGITS_WEIGHTS_PATH",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "digits_classifier_accuracy",
    "load_digits_classifier",
    "register_digits_feature_extractor",
]

#: Name under which :class:`DigitsFeatureExtractor` is registered in torch-fidelity.
DIGITS_FEATURE_EXTRACTOR_NAME = "flowmap-digits"
#: The shipped weights (plain ``state_dict``); the sidecar JSON sits next to it.
DIGITS_WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "digits_cnn.pt"

_IMAGE_SIZE = 8


class DigitsClassifier(nn.Module):
    """CNN for ``(N, 1, 8, 8)`` digits in ``[-1, 1]``; ``features`` is its penultimate layer.

    Layout: ``conv3×3(1→32)`` → ReLU → ``conv3×3(32→64)`` → ReLU → maxpool 2 →
    ``conv3×3(64→128)`` → ReLU → maxpool 2 → flatten (512) → ``linear(512→feature_dim)``
    (= :meth:`features`, taken *before* the ReLU so that no unit is identically zero and the
    feature covariance has full rank) → ReLU → dropout → ``linear(feature_dim→10)`` (= logits).
    No batch norm, so eval-mode output does not depend on batch composition.
    """

    def __init__(self, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3) -> None:
        super().__init__()
        if feature_dim < 1 or num_classes < 2:
            raise ValueError(
                f"feature_dim must be >= 1 and num_classes >= 2, "
                f"got {feature_dim} and {num_classes}."
            )
        self.feature_dim = feature_dim
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 2 * 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, _IMAGE_SIZE, _IMAGE_SIZE):
            raise ValueError(
                f"DigitsClassifier expects images of shape (N, 1, 8, 8), got {tuple(x.shape)}."
            )
        if not x.is_floating_point():
            raise TypeError(f"DigitsClassifier expects float images in [-1, 1], got {x.dtype}.")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``(N, feature_dim)``: the pre-activation of ``fc``."""
        self._check_input(x)
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return self.fc(h.flatten(1))

    def logits(self, features: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` from :meth:`features`."""
        return self.head(self.dropout(F.relu(features)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` of images ``(N, 1, 8, 8)`` in ``[-1, 1]``."""
        return self.logits(self.features(x))


@torch.no_grad()
def digits_classifier_accuracy(
    model: DigitsClassifier, x: Tensor, y: Tensor, batch_size: int = 512
) -> float:
    """Fraction of images ``x`` (``(N, 1, 8, 8)``, ``[-1, 1]``) whose argmax logit equals ``y``."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"Need as many labels as images (at least one), got {len(y)} and {len(x)}."
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device=device, dtype=dtype))
        correct += int((logits.argmax(1).cpu() == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(x)


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """Load a :class:`DigitsClassifier` state_dict (default: the shipped weights), frozen, eval.

    The file is read with :func:`flowmap.io.safe_load` (``torch.load(..., weights_only=True)``),
    so a file carrying a pickle payload is refused rather than executed
    (:class:`flowmap.io.UnsafeFileError`, a ``ValueError``). A missing file raises
    ``FileNotFoundError`` saying how to regenerate it. ``feature_dim`` is read from the
    weights' shapes.
    """
    path = Path(path) if path is not None else DIGITS_WEIGHTS_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"Digits classifier weights {path} not found; regenerate them with "
            f"`python scripts/train_digits_classifier.py --out {path}`."
        )
    state = safe_load(path, "digits classifier weights")
    if not isinstance(state, dict) or not isinstance(state.get("fc.weight"), Tensor):
        raise UnsafeFileError(f"{path} does not hold a DigitsClassifier state_dict.")
    model = DigitsClassifier(feature_dim=int(state["fc.weight"].shape[0]))
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UnsafeFileError(
            f"{path} does not hold a DigitsClassifier state_dict (its keys or shapes differ)."
        ) from None
    model.eval()
    model.requires_grad_(False)
    return model


def _channel0(x: Tensor) -> Tensor:
    """Channel 0 ``(N, 1, 8, 8)`` of images ``(N, C, 8, 8)`` with ``C ∈ {1, 3}``."""
    if x.dim() != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (_IMAGE_SIZE,) * 2:
        raise ValueError(
            f"Digits features expect images of shape (N, 1 or 3, 8, 8), got {tuple(x.shape)}."
        )
    return x[:, :1]


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor ``"flowmap-digits"`` over :class:`DigitsClassifier`.

    Receives uint8 ``N×3×8×8`` (torch-fidelity's convention), uses channel 0, maps pixels to
    ``[-1, 1]`` and returns float32 features in the order of ``features_list``:
    ``"features"`` (penultimate layer, default for FID/KID/PRC) and ``"logits"`` (default for
    the Inception Score). ``feature_extractor_weights_path`` (a ``calculate_metrics`` keyword)
    selects other weights than the shipped ones; torch-fidelity's statistics cache is keyed by
    extractor *name*, so do not reuse a cache name across different weights.
    """

    def __init__(
        self,
        name: str,
        features_list: Sequence[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, list(features_list))
        self.classifier = load_digits_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits"}.get(metric, "features")

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, _IMAGE_SIZE, _IMAGE_SIZE, dtype=torch.uint8)

    def train(self, mode: bool = True) -> DigitsFeatureExtractor:
        """Stay in eval mode whatever ``mode`` is (the extractor is frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if not torch.is_tensor(x) or x.dtype != torch.uint8:
            raise TypeError("The flowmap-digits feature extractor expects a uint8 image tensor.")
        param = next(self.classifier.parameters())
        h = from_uint8(_channel0(x)).to(device=param.device, dtype=param.dtype)
        feats = self.classifier.features(h)
        out = {"features": feats, "logits": self.classifier.logits(feats)}
        return tuple(out[name].to(torch.float32) for name in self.features_list)


def register_digits_feature_extractor() -> str:
    """Register :class:`DigitsFeatureExtractor` in torch-fidelity (idempotent); return its name.

    A stale registration under the same name (e.g. after ``importlib.reload``) is replaced.
    """
    name = DIGITS_FEATURE_EXTRACTOR_NAME
    current = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if current is DigitsFeatureExtractor:
        return name
    if current is not None:
        FEATURE_EXTRACTORS_REGISTRY[name] = DigitsFeatureExtractor
        return name
    register_feature_extractor(name, DigitsFeatureExtractor)
    return name
