"""Sample-quality metrics: W2 / sliced W2 / MMD for toy 2D, FID (torch-fidelity, torchmetrics).

See :mod:`flowmap.metrics.two_d`, :mod:`flowmap.metrics.fid`, :mod:`flowmap.metrics.inception`
and :mod:`flowmap.metrics.digits_extractor`. Names are imported lazily on first access, so
``import flowmap.metrics`` stays cheap and ``python -m flowmap.metrics.digits_extractor`` does
not import the module twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowmap.metrics.digits_extractor import (
        DIGITS_FEATURE_EXTRACTOR_NAME,
        DIGITS_WEIGHTS_PATH,
        DigitsClassifier,
        DigitsFeatureExtractor,
        DigitsFeatures,
        digits_classifier_accuracy,
        load_digits_extractor,
        register_digits_feature_extractor,
        train_digits_classifier,
    )
    from flowmap.metrics.fid import (
        FID_AGREEMENT_ATOL,
        FID_AGREEMENT_RTOL,
        FeatureStatistics,
        UInt8ImageDataset,
        fid_from_features,
        fid_of_generator,
        fid_torch_fidelity,
        frechet_distance,
        make_torchmetrics_fid,
    )
    from flowmap.metrics.inception import (
        INCEPTION_ENV_VAR,
        INCEPTION_WEIGHTS_FILENAME,
        build_inception_extractor,
        check_weights_file,
        resolve_inception_weights,
        save_random_inception_weights,
        verified_inception_weights,
    )
    from flowmap.metrics.two_d import (
        mmd_rbf,
        sliced_wasserstein2,
        teacher_endpoint_error,
        wasserstein2,
    )

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "DIGITS_FEATURE_EXTRACTOR_NAME",
            "DIGITS_WEIGHTS_PATH",
            "DigitsClassifier",
            "DigitsFeatureExtractor",
            "DigitsFeatures",
            "digits_classifier_accuracy",
            "load_digits_extractor",
            "register_digits_feature_extractor",
            "train_digits_classifier",
        ],
        "digits_extractor",
    ),
    **dict.fromkeys(
        [
            "FID_AGREEMENT_ATOL",
            "FID_AGREEMENT_RTOL",
            "FeatureStatistics",
            "UInt8ImageDataset",
            "fid_from_features",
            "fid_of_generator",
            "fid_torch_fidelity",
            "frechet_distance",
            "make_torchmetrics_fid",
        ],
        "fid",
    ),
    **dict.fromkeys(
        [
            "INCEPTION_ENV_VAR",
            "INCEPTION_WEIGHTS_FILENAME",
            "build_inception_extractor",
            "check_weights_file",
            "resolve_inception_weights",
            "save_random_inception_weights",
            "verified_inception_weights",
        ],
        "inception",
    ),
    **dict.fromkeys(
        ["mmd_rbf", "sliced_wasserstein2", "teacher_endpoint_error", "wasserstein2"], "two_d"
    ),
}

__all__ = [
    "DIGITS_FEATURE_EXTRACTOR_NAME",
    "DIGITS_WEIGHTS_PATH",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "DigitsFeatures",
    "FID_AGREEMENT_ATOL",
    "FID_AGREEMENT_RTOL",
    "FeatureStatistics",
    "INCEPTION_ENV_VAR",
    "INCEPTION_WEIGHTS_FILENAME",
    "UInt8ImageDataset",
    "build_inception_extractor",
    "check_weights_file",
    "digits_classifier_accuracy",
    "fid_from_features",
    "fid_of_generator",
    "fid_torch_fidelity",
    "frechet_distance",
    "load_digits_extractor",
    "make_torchmetrics_fid",
    "mmd_rbf",
    "register_digits_feature_extractor",
    "resolve_inception_weights",
    "save_random_inception_weights",
    "sliced_wasserstein2",
    "teacher_endpoint_error",
    "train_digits_classifier",
    "verified_inception_weights",
    "wasserstein2",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowmap.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flowmap.metrics.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
