r"""Fréchet distance (FID) between feature Gaussians, via torch-fidelity and torchmetrics.

The Fréchet (2-Wasserstein) distance between :math:`N(μ_1, Σ_1)` and :math:`N(μ_2, Σ_2)` is

.. math:: d^2 = \|μ_1 - μ_2\|_2^2 + \operatorname{tr}\big(Σ_1 + Σ_2 - 2 (Σ_1 Σ_2)^{1/2}\big),

with :math:`μ, Σ` the mean and unbiased (``N − 1``) covariance of a feature extractor's
outputs on two image sets. Three routes compute it here, on the same definition:

* :func:`frechet_distance` / :class:`FeatureStatistics` on features you already have;
* :func:`fid_torch_fidelity` / :func:`fid_of_generator`: ``torch_fidelity.calculate_metrics``
  on uint8 image tensors (or a generator), CPU only, optional reference-statistics cache and KID;
* :func:`make_torchmetrics_fid`: a ``torchmetrics`` ``FrechetInceptionDistance`` (float64,
  real statistics kept across ``reset()``) for use inside Lightning loops.

Feature extractors: ``"flowmap-digits"`` / :class:`~flowmap.metrics.digits_extractor.DigitsFeatures`
for 8×8 digits, and Inception-v3 (``"inception-v3-compat"`` / an int ``feature``) for natural
images, whose weights must be on disk (see :mod:`flowmap.metrics.inception`).

Agreement: on the same features the routes differ only by floating-point arithmetic.
torch-fidelity keeps float32 features and float32 means and takes ``eigvals(Σ_1 Σ_2)``;
torchmetrics accumulates float64 sums of ``f`` and ``f fᵀ`` (and, after
``set_dtype(float64)``, runs the extractor in float64); :func:`frechet_distance` works in
float64 with a symmetric square root. Measured on the shipped digits features (train split
vs test split, FID ≈ 17.33): torch-fidelity and torchmetrics each within 4e-7 relative of
:func:`frechet_distance`; a set against itself gives |FID| ≲ 3e-6 on every route (exactly 0
here; torchmetrics suffers cancellation in ``Σ f fᵀ − N μ μᵀ``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics.image.fid import FrechetInceptionDistance

from flowmap.metrics._arrays import ArrayLike, as_float64_array
from flowmap.metrics.digits_extractor import (
    DIGITS_FEATURE_EXTRACTOR_NAME,
    register_digits_feature_extractor,
)
from flowmap.metrics.inception import (
    INCEPTION_FEATURE_EXTRACTOR_NAME,
    check_weights_file,
    verified_inception_weights,
)

__all__ = [
    "FeatureStatistics",
    "UInt8ImageDataset",
    "fid_from_features",
    "fid_of_generator",
    "fid_torch_fidelity",
    "frechet_distance",
    "make_torchmetrics_fid",
]


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; negative rounding eigenvalues → 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    r"""Fréchet distance :math:`\|μ_1-μ_2\|^2 + \operatorname{tr}(Σ_1+Σ_2-2(Σ_1Σ_2)^{1/2})`.

    Computed in float64 with the identity
    :math:`\operatorname{tr}(Σ_1Σ_2)^{1/2} = \operatorname{tr}(Σ_1^{1/2} Σ_2 Σ_1^{1/2})^{1/2}`:
    the right-hand matrix is symmetric PSD, so its eigenvalues are real (``eigvalsh``) and tiny
    negative ones from rounding are clipped to zero; no complex parts arise, and singular
    covariances (fewer samples than dimensions, dead features) are fine. The result is
    clipped at 0 (it is a squared distance; rounding can otherwise give ``-1e-12``).
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
        r"""Float64 :math:`μ = \frac1N\sum_i f_i`, :math:`Σ = \frac1{N-1}\sum_i (f_i-μ)(f_i-μ)^T`.

        ``features`` is ``(N, d)`` with ``N >= 2``, a tensor or an array.
        """
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


def _check_uint8_images(x: Tensor, name: str) -> None:
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
        _check_uint8_images(images, "images")
        self.images = images.detach().cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        x = self.images[index]
        return (x.expand(3, -1, -1) if x.shape[0] == 1 else x).contiguous()


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
    # Make the extractor constructible offline, and safe, before torch-fidelity touches it.
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
        n_min = min(n1, n2)
        if kid_subset_size is None:
            kid_subset_size = min(1000, n_min)
            if kid_subset_size < 1000:
                warnings.warn(
                    f"KID uses subsets of {kid_subset_size} samples (fewer than the usual 1000, "
                    "limited by the sample counts); its value is not comparable to KID@1000.",
                    stacklevel=3,
                )
        if not 2 <= kid_subset_size <= n_min:
            raise ValueError(
                f"kid_subset_size must lie in [2, {n_min}] (the smaller sample count), "
                f"got {kid_subset_size}."
            )
        kwargs["kid_subset_size"] = kid_subset_size
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
    """FID (and optionally KID) of uint8 ``samples`` against uint8 ``reference`` via torch-fidelity.

    Args:
        samples: generated images, uint8 ``(N, C, H, W)``, ``C ∈ {1, 3}`` (1 is repeated to 3).
        reference: real images, same format.
        feature_extractor: a torch-fidelity extractor name: ``"flowmap-digits"`` (registered on
            demand) or ``"inception-v3-compat"`` (weights resolved and checked first by
            :func:`~flowmap.metrics.inception.verified_inception_weights`; pass
            ``feature_extractor_weights_path=...`` to choose the file).
        reference_cache_name: if set, torch-fidelity caches the reference features/statistics
            under this name (``<name>-<extractor>-stat-fid-<layer>.pt`` in ``cache_root``,
            default ``$TORCH_HOME/fidelity_cache``) and reuses them on later calls *without
            looking at ``reference``*; the key ignores the extractor's weights and the images,
            so change the name whenever either changes. Samples are never cached.
        kid: also compute KID (polynomial-kernel unbiased MMD² averaged over ``kid_subsets``
            random subsets of ``kid_subset_size``). KID needs ``kid_subset_size <=`` both
            sample counts: by default it is ``min(1000, N_samples, N_reference)`` (a warning
            says so when below 1000); an explicit larger value raises ``ValueError``.
        batch_size: feature-extraction batch size.
        **fe_kwargs: further ``calculate_metrics`` keywords (``feature_layer_fid``,
            ``feature_extractor_weights_path``, ``kid_subsets``, ``rng_seed``, …).
            ``save_cpu_ram=True`` (DataLoader without worker processes) is the default here.

    Returns:
        torch-fidelity's dict (``"frechet_inception_distance"``, and with ``kid``
        ``"kernel_inception_distance_mean"``/``"_std"`` plus ``"kid_subset_size"``) as floats.
        Always on CPU (``cuda=False``).
    """
    _check_uint8_images(samples, "samples")
    _check_uint8_images(reference, "reference")
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
        _check_uint8_images(x, "generator output")
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
    reference_cache_name: str | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    kid: bool = False,
    kid_subset_size: int | None = None,
    batch_size: int = 64,
    **fe_kwargs: Any,
) -> dict[str, float]:
    """FID of ``num_samples`` images drawn from a generator ``module`` against ``reference``.

    ``module`` maps noise ``(B, z_size)`` (drawn by torch-fidelity from ``z_type`` ∈ ``normal``,
    ``unit``, ``uniform_0_1`` with ``np.random.RandomState(rng_seed)``, default seed 2020) to
    uint8 images ``(B, C, H, W)``, ``C ∈ {1, 3}``; reshape image-shaped latents inside it. It
    is wrapped in ``torch_fidelity.GenerativeModelModuleWrapper``, put in eval mode for the
    call (its previous mode is restored) and may live on any device (noise is moved to it).
    Other arguments as in :func:`fid_torch_fidelity` (KID compares ``num_samples``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    if z_size < 1 or num_samples < 2:
        raise ValueError(f"Need z_size >= 1 and num_samples >= 2, got {z_size} and {num_samples}.")
    _check_uint8_images(reference, "reference")
    if len(reference) < 2:
        raise ValueError(f"FID needs at least 2 reference images, got {len(reference)}.")
    kwargs = _fidelity_kwargs(
        feature_extractor,
        num_samples,
        len(reference),
        reference_cache_name,
        cache_root,
        kid,
        kid_subset_size,
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


def make_torchmetrics_fid(
    feature: nn.Module | int = 2048,
    weights_path: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> FrechetInceptionDistance:
    """A float64 ``torchmetrics.image.fid.FrechetInceptionDistance`` that keeps real statistics.

    * ``feature`` int (64, 192, 768, 2048): Inception-v3 at that layer; the weights file is
      resolved and checked first (:func:`~flowmap.metrics.inception.verified_inception_weights`,
      ``weights_path`` or ``$FLOWMAP_INCEPTION_WEIGHTS`` or the torch hub cache) and handed over
      explicitly; ``antialias=False`` selects torch-fidelity's TF1-compatible resize, so
      features match torch-fidelity's. Inputs: uint8 ``N×3×H×W`` (or float ``[0, 1]`` with
      ``normalize=True``).
    * ``feature`` ``nn.Module`` (e.g. :class:`~flowmap.metrics.digits_extractor.DigitsFeatures`):
      used as is; ``weights_path`` must then be ``None``.

    Defaults ``reset_real_features=False`` (compute the reference once, then only
    ``update(fake, real=False)``/``compute()``/``reset()`` per evaluation); other ``kw`` go to
    the constructor. ``set_dtype(torch.float64)`` is applied, which also casts the extractor's
    parameters to float64 (slower, more accurate).
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
