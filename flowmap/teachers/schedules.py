r"""A model's own noise schedule: its path :math:`x_\tau = a_\tau\,\mathrm{data} + g_\tau\,\mathrm{noise}`
in its own time :math:`\tau`, and the inverse of its log signal-to-noise ratio.

The log-SNR :math:`\lambda(\tau) = \log a_\tau - \log g_\tau` is monotone in :math:`\tau`; which end
is noise (:math:`\lambda` low) is read from the schedule, so time may run either way. Everything here
is float64.

Named schedules (:func:`native_schedule`):

========================  ================================================  ====================
name                      :math:`a_\tau,\ g_\tau`                            noise at
========================  ================================================  ====================
``linear``                :math:`\tau,\ 1-\tau` (flowmap, Meta, TorchCFM)    :math:`\tau = 0`
``cosine``                :math:`\sin\frac{\pi\tau}{2},\ \cos\frac{\pi\tau}{2}`  :math:`\tau = 0`
``rectified_flow``        :math:`1-\tau/T,\ \tau/T` (SD3, Flux; T = 1000 in diffusers)  :math:`\tau = T`
``vp_cosine``             :math:`\cos\frac{\pi\tau}{2},\ \sin\frac{\pi\tau}{2}` (v-diffusion)  :math:`\tau = 1`
``ddpm_linear``           discrete VP, :math:`\beta` linear 1e-4…0.02        :math:`\tau = 999`
``scaled_linear``         discrete VP, :math:`\sqrt\beta` linear (SD 1.x)    :math:`\tau = 999`
``squaredcos_cap_v2``     discrete VP, :math:`\bar\alpha` cosine (iDDPM)    :math:`\tau = 999`
``edm`` (``ve``)          :math:`1,\ \tau` (σ-time, :math:`\tau = \sigma`)   :math:`\tau = \sigma_{max}`
========================  ================================================  ====================

A discrete VP schedule has :math:`\bar\alpha_k = \prod_{i\le k}(1-\beta_i)` at integer steps
:math:`k = 0..T-1`, :math:`a_k = \sqrt{\bar\alpha_k}`, :math:`g_k = \sqrt{1-\bar\alpha_k}`; between
integers :math:`\lambda` is interpolated linearly, so the inverse is exact and a model that takes
fractional timesteps is evaluated at the exact SNR.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "NativeSchedule",
    "FunctionSchedule",
    "DiscreteVPSchedule",
    "SCHEDULES",
    "native_schedule",
]

_F64 = torch.float64


class NativeSchedule(ABC):
    r"""A model's path :math:`x_\tau = a_\tau x_1 + g_\tau\varepsilon` on its time range
    ``[tau_min, tau_max]``, with :math:`\lambda(\tau) = \log(a_\tau/g_\tau)` monotone."""

    name: str = "custom"
    #: whether the model takes integer timesteps (a discrete schedule)
    discrete: bool = False

    def __init__(self, tau_min: float, tau_max: float) -> None:
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
        r""":math:`(a_\tau, g_\tau)` at float64 times ``tau``."""

    def derivatives(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        r""":math:`(\dot a_\tau, \dot g_\tau)`, by autograd of :meth:`coefficients` (float64)."""
        with torch.enable_grad():
            tau = tau.detach().to(_F64).requires_grad_(True)
            out = []
            for c in self.coefficients(tau):  # a constant coefficient (EDM's a = 1) has no graph
                d = (
                    torch.autograd.grad(c.sum(), tau, allow_unused=True)[0]
                    if c.requires_grad
                    else None
                )
                out.append(torch.zeros_like(tau.detach()) if d is None else d.detach())
        return out[0], out[1]

    def log_snr(self, tau: Tensor) -> Tensor:
        r""":math:`\lambda(\tau) = \log a_\tau - \log g_\tau` (:math:`\pm\infty` where a coefficient is 0)."""
        a, g = self.coefficients(tau.to(_F64))
        return torch.log(a) - torch.log(g)

    def tau_at(self, lam: Tensor) -> Tensor:
        r"""The time with log-SNR ``lam`` (inside the schedule's range), by bisection in float64."""
        lo = torch.full_like(lam, self.tau_noise, dtype=_F64)
        hi = torch.full_like(lam, self.tau_data, dtype=_F64)
        for _ in range(100):  # the interval halves each time: float64 resolution after ~60
            mid = 0.5 * (lo + hi)
            below = self.log_snr(mid) < lam  # still too noisy: move towards the data end
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, tau in [{self.tau_min:g}, {self.tau_max:g}])"


class FunctionSchedule(NativeSchedule):
    r"""Any schedule given as two functions :math:`a(\tau), g(\tau)` of the model's time (torch ops
    on a float64 tensor, so that :meth:`derivatives` can differentiate them), with an optional
    closed-form inverse ``tau_of_log_snr``."""

    def __init__(
        self,
        alpha: Callable[[Tensor], Tensor],
        sigma: Callable[[Tensor], Tensor],
        tau_min: float = 0.0,
        tau_max: float = 1.0,
        name: str = "custom",
        tau_of_log_snr: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.alpha, self.sigma, self.name = alpha, sigma, name
        self._inverse = tau_of_log_snr
        super().__init__(tau_min, tau_max)

    def coefficients(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        tau = tau.to(_F64)
        return (
            torch.as_tensor(self.alpha(tau), dtype=_F64, device=tau.device).expand_as(tau),
            torch.as_tensor(self.sigma(tau), dtype=_F64, device=tau.device).expand_as(tau),
        )

    def tau_at(self, lam: Tensor) -> Tensor:
        if self._inverse is None:
            return super().tau_at(lam)
        return self._inverse(lam.to(_F64)).clamp(self.tau_min, self.tau_max)


class DiscreteVPSchedule(NativeSchedule):
    r"""A variance-preserving schedule of ``T`` integer steps from its :math:`\beta_k`:
    :math:`\bar\alpha_k = \prod_{i \le k} (1 - \beta_i)`, :math:`a_k = \sqrt{\bar\alpha_k}`,
    :math:`g_k = \sqrt{1 - \bar\alpha_k}`; :math:`\lambda` linear between integers."""

    discrete = True

    def __init__(self, betas: Tensor, name: str = "discrete_vp") -> None:
        betas = torch.as_tensor(betas, dtype=_F64)
        if betas.ndim != 1 or betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("A discrete VP schedule needs at least 2 betas, each in (0, 1).")
        self.name = name
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self._lam = 0.5 * (torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod))
        if not bool((self._lam.diff() < 0).all()):
            raise ValueError("A discrete VP schedule's SNR must fall at every step.")
        super().__init__(0.0, float(betas.numel() - 1))

    @property
    def num_train_timesteps(self) -> int:
        return self._lam.numel()

    def log_snr(self, tau: Tensor) -> Tensor:
        tau = tau.to(_F64).clamp(self.tau_min, self.tau_max)
        k = tau.floor().clamp(max=self.tau_max - 1)
        frac = tau - k
        lam = self._lam.to(tau.device)
        i = k.long()
        return (1 - frac) * lam[i] + frac * lam[i + 1]

    def coefficients(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        lam = self.log_snr(tau)
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()

    def tau_at(self, lam: Tensor) -> Tensor:
        table = self._lam.to(lam.device)
        lam = lam.to(_F64).clamp(float(table[-1]), float(table[0]))
        # λ falls with k: count the steps whose λ is above lam
        k = (torch.searchsorted(-table, -lam, right=False) - 1).clamp(0, table.numel() - 2)
        lo, hi = table[k], table[k + 1]
        return k.to(_F64) + (lo - lam) / (lo - hi)

    @classmethod
    def from_betas(
        cls,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
    ) -> DiscreteVPSchedule:
        r"""diffusers' ``beta_schedule`` names: ``"linear"``, ``"scaled_linear"`` and
        ``"squaredcos_cap_v2"`` (:math:`\bar\alpha(u) = \cos^2(\frac{u + 0.008}{1.008}\frac{\pi}{2})`,
        :math:`\beta \le 0.999`), computed in float64."""
        n = int(num_train_timesteps)
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=_F64)
            name = "ddpm_linear"
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=_F64) ** 2
            name = "scaled_linear"
        elif beta_schedule == "squaredcos_cap_v2":
            u = torch.arange(n + 1, dtype=_F64) / n
            abar = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
            name = "squaredcos_cap_v2"
        else:
            raise ValueError(
                f"Unknown beta schedule {beta_schedule!r}; choose linear, scaled_linear or "
                "squaredcos_cap_v2, or give the betas to DiscreteVPSchedule."
            )
        return cls(betas, name=name)


def _linear() -> NativeSchedule:
    return FunctionSchedule(
        lambda t: t, lambda t: 1 - t, 0.0, 1.0, "linear", lambda lam: torch.sigmoid(lam)
    )


def _cosine() -> NativeSchedule:
    half_pi = math.pi / 2
    return FunctionSchedule(
        lambda t: torch.sin(half_pi * t),
        lambda t: torch.cos(half_pi * t),
        0.0,
        1.0,
        "cosine",
        lambda lam: torch.atan(torch.exp(lam)) / half_pi,
    )


def _rectified_flow(num_train_timesteps: float = 1.0) -> NativeSchedule:
    T = float(num_train_timesteps)
    return FunctionSchedule(
        lambda t: 1 - t / T,
        lambda t: t / T,
        0.0,
        T,
        "rectified_flow",
        lambda lam: T * torch.sigmoid(-lam),
    )


def _vp_cosine() -> NativeSchedule:
    half_pi = math.pi / 2
    return FunctionSchedule(
        lambda t: torch.cos(half_pi * t),
        lambda t: torch.sin(half_pi * t),
        0.0,
        1.0,
        "vp_cosine",
        lambda lam: torch.atan(torch.exp(-lam)) / half_pi,
    )


def _edm(sigma_min: float = 0.002, sigma_max: float = 80.0) -> NativeSchedule:
    return FunctionSchedule(
        lambda s: torch.ones_like(s),
        lambda s: s,
        sigma_min,
        sigma_max,
        "edm",
        lambda lam: torch.exp(-lam),
    )


#: the named schedules and the keyword arguments each takes
SCHEDULES: dict[str, Callable[..., NativeSchedule]] = {
    "linear": _linear,
    "cosine": _cosine,
    "rectified_flow": _rectified_flow,
    "vp_cosine": _vp_cosine,
    "ddpm_linear": lambda num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02: (
        DiscreteVPSchedule.from_betas("linear", beta_start, beta_end, num_train_timesteps)
    ),
    "scaled_linear": lambda num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012: (
        DiscreteVPSchedule.from_betas("scaled_linear", beta_start, beta_end, num_train_timesteps)
    ),
    "squaredcos_cap_v2": lambda num_train_timesteps=1000: DiscreteVPSchedule.from_betas(
        "squaredcos_cap_v2", num_train_timesteps=num_train_timesteps
    ),
    "edm": _edm,
    "ve": _edm,
}


def native_schedule(name: str | NativeSchedule, **kwargs: float) -> NativeSchedule:
    """A named schedule (see the module table) with its keyword arguments; a schedule passes through."""
    if isinstance(name, NativeSchedule):
        return name
    if name not in SCHEDULES:
        raise ValueError(
            f"Unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}, or give alpha= and "
            "sigma= as functions of the model's time."
        )
    try:
        return SCHEDULES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"The {name!r} schedule does not take these arguments: {e}.") from None
