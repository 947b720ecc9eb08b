r"""Independent FID routes the tests hold the package's FID against (oracles, not package API).

All compute the Fréchet distance between feature Gaussians,

.. math:: d^2 = \|μ_1 - μ_2\|_2^2 + \operatorname{tr}\big(Σ_1 + Σ_2 - 2 (Σ_1 Σ_2)^{1/2}\big),

:math:`μ, Σ` the mean and unbiased (``N − 1``) covariance of an extractor's features:

* :func:`frechet_distance` / :class:`FeatureStatistics` / :func:`fid_from_features`: float64,
  symmetric square root, on features you already have;
* :func:`fid_torch_fidelity` / :func:`fid_of_generator`: ``torch_fidelity.calculate_metrics``
  end to end on uint8 images (or a generator), CPU, optional reference cache and KID;
* :func:`make_torchmetrics_fid` (with :class:`DigitsFeatures` on digits): torchmetrics'
  ``FrechetInceptionDistance`` in float64, real statistics kept across ``reset()``.

On the shipped digits features (train vs test split, FID ≈ 17.33) torch-fidelity and
torchmetrics each lie within 4e-7 relative of :func:`frechet_distance`; a set against itself
gives |FID| ≲ 3e-6 on every route. :func:`save_random_inception_weights` writes wiring-only
Inception weights.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import Tensor, nn
from torch_fidelity import FeatureExtractorInceptionV3
from torchmetrics.image.fid import FrechetInceptionDistance

from flowmap.data.base import from_uint8
from flowmap.metrics._arrays import ArrayLike, as_float64_array
from flowmap.metrics.digits_extractor import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    DigitsClassifier,
    _channel0,
    load_digits_classifier,
    register_digits_feature_extractor,
)
from flowmap.metrics.extractors import UInt8ImageDataset, check_uint8_images
from flowmap.metrics.inception import (
    INCEPTION_FEATURE_EXTRACTOR_NAME,
    check_weights_file,
    verified_inception_weights,
)

# --------------------------------------------------------------------------------------------
# float64 formula


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; negative rounding eigenvalues → 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    r""":math:`d^2` in float64, with :math:`\operatorname{tr}(Σ_1Σ_2)^{1/2} = \operatorname{tr}(R Σ_2 R)^{1/2}`,
    :math:`R = Σ_1^{1/2}`.

    :math:`R Σ_2 R` is symmetric PSD (``eigvalsh``, rounding negatives clipped), so
    singular covariances are fine; the result is clipped at 0.
    """
    m1, m2 = as_float64_array(mu1, "mu1", finite=True), as_float64_array(mu2, "mu2", finite=True)
    s1 = as_float64_array(sigma1, "sigma1", finite=True)
    s2 = as_float64_array(sigma2, "sigma2", finite=True)
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(
            f"mu1 and mu2 must be vectors of equal length, got {m1.shape} and {m2.shape}."
        )
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"sigma1 and sigma2 must be {d}×{d} matrices, got {s1.shape} and {s2.shape}."
        )
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    r1 = _sqrt_psd(s1)
    inner = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean ``mu`` ``(d,)`` and unbiased covariance ``sigma`` ``(d, d)`` of ``n`` features."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def __post_init__(self) -> None:
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if d < 1 or self.sigma.shape != (d, d):
            raise ValueError(
                f"FeatureStatistics needs mu (d,) and sigma (d, d), got {self.mu.shape} and "
                f"{self.sigma.shape}."
            )

    @classmethod
    def from_features(cls, features: ArrayLike) -> FeatureStatistics:
        r"""Float64 :math:`μ = \frac1N\sum_i f_i`, :math:`Σ = \frac1{N-1}\sum_i (f_i-μ)(f_i-μ)^T`."""
        f = as_float64_array(features, "features", finite=True)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"features must have shape (N, d) with N >= 2, got {f.shape}.")
        return cls(
            mu=f.mean(axis=0),
            sigma=np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1]),
            n=int(f.shape[0]),
        )

    def frechet_distance(self, other: FeatureStatistics) -> float:
        """:func:`frechet_distance` between ``self`` and ``other``."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``mu``, ``sigma``, ``n`` to an ``.npz`` file (no pickle)."""
        np.savez(path, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStatistics:
        """Read statistics written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(path, allow_pickle=False) as z:
            return cls(
                mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64), n=int(z["n"])
            )


def fid_from_features(features1: ArrayLike, features2: ArrayLike) -> float:
    """FID between two feature sets ``(N1, d)`` and ``(N2, d)`` (:class:`FeatureStatistics`)."""
    return FeatureStatistics.from_features(features1).frechet_distance(
        FeatureStatistics.from_features(features2)
    )


# --------------------------------------------------------------------------------------------
# torch-fidelity end to end

_RESERVED = frozenset(
    {
        "input1",
        "input2",
        "cuda",
        "fid",
        "kid",
        "feature_extractor",
        "cache",
        "cache_root",
        "input2_cache_name",
        "input1_cache_name",
        "kid_subset_size",
        "batch_size",
        "verbose",
        "input1_model_num_samples",
        "input1_model_z_size",
        "input1_model_z_type",
    }
)


def _kid_subset_size(kid_subset_size: int | None, n1: int, n2: int) -> int:
    """``min(1000, n1, n2)`` by default (warning below 1000); an explicit value must fit."""
    n_min = min(n1, n2)
    if kid_subset_size is None:
        kid_subset_size = min(1000, n_min)
        if kid_subset_size < 1000:
            warnings.warn(
                f"KID uses subsets of {kid_subset_size} samples (fewer than the usual 1000, "
                "limited by the sample counts); its value is not comparable to KID@1000.",
                stacklevel=4,
            )
    if not 2 <= kid_subset_size <= n_min:
        raise ValueError(
            f"kid_subset_size must lie in [2, {n_min}] (the smaller sample count), "
            f"got {kid_subset_size}."
        )
    return kid_subset_size


def _fidelity_kwargs(
    feature_extractor: str,
    n1: int,
    n2: int,
    reference_cache_name: str | None,
    cache_root: str | os.PathLike[str] | None,
    kid: bool,
    kid_subset_size: int | None,
    batch_size: int,
    fe_kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    """``calculate_metrics`` keywords, the extractor made constructible offline and safe first."""
    if not isinstance(feature_extractor, str):
        raise TypeError(
            f"feature_extractor must be a torch-fidelity extractor name such as "
            f"'{DIGITS_FEATURE_EXTRACTOR_NAME}' or '{INCEPTION_FEATURE_EXTRACTOR_NAME}', "
            f"got {feature_extractor!r}."
        )
    clash = _RESERVED.intersection(fe_kwargs)
    if clash:
        raise ValueError(f"Pass {sorted(clash)} as named arguments, not through **fe_kwargs.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    kwargs: dict[str, Any] = {"save_cpu_ram": True, **fe_kwargs}
    if feature_extractor == DIGITS_FEATURE_EXTRACTOR_NAME:
        register_digits_feature_extractor()
    weights = kwargs.get("feature_extractor_weights_path")
    if feature_extractor == INCEPTION_FEATURE_EXTRACTOR_NAME:
        kwargs["feature_extractor_weights_path"] = str(verified_inception_weights(weights))
    elif weights is not None:
        kwargs["feature_extractor_weights_path"] = str(
            check_weights_file(weights, f"{feature_extractor} feature-extractor weights")
        )
    kwargs.update(
        cuda=False,
        fid=True,
        kid=kid,
        feature_extractor=feature_extractor,
        batch_size=batch_size,
        input2_cache_name=reference_cache_name,
        cache=reference_cache_name is not None,
        cache_root=None if cache_root is None else str(cache_root),
        verbose=False,
    )
    if kid:
        kwargs["kid_subset_size"] = _kid_subset_size(kid_subset_size, n1, n2)
    return kwargs


def _calculate(kwargs: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in torch_fidelity.calculate_metrics(**kwargs).items()}
    if kwargs.get("kid"):
        out["kid_subset_size"] = float(kwargs["kid_subset_size"])
    return out


def fid_torch_fidelity(
    samples: Tensor,
    reference: Tensor,
    feature_extractor: str,
    *,
    reference_cache_name: str | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    kid: bool = False,
    kid_subset_size: int | None = None,
    batch_size: int = 64,
    **fe_kwargs: Any,
) -> dict[str, float]:
    """FID (and with ``kid`` KID) of uint8 ``samples`` against uint8 ``reference``, torch-fidelity.

    Images ``(N, 1|3, H, W)``; ``feature_extractor`` ``"flowmap-digits"`` or
    ``"inception-v3-compat"`` (weights checked first). ``reference_cache_name`` caches the
    reference statistics under that name in ``cache_root`` and later ignores ``reference``.
    KID subsets default to ``min(1000, N_samples, N_reference)``. ``fe_kwargs`` go to
    ``calculate_metrics``. Returns its dict as floats (plus ``"kid_subset_size"``).
    """
    check_uint8_images(samples, "samples")
    check_uint8_images(reference, "reference")
    if len(samples) < 2 or len(reference) < 2:
        raise ValueError(
            f"FID needs at least 2 images per set, got {len(samples)} and {len(reference)}."
        )
    kwargs = _fidelity_kwargs(
        feature_extractor,
        len(samples),
        len(reference),
        reference_cache_name,
        cache_root,
        kid,
        kid_subset_size,
        batch_size,
        fe_kwargs,
    )
    kwargs.update(input1=UInt8ImageDataset(samples), input2=UInt8ImageDataset(reference))
    return _calculate(kwargs)


class _UInt8GeneratorAdapter(nn.Module):
    """Feeds torch-fidelity's CPU noise to ``module``'s device; returns uint8 ``N×3×H×W`` on CPU."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, z: Tensor) -> Tensor:
        param = next(iter(self.module.parameters()), None)
        if param is not None:
            z = z.to(param.device)
        x = self.module(z)
        check_uint8_images(x, "generator output")
        x = x.cpu()
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def fid_of_generator(
    module: nn.Module,
    z_size: int,
    num_samples: int,
    reference: Tensor,
    feature_extractor: str,
    *,
    z_type: str = "normal",
    batch_size: int = 64,
    **fe_kwargs: Any,
) -> dict[str, float]:
    """FID of ``num_samples`` uint8 images of a generator ``module`` (noise ``(B, z_size)``).

    torch-fidelity draws the noise (``z_type``, seeded); ``module`` runs in eval mode (its
    mode is restored) on any device. Other arguments as in :func:`fid_torch_fidelity`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    if z_size < 1 or num_samples < 2:
        raise ValueError(f"Need z_size >= 1 and num_samples >= 2, got {z_size} and {num_samples}.")
    check_uint8_images(reference, "reference")
    if len(reference) < 2:
        raise ValueError(f"FID needs at least 2 reference images, got {len(reference)}.")
    kwargs = _fidelity_kwargs(
        feature_extractor,
        num_samples,
        len(reference),
        None,
        None,
        False,
        None,
        batch_size,
        fe_kwargs,
    )
    wrapper = torch_fidelity.GenerativeModelModuleWrapper(
        _UInt8GeneratorAdapter(module), z_size, z_type, 0, make_copy=False, make_eval=False
    )
    kwargs.update(
        input1=wrapper,
        input1_model_num_samples=num_samples,
        input1_model_z_size=z_size,
        input1_model_z_type=z_type,
        input2=UInt8ImageDataset(reference),
    )
    was_training = module.training
    module.eval()
    try:
        return _calculate(kwargs)
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------------------------
# torchmetrics


class DigitsFeatures(nn.Module):
    """Digits-CNN features for torchmetrics' ``FrechetInceptionDistance(feature=...)``.

    Input ``(N, 1|3, 8, 8)`` (channel 0 used): uint8 pixels map through ``p / 127.5 − 1``,
    floats in ``float_range`` (default ``(0, 1)``, torchmetrics' ``normalize=True``) affinely to
    ``[-1, 1]``. Output ``(N, num_features)`` in the parameters' dtype; always in eval mode.
    """

    def __init__(
        self,
        model: DigitsClassifier | None = None,
        weights_path: str | Path | None = None,
        float_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if model is not None and weights_path is not None:
            raise ValueError("Pass either a model or a weights_path to DigitsFeatures, not both.")
        lo, hi = float(float_range[0]), float(float_range[1])
        if not hi > lo:
            raise ValueError(f"float_range must be (low, high) with high > low, got {float_range}.")
        self.float_range = (lo, hi)
        self.model = model if model is not None else load_digits_classifier(weights_path)
        self.model.eval()
        self.model.requires_grad_(False)
        self.num_features: int = self.model.feature_dim

    def train(self, mode: bool = True) -> DigitsFeatures:
        """Stay in eval mode whatever ``mode`` is (the extractor is frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Features ``(N, num_features)`` of uint8 or float images ``(N, 1|3, 8, 8)``."""
        if x.dtype == torch.uint8:
            x = from_uint8(_channel0(x))
        elif x.is_floating_point():
            lo, hi = self.float_range
            x = (_channel0(x) - lo) * (2.0 / (hi - lo)) - 1.0
        else:
            raise TypeError(f"DigitsFeatures expects uint8 or float images, got {x.dtype}.")
        param = next(self.model.parameters())
        return self.model.features(x.to(device=param.device, dtype=param.dtype))


def make_torchmetrics_fid(
    feature: nn.Module | int = 2048,
    weights_path: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> FrechetInceptionDistance:
    """A float64 torchmetrics ``FrechetInceptionDistance`` that keeps real statistics.

    ``feature`` an int (64, 192, 768, 2048): Inception-v3 at that layer, weights checked first,
    TF1-compatible resize (``antialias=False``); an ``nn.Module`` (e.g. :class:`DigitsFeatures`):
    used as is. ``reset_real_features=False``; ``set_dtype(torch.float64)`` applied.
    """
    kw = {"reset_real_features": False, **kw}
    if isinstance(feature, bool) or not isinstance(feature, nn.Module | int):
        raise TypeError(f"feature must be an int or an nn.Module, got {type(feature).__name__}.")
    if isinstance(feature, int):
        if feature not in (64, 192, 768, 2048):
            raise ValueError(f"Inception feature must be one of 64, 192, 768, 2048, got {feature}.")
        path = verified_inception_weights(weights_path)
        kw.setdefault("antialias", False)
        metric = FrechetInceptionDistance(
            feature=feature, feature_extractor_weights_path=str(path), **kw
        )
    else:
        if weights_path is not None:
            raise ValueError("weights_path only applies to the Inception extractor (int feature).")
        metric = FrechetInceptionDistance(feature=feature, **kw)
    return metric.set_dtype(torch.float64)


# --------------------------------------------------------------------------------------------
# Inception wiring


def save_random_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a seeded random ``FeatureExtractorInceptionV3`` state_dict to ``path`` (wiring only).

    The file has the real weights' keys and shapes (~95 MB); the module is built offline by
    skipping ``load_state_dict`` of an empty placeholder file.
    """

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[override]
            return None

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    placeholder = out.with_name(out.name + ".empty")
    torch.save({}, placeholder)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = _Unloaded(
                INCEPTION_FEATURE_EXTRACTOR_NAME,
                ["2048"],
                feature_extractor_weights_path=str(placeholder),
            )
    finally:
        placeholder.unlink(missing_ok=True)
    torch.save(module.state_dict(), out)
    return out
