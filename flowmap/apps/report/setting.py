"""What every row of a report is measured against: the data, the reference set and its evaluator,
the shared noise (and labels, under guidance), the floor and the classifier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.cli import instantiate_module
from torch import Tensor

from flowmap.apps.report.config import ReportConfig, sizes
from flowmap.apps.report.diagnostics import balanced_labels, balanced_reference
from flowmap.apps.report.results import stored
from flowmap.apps.report.rows import sampling_device
from flowmap.codecs import codec_of, pixel_data
from flowmap.data.base import FlowDataModule, to_uint8
from flowmap.metrics.evaluation import Evaluator
from flowmap.training import CheckpointError

__all__ = ["Setting", "build_datamodule", "dataset_name", "guided_setting", "steps_setting"]


def build_datamodule(hparams: dict[str, Any]) -> Any:
    """Rebuild the DataModule a checkpoint was trained with (``flowmap.data`` classes only)."""
    hp = {k: v for k, v in (hparams or {}).items() if k != "_instantiator"}
    class_path = hp.get("_class_path", "")
    if not class_path.startswith(("flowmap.data.", "flowmap.codecs.")):
        raise CheckpointError(
            "The teacher checkpoint does not name a flowmap DataModule, so the report cannot "
            "find its reference data; train the teacher with `flowmap fit`."
        )
    return instantiate_module(FlowDataModule, hp)


def dataset_name(dm: Any) -> str:
    """The dataset's name as reports print it (``checkerboard``, ``digits``, …)."""
    return str(getattr(dm, "name", None) or type(dm).__name__)


@dataclass
class Setting:
    """The shared inputs of every row: ``x0`` (and labels ``y``) the same for every method, the
    evaluator with its reference, the floor set (held-out data measured like a row; steps
    reports) and the classifier whose accuracy a guided row reports (digits)."""

    evaluator: Evaluator
    x0: Tensor
    y: Tensor | None = None
    floor_x: Tensor | None = None
    floor_sets: str = ""
    classifier: torch.nn.Module | None = None
    reference: str = ""
    #: latents → pixels (a latent data module's decoder), ``None`` for pixel data
    decode: Callable[[Tensor], Tensor] | None = None
    #: decode(encode(floor set)): what the codec alone costs (latent data only)
    codec_floor_x: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.x0)

    @property
    def groups(self) -> int:
        return self.evaluator.groups


def _noise(n: int, shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def steps_setting(cfg: ReportConfig, data: Any) -> Setting:
    """Unguided: the reference drawn from ``cfg.reference_split``, the floor from the other. For
    latent data the metrics see the pixel data and the decoded rows, and the codec floor is the
    floor set through ``decode(encode(·))`` (posterior means)."""
    dm = pixel_data(data)
    image = bool(getattr(dm, "is_image", False))
    n, groups = sizes(image, cfg.n_samples, cfg.groups)
    kw: dict[str, Any] = {"groups": groups, "seed": cfg.seed, "feature": cfg.feature}
    if image:
        kw["weights"] = cfg.inception_weights
    evaluator = Evaluator.for_datamodule(dm, n, split=cfg.reference_split, **kw)
    evaluator.check_sample_count(n)
    held_out = "test" if cfg.reference_split == "train" else "train"
    if image:
        real = dm.reference_samples(dm.num_samples(held_out), held_out, cfg.seed)
        floor_sets = (
            f"the whole {held_out} split ({len(real)} images) against the {cfg.reference_split} "
            f"split ({len(evaluator.reference)}), the reference of every row; its smaller size "
            "biases it upward against rows of many more samples"
        )
    else:
        real = dm.reference_samples(n, held_out, cfg.seed + 1)
        floor_sets = (
            f"{n} fresh {held_out}-stream points against the same {n} reference points, in the "
            "same groups as every row"
        )
    x0 = _noise(n, tuple(data.data_shape), cfg.seed)
    setting = Setting(evaluator, x0, floor_x=stored(evaluator, real), floor_sets=floor_sets)
    return _with_codec(setting, data, real)


def _with_codec(setting: Setting, data: Any, real: Tensor | None = None) -> Setting:
    """A latent data module's decoder, and the codec floor of the pixels ``real``."""
    if codec_of(data) is None:
        return setting
    setting.decode = data.decode
    if real is not None:
        coded = data.decode(data.encode(real.to(sampling_device()), sample=False)).cpu()
        setting.codec_floor_x = stored(setting.evaluator, coded)
    return setting


def guided_setting(cfg: ReportConfig, data: Any, num_classes: int) -> Setting:
    """Under guidance: labels ``0..K-1`` in equal shares against a class-balanced reference (so a
    sampler that follows its labels is not charged for the data's class imbalance); latent rows
    are decoded."""
    dm = pixel_data(data)
    if not getattr(dm, "is_image", False) or not hasattr(dm, "labelled_reference"):
        raise ValueError(
            "The guidance report measures labelled image data (digits, CIFAR-10, image folders "
            "with labels: true); this teacher's data has no class-balanced reference."
        )
    n, groups = sizes(True, cfg.n_samples, cfg.groups)
    ref_x, _ = balanced_reference(dm, cfg.reference_split, cfg.seed)
    kw = {"groups": groups, "seed": cfg.seed, "feature": cfg.feature}
    evaluator = Evaluator(to_uint8(ref_x), **kw, weights=cfg.inception_weights)
    evaluator.check_sample_count(n)
    classifier = None
    if tuple(dm.data_shape) == (1, 8, 8) and num_classes == 10:
        from flowmap.metrics import load_digits_classifier

        classifier = load_digits_classifier()
    reference = (
        f"class-balanced {cfg.reference_split} split, {len(ref_x)} images "
        f"({len(ref_x) // num_classes} per class)"
    )
    x0 = _noise(n, tuple(data.data_shape), cfg.seed)
    y = balanced_labels(n, num_classes)
    setting = Setting(evaluator, x0, y, classifier=classifier, reference=reference)
    return _with_codec(setting, data)
