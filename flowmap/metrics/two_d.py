"""Sample-based distances for low-dimensional (toy 2D) samples ``(N, d)``.

All functions accept torch tensors or numpy arrays, compute in float64 on CPU and return a
Python ``float``. Sample sets are empirical measures with uniform weights
``μ = (1/n) Σ_i δ_{x_i}``, ``ν = (1/m) Σ_j δ_{y_j}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ot
import torch
from torch import Tensor

from flowmap.metrics._arrays import ArrayLike, as_float64_array

__all__ = ["mmd_rbf", "sliced_wasserstein2", "teacher_endpoint_error", "wasserstein2"]


def _samples(x: ArrayLike, name: str) -> np.ndarray:
    """Validate a sample set: 2-D ``(N, d)``, ``N >= 1``, finite; returns float64 numpy."""
    a = as_float64_array(x, name, finite=True)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, d) with N, d >= 1, got {a.shape}.")
    return a


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _samples(x, "x"), _samples(y, "y")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"x and y must have the same dimension d, got {a.shape[1]} and {b.shape[1]}."
        )
    return a, b


def wasserstein2(x: ArrayLike, y: ArrayLike, num_iter_max: int = 1_000_000) -> float:
    r"""Exact 2-Wasserstein distance between the empirical measures of ``x`` and ``y``.

    .. math:: W_2(μ, ν) = \Big(\min_{P ∈ Π(a, b)} \sum_{ij} P_{ij} \|x_i - y_j\|_2^2\Big)^{1/2},
              \quad a = \mathbf 1/n,\ b = \mathbf 1/m,

    solved as a linear program by POT's network simplex (``ot.emd2``). Cost ``O(n m)`` memory
    and roughly cubic time: fine for a few thousand points. Raises ``RuntimeError`` if the
    solver stops before optimality (raise ``num_iter_max``).
    """
    a, b = _pair(x, y)
    cost = ot.dist(a, b, metric="sqeuclidean")
    wa = np.full(len(a), 1.0 / len(a))
    wb = np.full(len(b), 1.0 / len(b))
    value, log = ot.emd2(wa, wb, cost, numItermax=num_iter_max, log=True)
    if log.get("warning") is not None:
        raise RuntimeError(f"ot.emd2 did not reach optimality: {log['warning']}")
    return float(np.sqrt(max(float(value), 0.0)))


def sliced_wasserstein2(
    x: ArrayLike, y: ArrayLike, n_projections: int = 256, seed: int = 0
) -> float:
    r"""Monte-Carlo sliced 2-Wasserstein distance.

    .. math:: SW_2(μ, ν) = \Big(\mathbb E_{θ ∼ U(S^{d-1})} W_2^2(θ_\#μ, θ_\#ν)\Big)^{1/2}
              ≈ \Big(\frac1L \sum_{l=1}^L W_2^2(θ_l{}_\#μ, θ_l{}_\#ν)\Big)^{1/2},

    with ``L = n_projections`` directions drawn uniformly on the sphere from ``seed`` (the same
    seed gives the same directions, so comparisons across methods share them). Each 1-D
    ``W_2`` is exact (quantile matching via ``ot.wasserstein_1d``; ``n ≠ m`` is fine).

    Scale: since ``E[(θ·s)²] = |s|²/d``, a pure translation by ``s`` gives ``SW_2 = |s|/√d``
    while ``W_2 = |s|``; multiply by ``√d`` to compare with :func:`wasserstein2`.
    """
    if n_projections < 1:
        raise ValueError(f"n_projections must be a positive integer, got {n_projections}.")
    a, b = _pair(x, y)
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((a.shape[1], n_projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    w2_sq = ot.wasserstein_1d(a @ theta, b @ theta, p=2)
    return float(np.sqrt(max(float(np.mean(w2_sq)), 0.0)))


def mmd_rbf(x: ArrayLike, y: ArrayLike, bandwidths: Sequence[float] = (0.1, 0.5, 1, 2, 5)) -> float:
    r"""Biased (V-statistic) estimate of the squared MMD with a mixture of Gaussian kernels.

    .. math:: k(u, v) = \frac1{|H|} \sum_{h ∈ H} \exp\!\Big(-\frac{\|u - v\|^2}{2h^2}\Big),\qquad
              \widehat{\mathrm{MMD}}^2_b = \frac1{n^2}\sum_{ij} k(x_i, x_j)
              + \frac1{m^2}\sum_{ij} k(y_i, y_j) - \frac2{nm}\sum_{ij} k(x_i, y_j).

    The biased estimator is a squared RKHS norm of the difference of the empirical mean
    embeddings: it is ``>= 0`` and exactly ``0`` for identical sets (the unbiased one can be
    negative), at the price of an ``O(1/n)`` positive bias. Returned value is ``MMD²``, not its
    square root; bandwidths ``h`` are in data units. Memory is ``O((n + m)²)``.
    """
    hs = np.asarray(list(bandwidths), dtype=np.float64)
    if hs.ndim != 1 or hs.size == 0 or not (hs > 0).all():
        raise ValueError(
            f"bandwidths must be a non-empty sequence of positive numbers, got {bandwidths}."
        )
    a, b = _pair(x, y)
    xt, yt = torch.from_numpy(a), torch.from_numpy(b)
    inv = torch.from_numpy(1.0 / (2.0 * hs**2))

    def kernel_mean(u: Tensor, v: Tensor) -> float:
        d2 = torch.cdist(u, v).square()
        return float(torch.exp(-d2[..., None] * inv).mean())

    value = kernel_mean(xt, xt) + kernel_mean(yt, yt) - 2.0 * kernel_mean(xt, yt)
    return max(value, 0.0)


def teacher_endpoint_error(x: ArrayLike, x_ref: ArrayLike) -> float:
    r"""Mean distance of paired samples: :math:`\frac1N \sum_i \|x_i - x^{\rm ref}_i\|_2`.

    ``x_i`` and ``x_ref_i`` come from the same noise (e.g. a few-step sampler and the teacher's
    own ODE endpoint), so the sets are paired, not compared as distributions. Inputs have shape
    ``(N, ...)``; the norm is over all non-batch dimensions. Shapes must match exactly.
    """
    a, b = as_float64_array(x, "x", finite=True), as_float64_array(x_ref, "x_ref", finite=True)
    if a.shape != b.shape:
        raise ValueError(f"x and x_ref must have the same shape, got {a.shape} and {b.shape}.")
    if a.ndim < 2 or a.shape[0] < 1:
        raise ValueError(
            f"x must have shape (N, ...) with N >= 1 and a sample dimension, got {a.shape}."
        )
    diff = (a - b).reshape(a.shape[0], -1)
    return float(np.linalg.norm(diff, axis=1).mean())
