r"""Schedules and the affine interpolant.

Time runs from noise at :math:`t=0` to data at :math:`t=1`:

.. math::  x_t = \alpha_t x_1 + \sigma_t x_0, \qquad \dot x_t = \dot\alpha_t x_1 + \dot\sigma_t x_0,

with :math:`x_0 \sim N(0, I)`. This module is the one place that knows the convention; every other
module asks it for :math:`\alpha, \sigma` and their derivatives. It holds the one schedule family
(:class:`Schedule`: coefficients, derivatives, log-SNR and its inverse, which a foreign model's
schedule in :mod:`flowmap.teachers.schedules` also is) and the one converter between predictions
(:func:`data_and_noise`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

_F64 = torch.float64

__all__ = [
    "PREDICTIONS",
    "Schedule",
    "LinearSchedule",
    "CosineSchedule",
    "ScheduleOutput",
    "AffinePath",
    "PathSample",
    "as_path",
    "as_time",
    "check_prediction",
    "data_and_noise",
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
    r"""The one schedule family: a path :math:`x_\tau = \alpha_\tau x_1 + \sigma_\tau x_0` on the
    times ``[tau_min, tau_max]`` with a monotone log-SNR :math:`\lambda(\tau) = \log(\alpha_\tau/\sigma_\tau)`.

    flowmap's own paths (:class:`LinearSchedule`, :class:`CosineSchedule`) run on ``[0, 1]`` with
    noise at 0; a foreign model's (:mod:`flowmap.teachers.schedules`) may run either way, and
    which end is noise (:math:`\lambda` low) is read from the schedule. As Meta flow_matching's
    ``Scheduler``: coefficients, their derivatives, and the inverse of the (log-)SNR.
    """

    name: str = "schedule"
    #: whether the model takes integer timesteps (a discrete schedule)
    discrete: bool = False

    def __init__(self, tau_min: float = 0.0, tau_max: float = 1.0) -> None:
        if not tau_min < tau_max:
            raise ValueError(
                f"A schedule's time range needs tau_min < tau_max, got [{tau_min}, {tau_max}]."
            )
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        lo, hi = self.log_snr(torch.tensor([self.tau_min, self.tau_max], dtype=_F64)).tolist()
        if lo == hi or math.isnan(lo) or math.isnan(hi):
            raise ValueError(
                f"The {self.name} schedule's log-SNR is {lo} at τ = {tau_min} and {hi} at τ = "
                f"{tau_max}; a schedule must run from noise to data."
            )
        #: the time of the noisy end (lowest SNR) and of the clean end
        self.tau_noise, self.tau_data = (
            (self.tau_min, self.tau_max) if lo < hi else (self.tau_max, self.tau_min)
        )

    @abstractmethod
    def coefficients(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\alpha_\tau, \sigma_\tau)` at times ``tau``."""

    def derivatives(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\dot\alpha_\tau, \dot\sigma_\tau)`, by default by autograd of :meth:`coefficients` (float64)."""
        with torch.enable_grad():
            tau = tau.detach().to(_F64).requires_grad_(True)
            out = []
            for c in self.coefficients(tau):  # a constant coefficient (EDM's a = 1) has no graph
                d = (
                    torch.autograd.grad(c.sum(), tau, allow_unused=True, retain_graph=True)[0]
                    if c.requires_grad
                    else None
                )
                out.append(torch.zeros_like(tau.detach()) if d is None else d.detach())
        return out[0], out[1]

    def __call__(self, t: Tensor) -> ScheduleOutput:
        """:math:`(\\alpha_t, \\sigma_t, \\dot\\alpha_t, \\dot\\sigma_t)` at times ``t``."""
        return ScheduleOutput(*self.coefficients(t), *self.derivatives(t))

    def log_snr(self, tau: Tensor) -> Tensor:
        r""":math:`\lambda(\tau) = \log\alpha_\tau - \log\sigma_\tau` in float64 (:math:`\pm\infty` at a zero)."""
        a, g = self.coefficients(tau.to(_F64))
        return torch.log(a) - torch.log(g)

    def log_snr_inverse(self, lam: Tensor) -> Tensor:
        r"""The time :math:`\tau = \lambda^{-1}(\mathrm{lam})` inside the range (float64; by
        default by bisection, which halves the interval to float64 resolution)."""
        lo = torch.full_like(lam, self.tau_noise, dtype=_F64)
        hi = torch.full_like(lam, self.tau_data, dtype=_F64)
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            below = self.log_snr(mid) < lam  # still too noisy: move towards the data end
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, tau in [{self.tau_min:g}, {self.tau_max:g}])"


class LinearSchedule(Schedule):
    r"""Linear (rectified flow / CondOT): :math:`\alpha_t = t,\ \sigma_t = 1 - t`;
    :math:`\lambda^{-1}(\lambda) = \mathrm{sigmoid}(\lambda)`."""

    name = "linear"

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t, 1 - t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        one = torch.ones_like(t)
        return one, -one

    def log_snr_inverse(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(lam.to(_F64)).clamp(0.0, 1.0)


class CosineSchedule(Schedule):
    r"""Cosine: :math:`\alpha_t = \sin(\pi t/2),\ \sigma_t = \cos(\pi t/2)`;
    :math:`\lambda^{-1}(\lambda) = \tfrac{2}{\pi}\arctan e^{\lambda}`."""

    name = "cosine"

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        a = 0.5 * math.pi * t
        return torch.sin(a), torch.cos(a)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        a = 0.5 * math.pi * t
        half_pi = 0.5 * math.pi
        return half_pi * torch.cos(a), -half_pi * torch.sin(a)

    def log_snr_inverse(self, lam: Tensor) -> Tensor:
        return (torch.atan(torch.exp(lam.to(_F64))) / (math.pi / 2)).clamp(0.0, 1.0)


_SCHEDULES = {"linear": LinearSchedule, "cosine": CosineSchedule}


def get_schedule(name: str | Schedule) -> Schedule:
    """Return a schedule by name (``"linear"`` or ``"cosine"``); a :class:`Schedule` passes through."""
    if isinstance(name, Schedule):
        return name
    if name not in _SCHEDULES:
        raise ValueError(f"Unknown schedule {name!r}; choose one of {sorted(_SCHEDULES)}.")
    return _SCHEDULES[name]()


# ----------------------------------------------------------------------- the one converter
#: the predictions a model may make (diffusers' names where it has one)
PREDICTIONS = ("epsilon", "sample", "v_prediction", "velocity", "score")


def check_prediction(prediction: str) -> str:
    """The prediction name, or a one-sentence error naming the known ones."""
    if prediction not in PREDICTIONS:
        raise ValueError(
            f"Unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)} "
            "(diffusers' prediction_type names, plus velocity and score)."
        )
    return prediction


def data_and_noise(
    prediction: str,
    out: Tensor,
    x: Tensor,
    a: Tensor,
    g: Tensor,
    da: Tensor | None = None,
    dg: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The data and noise estimates :math:`(\hat x_1, \hat x_0)` from a ``prediction`` ``out`` at
    :math:`x = a\hat x_1 + g\hat x_0` on any schedule of the family (coefficients :math:`a, g`;
    :math:`\dot a, \dot g` for ``"velocity"``), broadcast against ``x``:

    .. math::
       \text{epsilon: } \hat x_1 = (x - g\hat x_0)/a; \quad
       \text{sample: } \hat x_0 = (x - a\hat x_1)/g; \quad
       \text{score } \hat s: \hat x_0 = -g\hat s;

       \text{v: } (\hat x_1, \hat x_0) = \frac{(a x - g\hat v,\ g x + a\hat v)}{a^2 + g^2};

       \text{velocity } \hat u: (\hat x_1, \hat x_0)
       = \frac{(\dot g x - g\hat u,\ a\hat u - \dot a x)}{a\dot g - g\dot a}.

    A velocity back from them is :math:`\dot a\hat x_1 + \dot g\hat x_0`."""
    if prediction == "epsilon":
        return (x - g * out) / a, out
    if prediction == "sample":
        return out, (x - a * out) / g
    if prediction == "score":
        eps = -g * out
        return (x - g * eps) / a, eps
    if prediction == "v_prediction":
        n = a**2 + g**2
        return (a * x - g * out) / n, (g * x + a * out) / n
    if prediction == "velocity":
        det = a * dg - g * da
        return (dg * x - g * out) / det, (a * out - da * x) / det
    raise ValueError(check_prediction(prediction))


# ----------------------------------------------------------------------- the interpolant
@dataclass
class PathSample:
    r"""One draw from the path: :math:`x_t`, the conditional velocity :math:`\dot x_t`, and what made them."""

    x_t: Tensor
    dx_t: Tensor
    t: Tensor
    x0: Tensor
    x1: Tensor


class AffinePath:
    r"""The interpolant :math:`x_t = \alpha_t x_1 + \sigma_t x_0` of a schedule that runs from
    noise at :math:`t = 0` to data at :math:`t = 1` (predictions convert by :func:`data_and_noise`)."""

    def __init__(self, schedule: str | Schedule = "linear") -> None:
        self.schedule = get_schedule(schedule)
        s = self.schedule
        if (s.tau_noise, s.tau_data) != (0.0, 1.0):
            raise ValueError(
                f"A flowmap path runs from noise at t = 0 to data at t = 1; the {s.name} schedule "
                f"has noise at {s.tau_noise:g} and data at {s.tau_data:g}."
            )

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


def as_path(path: str | Schedule | AffinePath) -> AffinePath:
    """An :class:`AffinePath` from a schedule name, a :class:`Schedule` or a path (passed through)."""
    return path if isinstance(path, AffinePath) else AffinePath(path)
