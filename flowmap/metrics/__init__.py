"""Sample-quality metrics: W2 / sliced W2 / MMD for toy 2D, FID / KID / precision-recall on images.

* :mod:`flowmap.metrics.evaluation`: :class:`Evaluator`, the one evaluation path of reports and
  the training callback (every metric with a 95% interval, see :mod:`flowmap.metrics.intervals`);
* :mod:`flowmap.metrics.two_d`: distances between low-dimensional sample sets;
* :mod:`flowmap.metrics.extractors`: :data:`FEATURE_EXTRACTORS`, the registry of image feature
  extractors by name (``"flowmap-digits"``, ``"inception-v3-compat"``);
* :mod:`flowmap.metrics.fid`: the Fréchet distance of two feature sets' Gaussians;
* :mod:`flowmap.metrics.inception`: offline Inception-v3 weights (resolution, safety check);
* :mod:`flowmap.metrics.digits_extractor`: the digits CNN whose features give FID on 8×8 digits
  (its training program is ``scripts/train_digits_classifier.py``).

The cross-checks of FID (torchmetrics, torch-fidelity's own pipeline, a float64 formula) live in
the tests, as oracles (``tests/fid_oracles.py``).
"""

from __future__ import annotations

from flowmap.metrics.digits_extractor import load_digits_classifier
from flowmap.metrics.evaluation import (
    Evaluator,
    Measurement,
    kernel_distance,
    precision_recall,
)
from flowmap.metrics.extractors import (
    FEATURE_EXTRACTORS,
    FeatureExtractor,
    default_feature_extractor,
)
from flowmap.metrics.inception import INCEPTION_ENV_VAR
from flowmap.metrics.intervals import Estimate, Replicates, jackknife_interval, t_interval
from flowmap.metrics.two_d import mmd_rbf, sliced_wasserstein2, teacher_endpoint_error, wasserstein2

__all__ = [
    "FEATURE_EXTRACTORS",
    "INCEPTION_ENV_VAR",
    "Estimate",
    "Evaluator",
    "FeatureExtractor",
    "Measurement",
    "Replicates",
    "default_feature_extractor",
    "jackknife_interval",
    "kernel_distance",
    "load_digits_classifier",
    "mmd_rbf",
    "precision_recall",
    "sliced_wasserstein2",
    "t_interval",
    "teacher_endpoint_error",
    "wasserstein2",
]
