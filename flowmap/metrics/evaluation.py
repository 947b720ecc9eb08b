r"""One evaluation path: generated samples → metrics with 95% intervals, against one reference.

:class:`Evaluator` is what both ``flowmap report`` and the training callback
:class:`~flowmap.training.SampleQuality` measure with, so a value logged during training is the
report's value at fewer samples. The ``N`` samples are cut into ``G`` disjoint groups (the
replicates of :mod:`flowmap.metrics.intervals`), and each metric gets an
:class:`~flowmap.metrics.intervals.Estimate`:

**Vector data** (toy 2D, shape ``(d,)``): the reference holds ``N`` data samples too, cut into
the same ``G`` groups; group ``g`` of the samples is compared with group ``g`` of the data.

* ``w2``: exact :math:`W_2` between the two groups (POT), mean over groups ± t interval;
* ``precision``, ``recall``: improved precision and recall (Kynkäänniemi et al. 2019, ``k = 3``
  nearest neighbours, torch-fidelity) on the coordinates, per group;

**Images**: every group is compared with one fixed reference set (the full train split), whose
features are computed once and cached by content hash (:func:`reference_features`).

* ``fid``: Fréchet distance of all ``N`` samples' features to the reference features
  (torch-fidelity's statistics), with a delete-a-group jackknife interval;
* ``kid``: kernel inception distance (unbiased MMD², cubic polynomial kernel, torch-fidelity),
  per group; ``precision``, ``recall`` per group against the reference;

**Both**, when the teacher's endpoint for the same noise is given: ``endpoint``, the mean
distance :math:`\frac1n\sum_i \|x_i - x^{\rm teacher}_i\|_2` per group (images after the uint8
quantisation every other image metric sees, in model units ``[-1, 1]``).

Images enter the feature extractor as uint8 (``flowmap.data.base.to_uint8``), so uint8 samples
saved by a report reproduce its numbers exactly.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from flowmap.data.base import from_uint8, to_uint8
from flowmap.metrics.extractors import FeatureExtractor, default_feature_extractor
from flowmap.metrics.fid import fid_from_statistics, fid_statistics
from flowmap.metrics.intervals import Estimate, Replicates
from flowmap.metrics.two_d import wasserstein2

__all__ = [
    "CACHE_ENV_VAR",
    "W2_GROUP_SIZE",
    "Evaluator",
    "Measurement",
    "kernel_distance",
    "precision_recall",
    "reference_features",
]

#: Environment variable naming the directory of cached reference features
#: (default ``~/.cache/flowmap``).
CACHE_ENV_VAR = "FLOWMAP_CACHE"
#: Nearest neighbours that define the manifolds of improved precision and recall.
PRC_NEIGHBOURHOOD = 3
#: KID's usual subset size; smaller sets use all their samples.
KID_SUBSET_SIZE = 1000
#: Points per group for W2 on vector data: exact W2 between two sets of n points grows as n
#: shrinks, so ``flowmap report`` and the training callback both measure it on groups of this size.
W2_GROUP_SIZE = 1000


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "flowmap")


def reference_features(
    images: Tensor, features: FeatureExtractor, cache_dir: str | os.PathLike[str] | None = None
) -> Tensor:
    """Features of the uint8 reference ``images``, computed once and cached by content hash.

    The key hashes the image bytes, the extractor's name and layer and its weights file, so a
    changed split or extractor never reuses stale features. The cache is a plain ``.npz``
    (read with ``allow_pickle=False``) in ``$FLOWMAP_CACHE`` (default ``~/.cache/flowmap``); a
    cache that cannot be written is skipped.
    """
    h = hashlib.sha256()
    h.update(f"{features.name}/{features.layer}/{features.weights_digest}".encode())
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    path = _cache_dir(cache_dir) / f"reference-{features.name}-{h.hexdigest()[:20]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return torch.from_numpy(z["features"])
    feats = features(images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, features=feats.numpy())
        os.replace(tmp, path)
    except OSError:
        pass
    return feats


@dataclass
class Measurement:
    """What :meth:`Evaluator.measure` computed: per metric, its :class:`Replicates`."""

    replicates: dict[str, Replicates]
    n: int
    groups: int

    def estimates(self) -> dict[str, Estimate]:
        """Each metric's value with its 95% interval."""
        return {k: r.estimate() for k, r in self.replicates.items()}

    def ratio(self, other: Measurement, metric: str) -> Estimate:
        """``metric`` of ``self`` over ``metric`` of ``other`` (same noise, same groups)."""
        return self.replicates[metric].ratio(other.replicates[metric])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (``rep__<kind>__<metric>``) for an ``.npz``, read back by :meth:`from_arrays`."""
        return {f"rep__{r.kind}__{k}": r.to_array() for k, r in self.replicates.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], n: int, groups: int) -> Measurement:
        """Inverse of :meth:`to_arrays` (other keys of ``arrays`` are ignored)."""
        reps = {}
        for key, a in arrays.items():
            if key.startswith("rep__"):
                _, kind, metric = key.split("__", 2)
                reps[metric] = Replicates.from_array(kind, a)
        return cls(reps, n, groups)


class Evaluator:
    """Measures samples against one reference with 95% intervals (see the module docstring).

    Args:
        reference: real samples in model space (float) or, for images, uint8 pixels. Vector
            data: ``(N, d)``, compared group by group with ``N`` samples; images:
            ``(M, C, H, W)``, the one set every group is compared with.
        groups: ``G``, the number of disjoint replicate groups (at least 2).
        feature: images only, a name in
            :data:`~flowmap.metrics.extractors.FEATURE_EXTRACTORS` (default by shape:
            :func:`~flowmap.metrics.extractors.default_feature_extractor`).
        weights: images only, the extractor's weights file (default: the shipped digits CNN,
            or the Inception weights resolved by :mod:`flowmap.metrics.inception`).
        kid_subsets: KID subsets per group (torch-fidelity's subset estimator); with the default
            1, each group is one subset, so the mean over groups is torch-fidelity's KID with
            ``G`` subsets.
        max_reference: images only, at most this many reference images for KID and precision/
            recall (a seeded subset; FID always uses them all).
        seed: the seed of KID's subsets and of the reference subset.
        cache_dir: where reference features are cached (default ``$FLOWMAP_CACHE``).
    """

    def __init__(
        self,
        reference: Tensor,
        *,
        groups: int = 5,
        feature: str | None = None,
        weights: str | None = None,
        kid_subsets: int = 1,
        max_reference: int = 10_000,
        seed: int = 0,
        batch_size: int = 500,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(reference, Tensor) or reference.dim() < 2:
            raise ValueError("The reference must be a tensor of samples (N, *data_shape).")
        if int(groups) < 2:
            raise ValueError(f"groups must be at least 2 to give an interval, got {groups}.")
        self.groups, self.seed, self.kid_subsets = int(groups), int(seed), int(kid_subsets)
        self.data_shape = tuple(reference.shape[1:])
        self.image = reference.dim() == 4
        if self.image:
            self.feature = feature or default_feature_extractor(self.data_shape)
            self.reference = _as_uint8(reference, "reference")
            self._features = FeatureExtractor(self.feature, weights, batch_size)
            feats = reference_features(self.reference, self._features, cache_dir)
            self._ref_stats = fid_statistics(feats)
            if len(feats) > max_reference:
                g = torch.Generator().manual_seed(self.seed)
                feats = feats[torch.randperm(len(feats), generator=g)[:max_reference]]
            self._ref_features = feats
            self.headline = "fid"
        else:
            if feature is not None:
                raise ValueError("A feature extractor applies to images only; drop --feature.")
            self.feature = "exact W2 (POT) on coordinates"
            self.reference = _finite(reference.detach().cpu().to(torch.float64), "reference")
            self.headline = "w2"
        self._check_sizes(len(self.reference), "reference")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def for_datamodule(
        cls, dm: Any, n: int, *, groups: int = 5, split: str = "train", seed: int = 0, **kw: Any
    ) -> Evaluator:
        """The evaluator a report or callback uses for ``dm``: images against the whole ``split``,
        vector data against ``n`` fresh ``split`` samples (seeded by ``seed``)."""
        image = bool(getattr(dm, "is_image", False))
        if image:
            count = dm.num_samples(split)
            reference = to_uint8(dm.reference_samples(count, split, seed))
        else:
            reference = dm.reference_samples(n, split, seed)
        return cls(reference, groups=groups, seed=seed, **kw)

    def check_sample_count(self, n: int) -> None:
        """Raise ``ValueError`` now, before any sampling, if ``n`` samples cannot be measured."""
        self._check_sizes(n, "sample set")
        if not self.image and n != len(self.reference):
            raise ValueError(
                f"Vector samples are compared group by group with the reference, so their counts "
                f"must match: got {n} samples and {len(self.reference)} reference points."
            )

    def _check_sizes(self, n: int, what: str) -> None:
        size = n // self.groups
        need = PRC_NEIGHBOURHOOD + 2
        if size < need:
            raise ValueError(
                f"The {what} has {n} samples, too few for {self.groups} groups of at least {need} "
                f"(precision/recall use {PRC_NEIGHBOURHOOD} nearest neighbours); use at least "
                f"{need * self.groups} samples or fewer groups."
            )

    # ------------------------------------------------------------------ measuring
    def prepare(self, samples: Tensor) -> Tensor:
        """Samples as the metrics see them: uint8 images, or float64 vectors (checked)."""
        if not isinstance(samples, Tensor):
            raise TypeError(f"Samples must be a torch.Tensor, got {type(samples).__name__}.")
        if tuple(samples.shape[1:]) != self.data_shape:
            raise ValueError(
                f"Samples of shape {list(samples.shape[1:])} cannot be compared with reference "
                f"data of shape {list(self.data_shape)}; they come from another dataset."
            )
        if self.image:
            return _as_uint8(samples, "samples")
        return _finite(samples.detach().cpu().to(torch.float64), "samples")

    def measure(self, samples: Tensor, teacher_endpoint: Tensor | None = None) -> Measurement:
        """Every metric of ``samples`` with its replicates; ``teacher_endpoint`` (the teacher's
        ODE endpoint for the same noise, same shape) adds ``endpoint``."""
        x = self.prepare(samples)
        n = len(x)
        self.check_sample_count(n)
        index = np.array_split(np.arange(n), self.groups)
        reps = self._image_metrics(x, index) if self.image else self._vector_metrics(x, index)
        if teacher_endpoint is not None:
            reps["endpoint"] = self.endpoint(x, teacher_endpoint)
        return Measurement(reps, n, self.groups)

    def endpoint(self, samples: Tensor, teacher_endpoint: Tensor) -> Replicates:
        """Per group, the mean distance of each sample from the teacher's endpoint for the same
        noise (images after the uint8 quantisation, in model units)."""
        x, ref = self.prepare(samples), self.prepare(teacher_endpoint)
        if len(ref) != len(x):
            raise ValueError(
                f"The teacher endpoint has {len(ref)} samples for {len(x)} samples; both must "
                "come from the same noise."
            )
        dist = _endpoint_distances(x, ref, self.image)
        index = np.array_split(np.arange(len(x)), self.groups)
        return Replicates("replicates", np.array([dist[i].mean() for i in index]))

    def _vector_metrics(self, x: Tensor, index: list[np.ndarray]) -> dict[str, Replicates]:
        w2, precision, recall = [], [], []
        for i in index:
            xg, rg = x[i], self.reference[i]
            w2.append(wasserstein2(xg, rg))
            prc = precision_recall(xg, rg)
            precision.append(prc["precision"])
            recall.append(prc["recall"])
        return {
            "w2": Replicates("replicates", np.array(w2)),
            "precision": Replicates("replicates", np.array(precision)),
            "recall": Replicates("replicates", np.array(recall)),
        }

    def _image_metrics(self, x: Tensor, index: list[np.ndarray]) -> dict[str, Replicates]:
        feats = self._features(x)
        full = self._fid(feats)
        keep = [np.setdiff1d(np.arange(len(feats)), i) for i in index]
        loo = np.array([self._fid(feats[k]) for k in keep])
        kid, precision, recall = [], [], []
        for i in index:
            fg = feats[i]
            kid.append(kernel_distance(fg, self._ref_features, self.kid_subsets, self.seed))
            prc = precision_recall(fg, self._ref_features)
            precision.append(prc["precision"])
            recall.append(prc["recall"])
        return {
            "fid": Replicates("jackknife", loo, full),
            "kid": Replicates("replicates", np.array(kid)),
            "precision": Replicates("replicates", np.array(precision)),
            "recall": Replicates("replicates", np.array(recall)),
        }

    def _fid(self, feats: Tensor) -> float:
        return fid_from_statistics(fid_statistics(feats), self._ref_stats)


def kernel_distance(generated: Tensor, real: Tensor, subsets: int = 10, seed: int = 0) -> float:
    r"""KID: the unbiased MMD² with the cubic kernel :math:`k(a, b) = (a^\top b / d + 1)^3`,
    averaged over ``subsets`` random subsets of ``m = min(1000, n_generated, n_real)`` of each
    set (torch-fidelity's estimator; with ``m`` equal to both sizes it is the full U-statistic)."""
    m = min(KID_SUBSET_SIZE, len(generated), len(real))
    if m < 2:
        raise ValueError(
            f"KID needs at least 2 samples in each set, got {len(generated)}, {len(real)}."
        )
    out = kid_features_to_metric(
        generated.to(torch.float64),
        real.to(torch.float64),
        kid_subsets=subsets,
        kid_subset_size=m,
        rng_seed=seed,
        verbose=False,
    )
    return float(out["kernel_inception_distance_mean"])


def precision_recall(generated: Tensor, real: Tensor) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019; torch-fidelity), ``k = 3``:
    precision is the share of generated points inside some real point's ball (radius: its
    distance to its ``k``-th nearest real neighbour), recall the share of real points inside
    some generated point's ball."""
    need = PRC_NEIGHBOURHOOD + 1
    if len(generated) < need or len(real) < need:
        raise ValueError(
            f"Precision and recall use {PRC_NEIGHBOURHOOD} nearest neighbours, so each set needs "
            f"at least {need} samples; got {len(generated)} and {len(real)}."
        )
    out = prc_features_to_metric(
        generated.to(torch.float32),
        real.to(torch.float32),
        prc_neighborhood=PRC_NEIGHBOURHOOD,
        prc_batch_size=10_000,
        save_cpu_ram=False,
        verbose=False,
    )
    return {"precision": float(out["precision"]), "recall": float(out["recall"])}


def _endpoint_distances(x: Tensor, ref: Tensor, image: bool) -> np.ndarray:
    if image:
        x, ref = from_uint8(x).to(torch.float64), from_uint8(ref).to(torch.float64)
    return (x - ref).flatten(1).norm(dim=1).numpy()


def _finite(x: Tensor, name: str) -> Tensor:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"{bad} of the {len(x)} {name} contain NaN or infinite values.")
    return x


def _as_uint8(x: Tensor, name: str) -> Tensor:
    """uint8 pixels of images given as uint8 or as floats in model space ``[-1, 1]``."""
    if x.dim() != 4:
        raise ValueError(f"The {name} must be images (N, C, H, W), got shape {list(x.shape)}.")
    if x.dtype == torch.uint8:
        return x.detach().cpu()
    if not x.is_floating_point():
        raise TypeError(f"The {name} must be uint8 pixels or floats in [-1, 1], got {x.dtype}.")
    x = _finite(x.detach().cpu().float(), name)
    return to_uint8(x.clamp(-1, 1))
