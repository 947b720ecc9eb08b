r"""Schedules and the affine interpolant.

Time runs from noise at :math:`t=0` to data at :math:`t=1`:

.. math::  x_t = \alpha_t x_1 + \sigma_t x_0, \qquad \dot x_t = \dot\alpha_t x_1 + \dot\sigma_t x_0,

with :math:`x_0 \sim N(0, I)`. This module is the one place that knows the convention; every other
module asks it for :math:`\alpha, \sigma` and their derivatives.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "LinearSchedule",
    "CosineSchedule",
    "ScheduleOutput",
    "AffinePath",
    "PathSample",
    "as_path",
    "as_time",
    "expand_like",
    "get_schedule",
    "time_dtype",
]


def time_dtype(like: Tensor) -> torch.dtype:
    """The dtype times are computed in: float32, even under mixed precision, except
    beside float64 tensors, where times stay float64 so that analytic oracles hold to float64."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def as_time(t: float | Tensor, x: Tensor) -> Tensor:
    """A time (float, 0-d or ``(B,)`` tensor) as a vector ``(B,)`` of :func:`time_dtype` ``(x)`` on ``x``'s device."""
    # a Python float becomes the time dtype directly (not float32 first: float64 times stay exact)
    t = torch.as_tensor(t, device=x.device, dtype=None if isinstance(t, Tensor) else time_dtype(x))
    t = t.to(time_dtype(x))
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"Times must be scalars or shape ({x.shape[0]},), got {tuple(t.shape)}.")
    return t


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a time vector ``(B,)`` (or a scalar) so that it broadcasts against ``x`` ``(B, *shape)``."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


@dataclass
class ScheduleOutput:
    """:math:`(\\alpha_t, \\sigma_t, \\dot\\alpha_t, \\dot\\sigma_t)` at a time ``t``."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


class Schedule(ABC):
    """A schedule :math:`(\\alpha_t, \\sigma_t)` with :math:`\\alpha_0=0, \\sigma_0=1, \\alpha_1=1, \\sigma_1=0`."""

    name: str = "schedule"

    @abstractmethod
    def __call__(self, t: Tensor) -> ScheduleOutput:
        """:math:`(\\alpha_t, \\sigma_t, \\dot\\alpha_t, \\dot\\sigma_t)` at times ``t``."""


class LinearSchedule(Schedule):
    r"""Linear (rectified flow / CondOT): :math:`\alpha_t = t,\ \sigma_t = 1 - t`."""

    name = "linear"

    def __call__(self, t: Tensor) -> ScheduleOutput:
        one = torch.ones_like(t)
        return ScheduleOutput(alpha=t, sigma=1 - t, d_alpha=one, d_sigma=-one)


class CosineSchedule(Schedule):
    r"""Cosine: :math:`\alpha_t = \sin(\pi t/2),\ \sigma_t = \cos(\pi t/2)`."""

    name = "cosine"

    def __call__(self, t: Tensor) -> ScheduleOutput:
        a = 0.5 * math.pi * t
        half_pi = 0.5 * math.pi
        return ScheduleOutput(
            alpha=torch.sin(a),
            sigma=torch.cos(a),
            d_alpha=half_pi * torch.cos(a),
            d_sigma=-half_pi * torch.sin(a),
        )


_SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule}


def get_schedule(name: str | Schedule) -> Schedule:
    """Return a schedule by name (``"linear"`` or ``"cosine"``); a :class:`Schedule` passes through."""
    if isinstance(name, Schedule):
        return name
    if name not in _SCHEDULES:
        raise ValueError(f"Unknown schedule {name!r}; choose one of {sorted(_SCHEDULES)}.")
    return _SCHEDULES[name]()


@dataclass
class PathSample:
    r"""One draw from the path: :math:`x_t`, the conditional velocity :math:`\dot x_t`, and what made them."""

    x_t: Tensor
    dx_t: Tensor
    t: Tensor
    x0: Tensor
    x1: Tensor


class AffinePath:
    r"""The interpolant :math:`x_t = \alpha_t x_1 + \sigma_t x_0` and its parameterisation conversions.

    For a prediction at :math:`(x_t, t)` the velocity :math:`v`, the data prediction :math:`\hat x_1`
    and the noise prediction :math:`\hat x_0` are related by the 2×2 system
    :math:`x_t = \alpha \hat x_1 + \sigma \hat x_0,\ v = \dot\alpha \hat x_1 + \dot\sigma \hat x_0`,
    whose determinant is :math:`\alpha\dot\sigma - \sigma\dot\alpha` (non-zero on (0, 1) for both schedules).
    """

    def __init__(self, schedule: str | Schedule = "linear") -> None:
        self.schedule = get_schedule(schedule)

    @property
    def name(self) -> str:
        """The schedule's name (``"linear"``, ``"cosine"``)."""
        return self.schedule.name

    def coefficients(self, t: Tensor, x: Tensor) -> ScheduleOutput:
        """Schedule coefficients at ``t`` (in :func:`time_dtype` ``(x)``), shaped like ``x``."""
        out = self.schedule(t.to(time_dtype(x)))
        return ScheduleOutput(*(expand_like(c, x).to(x.dtype) for c in vars(out).values()))

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        r"""The interpolant :math:`x_t = \alpha_t x_1 + \sigma_t x_0` and :math:`\dot x_t` for noise ``x0``,
        data ``x1`` and times ``t`` ``(B,)``."""
        c = self.coefficients(t, x1)
        return PathSample(
            x_t=c.alpha * x1 + c.sigma * x0, dx_t=c.d_alpha * x1 + c.d_sigma * x0, t=t, x0=x0, x1=x1
        )

    def _det(self, c: ScheduleOutput) -> Tensor:
        return c.alpha * c.d_sigma - c.sigma * c.d_alpha

    def velocity_to_data(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        r""":math:`\hat x_1 = (\dot\sigma x_t - \sigma v)/(\alpha\dot\sigma - \sigma\dot\alpha)`."""
        c = self.coefficients(t, x_t)
        return (c.d_sigma * x_t - c.sigma * v) / self._det(c)

    def velocity_to_noise(self, v: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        r""":math:`\hat x_0 = (\alpha v - \dot\alpha x_t)/(\alpha\dot\sigma - \sigma\dot\alpha)`."""
        c = self.coefficients(t, x_t)
        return (c.alpha * v - c.d_alpha * x_t) / self._det(c)

    def data_to_velocity(self, x1_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        r""":math:`v = \dot\alpha \hat x_1 + \dot\sigma (x_t - \alpha \hat x_1)/\sigma`."""
        c = self.coefficients(t, x_t)
        return c.d_alpha * x1_hat + c.d_sigma * (x_t - c.alpha * x1_hat) / c.sigma

    def noise_to_velocity(self, x0_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        r""":math:`v = \dot\alpha (x_t - \sigma \hat x_0)/\alpha + \dot\sigma \hat x_0`."""
        c = self.coefficients(t, x_t)
        return c.d_alpha * (x_t - c.sigma * x0_hat) / c.alpha + c.d_sigma * x0_hat


def as_path(path: str | Schedule | AffinePath) -> AffinePath:
    """An :class:`AffinePath` from a schedule name, a :class:`Schedule` or a path (passed through)."""
    return path if isinstance(path, AffinePath) else AffinePath(path)
