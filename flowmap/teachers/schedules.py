r"""A model's own noise schedule: its path :math:`x_\tau = a_\tau\,\mathrm{data} + g_\tau\,\mathrm{noise}`
in its own time :math:`\tau`, and the inverse of its log signal-to-noise ratio: members of the one
schedule family :class:`flowmap.paths.Schedule` (``linear`` and ``cosine`` are flowmap's own).

The log-SNR :math:`\lambda(\tau) = \log a_\tau - \log g_\tau` is monotone in :math:`\tau`; which end
is noise (:math:`\lambda` low) is read from the schedule, so time may run either way. A teacher
evaluates them in float64. Also here: which student times a schedule covers (:func:`check_coverage`).

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
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from flowmap.paths import CosineSchedule, LinearSchedule, Schedule

__all__ = [
    "FunctionSchedule",
    "ReversedSchedule",
    "DiscreteVPSchedule",
    "SCHEDULES",
    "check_coverage",
    "native_schedule",
    "resolve_schedule",
    "schedule_identity",
]

_F64 = torch.float64
#: a log-SNR beyond this is an end of the path (SNR e^30: coefficients below float64 resolution)
_INFINITE = 30.0
#: predictions that cannot give (data, noise) at zero SNR (the noise end) or infinite SNR (data end)
_SINGULAR_AT_NOISE = ("epsilon", "score")
_SINGULAR_AT_DATA = ("sample", "score")


class FunctionSchedule(Schedule):
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

    def log_snr_inverse(self, lam: Tensor) -> Tensor:
        if self._inverse is None:
            return super().log_snr_inverse(lam)
        return self._inverse(lam.to(_F64)).clamp(self.tau_min, self.tau_max)


class ReversedSchedule(Schedule):
    r"""A schedule of the family run from data to noise over ``[0, T]`` (float64):
    :math:`a_\tau = \sigma(\tau/T),\ g_\tau = \alpha(\tau/T)`, so
    :math:`\lambda^{-1}(\lambda) = T\,\lambda_{base}^{-1}(-\lambda)` (rectified flow is the reversed
    linear schedule, v-diffusion's the reversed cosine)."""

    def __init__(self, base: Schedule, time_scale: float = 1.0, name: str = "reversed") -> None:
        self.base, self.time_scale, self.name = base, float(time_scale), name
        super().__init__(0.0, self.time_scale)

    def coefficients(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        a, g = self.base.coefficients(tau.to(_F64) / self.time_scale)
        return g, a

    def derivatives(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        da, dg = self.base.derivatives(tau.to(_F64) / self.time_scale)
        return dg / self.time_scale, da / self.time_scale

    def log_snr_inverse(self, lam: Tensor) -> Tensor:
        return self.time_scale * self.base.log_snr_inverse(-lam.to(_F64))


class DiscreteVPSchedule(Schedule):
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

    def log_snr_inverse(self, lam: Tensor) -> Tensor:
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


def _edm(sigma_min: float = 0.002, sigma_max: float = 80.0) -> Schedule:
    return FunctionSchedule(
        lambda s: torch.ones_like(s),
        lambda s: s,
        sigma_min,
        sigma_max,
        "edm",
        lambda lam: torch.exp(-lam),
    )


#: the named schedules and the keyword arguments each takes
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "rectified_flow": lambda num_train_timesteps=1.0: ReversedSchedule(
        LinearSchedule(), num_train_timesteps, "rectified_flow"
    ),
    "vp_cosine": lambda: ReversedSchedule(CosineSchedule(), 1.0, "vp_cosine"),
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


def native_schedule(name: str | Schedule, **kwargs: float) -> Schedule:
    """A named schedule (see the module table) with its keyword arguments; a schedule passes through."""
    if isinstance(name, Schedule):
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


def resolve_schedule(
    schedule: str | Schedule | None = None,
    alpha: Callable[[Tensor], Tensor] | None = None,
    sigma: Callable[[Tensor], Tensor] | None = None,
    schedule_args: Mapping[str, Any] | None = None,
    tau_range: tuple[float, float] | None = None,
) -> tuple[Schedule, float, float]:
    r"""A teacher's schedule (by name, as a :class:`~flowmap.paths.Schedule`, or as functions
    :math:`a(\tau), g(\tau)` on ``tau_range``) and its used ends :math:`(\tau_{noise}, \tau_{data})`:
    the schedule's, or ``tau_range``'s in the same order."""
    if (alpha is None) != (sigma is None) or (alpha is not None and schedule is not None):
        raise ValueError(
            "Give the model's schedule either by name (schedule=...) or as both alpha= and "
            "sigma= functions of its time, not both."
        )
    if alpha is not None:
        lo, hi = tau_range or (0.0, 1.0)
        s = FunctionSchedule(alpha, sigma, lo, hi)
        return s, s.tau_noise, s.tau_data
    if schedule is None:
        raise ValueError(
            "The teacher needs the model's schedule: schedule='ddpm_linear', 'edm', "
            "'rectified_flow', ... or alpha= and sigma= functions of its time."
        )
    s = native_schedule(schedule, **dict(schedule_args or {}))
    if tau_range is None:
        return s, s.tau_noise, s.tau_data
    lo, hi = sorted(float(v) for v in tau_range)
    if lo < s.tau_min or hi > s.tau_max:
        raise ValueError(
            f"tau_range {list(tau_range)} lies outside the {s.name} schedule's times "
            f"[{s.tau_min:g}, {s.tau_max:g}]; narrow it."
        )
    return (s, lo, hi) if s.tau_noise < s.tau_data else (s, hi, lo)


def _gaps(
    schedule: Schedule, prediction: str, student: Schedule, tau_noise: float, tau_data: float
) -> list[tuple[str, float, float, str, bool]]:
    """``(end, student time, τ, why, singular)`` for each end of the student's time that the
    schedule on ``[τ_noise, τ_data]`` (with this prediction) misses."""
    lo, hi = schedule.log_snr(torch.tensor([tau_noise, tau_data], dtype=_F64)).tolist()
    gaps = []
    if lo > -_INFINITE or prediction in _SINGULAR_AT_NOISE:
        t = student.log_snr_inverse(torch.tensor([lo], dtype=_F64)).item()
        why = (
            f"the {prediction} prediction gives no data estimate at zero SNR"
            if lo <= -_INFINITE
            else f"its noisiest time τ = {tau_noise:g} has log-SNR {lo:.3g}"
        )
        gaps.append(("noise", t, tau_noise, why, lo <= -_INFINITE))
    if hi < _INFINITE or prediction in _SINGULAR_AT_DATA:
        t = student.log_snr_inverse(torch.tensor([hi], dtype=_F64)).item()
        why = (
            f"the {prediction} prediction gives no noise estimate at zero noise"
            if hi >= _INFINITE
            else f"its cleanest time τ = {tau_data:g} has log-SNR {hi:.3g}"
        )
        gaps.append(("data", t, tau_data, why, hi >= _INFINITE))
    return gaps


def check_coverage(
    schedule: Schedule,
    prediction: str,
    student: Schedule,
    tau_noise: float,
    tau_data: float,
    clip: bool = False,
) -> None:
    r"""Refuse a schedule on ``[τ_noise, τ_data]`` whose log-SNR :math:`\lambda(\tau)` misses the
    ``student``'s at :math:`t \to 0` or :math:`1` (unless ``clip``: then those times are evaluated
    at the nearest end), or whose end is one where ``prediction`` is singular (never allowed)."""
    gaps = _gaps(schedule, prediction, student, tau_noise, tau_data)
    if not gaps:
        return
    singular = [g for g in gaps if g[4]]
    if singular:
        end, _, tau, why, _ = singular[0]
        ends = {"noise": tau_noise, "data": tau_data}
        span = tau_data - tau_noise
        for e, *_ in singular:  # stop 0.001 of the way short of each singular end
            ends[e] += 1e-3 * span if e == "noise" else -1e-3 * span
        short = sorted(ends.values())
        raise ValueError(
            f"The {schedule.name} schedule ends at τ = {tau:g}, where {why}, so the student's "
            f"times near {0 if end == 'noise' else 1} are not covered; give a tau_range that stops "
            f"short of τ = {tau:g} (e.g. tau_range=[{short[0]:g}, {short[1]:g}]) and clip=True."
        )
    if clip:
        return
    parts = [
        f"{why}, which the student's {student.name} path reaches only at t = {t:.4g}, so "
        f"t {'<' if end == 'noise' else '>'} {t:.4g} is not covered"
        for end, t, tau, why, _ in gaps
    ]
    raise ValueError(
        f"The {schedule.name} schedule does not reach the student's "
        f"{' and '.join(g[0] for g in gaps)} end: {'; '.join(parts)}; pass clip=True to "
        "evaluate those times at the schedule's nearest end (as DDPM and DDIM samplers "
        "start from pure noise at their last step)."
    )


def schedule_identity(schedule: Schedule, lo: float, hi: float) -> list[Any]:
    """``[name, lo, hi, fingerprint]``: the schedule's coefficients at 17 times of ``[lo, hi]``
    (rounded to 12 digits), which tell two schedules of one name apart."""
    grid = torch.linspace(lo, hi, 17, dtype=_F64)
    fingerprint = [[round(float(v), 12) for v in c] for c in schedule.coefficients(grid)]
    return [schedule.name, lo, hi, fingerprint]
