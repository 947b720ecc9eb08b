"""Sample-quality metrics: W2 / sliced W2 / MMD for toy 2D, FID (torch-fidelity, torchmetrics).

* :mod:`flowmap.metrics.evaluation`: :class:`Evaluator`, the one evaluation path of reports and
  the training callback (every metric with a 95% interval, see :mod:`flowmap.metrics.intervals`);
* :mod:`flowmap.metrics.two_d`: distances between low-dimensional sample sets;
* :mod:`flowmap.metrics.fid`: Fréchet distance on features, and FID through torch-fidelity or
  torchmetrics;
* :mod:`flowmap.metrics.inception`: offline Inception-v3 weights (resolution, safety check);
* :mod:`flowmap.metrics.digits_extractor`: the digits CNN whose features give FID on 8×8 digits
  (its training program is ``scripts/train_digits_classifier.py``).
"""

from __future__ import annotations

from flowmap.metrics.digits_extractor import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    DigitsClassifier,
    DigitsFeatures,
    load_digits_extractor,
    register_digits_feature_extractor,
)
from flowmap.metrics.evaluation import (
    Evaluator,
    Measurement,
    kernel_distance,
    precision_recall,
)
from flowmap.metrics.fid import (
    FeatureStatistics,
    fid_from_features,
    fid_of_generator,
    fid_torch_fidelity,
    frechet_distance,
    make_torchmetrics_fid,
)
from flowmap.metrics.inception import (
    INCEPTION_ENV_VAR,
    INCEPTION_FEATURE_EXTRACTOR_NAME,
    build_inception_extractor,
    resolve_inception_weights,
    save_random_inception_weights,
    verified_inception_weights,
)
from flowmap.metrics.intervals import Estimate, Replicates, jackknife_interval, t_interval
from flowmap.metrics.two_d import mmd_rbf, sliced_wasserstein2, teacher_endpoint_error, wasserstein2

__all__ = [
    "DIGITS_FEATURE_EXTRACTOR_NAME",
    "INCEPTION_ENV_VAR",
    "INCEPTION_FEATURE_EXTRACTOR_NAME",
    "DigitsClassifier",
    "DigitsFeatures",
    "Estimate",
    "Evaluator",
    "Measurement",
    "Replicates",
    "FeatureStatistics",
    "build_inception_extractor",
    "fid_from_features",
    "fid_of_generator",
    "fid_torch_fidelity",
    "frechet_distance",
    "jackknife_interval",
    "kernel_distance",
    "precision_recall",
    "t_interval",
    "load_digits_extractor",
    "make_torchmetrics_fid",
    "mmd_rbf",
    "register_digits_feature_extractor",
    "resolve_inception_weights",
    "save_random_inception_weights",
    "sliced_wasserstein2",
    "teacher_endpoint_error",
    "verified_inception_weights",
    "wasserstein2",
]
