r"""A model trained in another convention, seen as flowmap's velocity :math:`b_t(x)`.

The model has its own path :math:`x_\tau = a_\tau x_1 + g_\tau \varepsilon` in its own time
:math:`\tau` (:mod:`flowmap.teachers.schedules`) and predicts one of (diffusers' names first)

=================  =====================================================================
``epsilon``        the noise :math:`\hat\varepsilon`
``sample``         the clean data :math:`\hat x_1` (an EDM denoiser :math:`D(x;\sigma)`)
``v_prediction``   Salimans–Ho's :math:`\hat v = a_\tau\hat\varepsilon - g_\tau\hat x_1`
``velocity``       its own ODE velocity :math:`\hat u = \dot a_\tau \hat x_1 + \dot g_\tau\hat\varepsilon`
``score``          :math:`\hat s = \nabla\log p_\tau(x_\tau) = -\hat\varepsilon/g_\tau`
=================  =====================================================================

The student follows flowmap's path :math:`x_t = \alpha_t x_1 + \sigma_t x_0` (:math:`t = 0` noise,
:math:`t = 1` data). Both paths carry the same marginals up to a scale, so for a student time
:math:`t`:

1. the native time with the same signal-to-noise ratio,
   :math:`\tau = \lambda^{-1}(\log\alpha_t - \log\sigma_t)` with :math:`\lambda(\tau) = \log(a_\tau/g_\tau)`;
2. the point rescaled between the two paths, :math:`x_\tau = r\,x`, :math:`r = g_\tau/\sigma_t = a_\tau/\alpha_t`;
3. the prediction converted to data and noise, each linear given :math:`(a_\tau, g_\tau)`:

   .. math::
      \text{epsilon: } \hat x_1 = (x_\tau - g\hat\varepsilon)/a; \quad
      \text{sample: } \hat\varepsilon = (x_\tau - a\hat x_1)/g; \quad
      \text{score: } \hat\varepsilon = -g\hat s;

      \text{v: } \hat x_1 = \frac{a x_\tau - g\hat v}{a^2 + g^2},\ \hat\varepsilon = \frac{g x_\tau + a\hat v}{a^2+g^2};
      \quad
      \text{velocity: } \hat x_1 = \frac{\dot g x_\tau - g\hat u}{a\dot g - g\dot a},\
      \hat\varepsilon = \frac{a\hat u - \dot a x_\tau}{a\dot g - g\dot a};

4. the student's velocity :math:`b_t(x) = \dot\alpha_t\hat x_1 + \dot\sigma_t\hat\varepsilon`.

Since :math:`(\hat x_1, \hat\varepsilon)` do not depend on the path, a diffusion model and its
converted velocity share one ODE: DDIM's step :math:`x_{\tau'} = a_{\tau'}\hat x_1 + g_{\tau'}\hat\varepsilon`
is, rescaled, the Euler step of :math:`b` on the linear path between the matching student times
(:mod:`flowmap.teachers.ddim`). The conversion runs in float64; the model in its own dtype. It is
FastGen's ``convert_model_output`` (the data estimate as the pivot) combined with the time change
of Meta flow_matching's ``ScheduleTransformedModel`` (SNR matching and rescaling), in one step.

A schedule whose SNR stops short of the student's (a discrete DDPM schedule never reaches pure
noise or clean data; EDM runs from :math:`\sigma_{min}` to :math:`\sigma_{max}`) does not cover
:math:`t` near 0 or 1. That is an error unless ``clip=True``: then a student time beyond an end is
evaluated at that end's :math:`\tau` (with :math:`x_\tau = r x`, :math:`r = g_\tau/\sigma_t` near
noise and :math:`a_\tau/\alpha_t` near data), as DDPM and DDIM samplers start from pure noise at
their last step (:func:`~flowmap.teachers.schedules.check_coverage`).

The teacher's jobs, each with one owner: the schedules and their log-SNR (:mod:`flowmap.paths`,
:mod:`flowmap.teachers.schedules`), the prediction converter (:func:`flowmap.paths.data_and_noise`),
coverage (:func:`~flowmap.teachers.schedules.check_coverage`), DDIM (:mod:`flowmap.teachers.ddim`);
here the time change, the rescaling, the model call and its labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.conditioning import Conditioning, guided_velocity
from flowmap.ode import FIXED_STEP_METHODS, solve_at_cost
from flowmap.paths import (
    AffinePath,
    Schedule,
    as_path,
    as_time,
    check_prediction,
    data_and_noise,
    expand_like,
)
from flowmap.protocols import Solution
from flowmap.teachers import ddim as _ddim
from flowmap.teachers.schedules import check_coverage, resolve_schedule, schedule_identity

__all__ = ["DiffusionTeacher", "EDMDenoiser"]

_F64 = torch.float64


def _as_output(out: Any) -> Tensor:
    """A model's tensor output (diffusers models return a tuple or an object with ``.sample``)."""
    if isinstance(out, tuple | list):
        out = out[0]
    return getattr(out, "sample", out)


class DiffusionTeacher(nn.Module):
    r"""A model ``model(x_τ, τ)`` with its own schedule and prediction, as flowmap's velocity
    :math:`b_t(x)` on ``path`` (the module docstring's conversion). A
    :class:`~flowmap.protocols.Velocity` and a :class:`~flowmap.protocols.Sampler` (the fixed-step
    solvers, ``dopri5`` and ``ddim``), so every loss, preset, sampler and report takes it.

    Args:
        model: any callable ``model(x, tau, **labels)`` taking a batch and a ``(B,)`` tensor of its
            own times; an ``nn.Module`` is held (frozen, in eval mode) as a submodule.
        prediction: ``"epsilon"``, ``"sample"``, ``"v_prediction"``, ``"velocity"`` or ``"score"``.
        schedule: a named schedule (:data:`~flowmap.teachers.schedules.SCHEDULES`) or a
            :class:`~flowmap.paths.Schedule`; or give ``alpha`` and ``sigma``.
        alpha, sigma: the model's path :math:`x_\tau = \alpha(\tau)\,\mathrm{data} + \sigma(\tau)\,
            \mathrm{noise}` as functions of a float64 tensor (the direction of time is read from them).
        schedule_args: keyword arguments of a named schedule (e.g. ``num_train_timesteps``).
        tau_range: the model's valid times ``(low, high)`` (default: the schedule's).
        path: the student's path (``"linear"`` or ``"cosine"``).
        clip: evaluate student times beyond the schedule's SNR range at its nearest end.
        integer_timesteps: round :math:`\tau` to whole steps (default: no; a diffusers model takes
            fractional timesteps, so the SNR matches exactly).
        num_classes, null_class, label_keyword: a class-conditional model takes its labels as
            ``model(x, tau, **{label_keyword: y})``; flowmap's null label −1 becomes ``null_class``.
        learned_variance: the model returns twice the channels (mean and variance, DiT's
            ``learn_sigma``); keep the first half.
        data_shape: the shape of one sample, if known (reports and ``flowmap sample`` use it).
        timestep_scale: the model is called at ``timestep_scale * τ`` (diffusers' flow-matching
            models take ``1000 σ`` but predict :math:`d x/d\sigma`: ``rectified_flow`` with 1000).
    """

    methods = (*FIXED_STEP_METHODS, "dopri5", "ddim")

    def __init__(
        self,
        model: Callable[..., Any],
        prediction: str,
        schedule: str | Schedule | None = None,
        alpha: Callable[[Tensor], Tensor] | None = None,
        sigma: Callable[[Tensor], Tensor] | None = None,
        schedule_args: Mapping[str, Any] | None = None,
        tau_range: tuple[float, float] | None = None,
        path: str | AffinePath = "linear",
        clip: bool = False,
        integer_timesteps: bool = False,
        num_classes: int | None = None,
        null_class: int | None = None,
        label_keyword: str = "y",
        learned_variance: bool = False,
        data_shape: tuple[int, ...] | None = None,
        timestep_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.prediction = check_prediction(prediction)
        self.schedule, self.tau_noise, self.tau_data = resolve_schedule(
            schedule, alpha, sigma, schedule_args, tau_range
        )
        if isinstance(model, nn.Module):
            model.eval().requires_grad_(False)
        self.model = model
        self.path = as_path(path)
        self.clip, self.integer_timesteps = bool(clip), bool(integer_timesteps)
        self.num_classes, self.null_class = num_classes, null_class
        self.conditioning = Conditioning(num_classes)
        self.label_keyword, self.learned_variance = label_keyword, bool(learned_variance)
        self.data_shape = None if data_shape is None else tuple(int(d) for d in data_shape)
        self.timestep_scale = float(timestep_scale)
        ends = torch.tensor([self.tau_noise, self.tau_data], dtype=_F64)
        self.log_snr_range = tuple(self.schedule.log_snr(ends).tolist())
        check_coverage(
            self.schedule,
            self.prediction,
            self.path.schedule,
            self.tau_noise,
            self.tau_data,
            self.clip,
        )

    # ----------------------------------------------------------------- the time change
    def student_time(self, log_snr: Tensor) -> Tensor:
        r"""The student's time :math:`t` with :math:`\log(\alpha_t/\sigma_t)` = ``log_snr`` (float64)."""
        return self.path.schedule.log_snr_inverse(log_snr.to(_F64))

    def native_time(self, t: Tensor) -> Tensor:
        r"""The model's time :math:`\tau` with the same SNR as student time ``t`` (clipped to the
        schedule's range when ``clip``; rounded when ``integer_timesteps``)."""
        lam = self.path.schedule.log_snr(t.to(_F64)).clamp(*self.log_snr_range)
        tau = self.schedule.log_snr_inverse(lam)
        lo, hi = sorted((self.tau_noise, self.tau_data))
        return self.whole_steps(tau.clamp(lo, hi))

    def whole_steps(self, tau: Tensor) -> Tensor:
        """``tau`` at the model's whole timesteps (``timestep_scale * τ`` rounded) when
        ``integer_timesteps``, else unchanged."""
        if not self.integer_timesteps:
            return tau
        return (tau * self.timestep_scale).round() / self.timestep_scale

    # ----------------------------------------------------------------- the model
    def _predict(
        self,
        x_tau: Tensor,
        tau: Tensor,
        dtype: torch.dtype,
        model: Callable[..., Any] | None = None,
        **labels: Tensor,
    ) -> Tensor:
        """The raw prediction of ``model`` (default: the teacher's) at float64 ``x_tau`` and times
        ``tau`` (run in ``dtype``)."""
        steps = tau * self.timestep_scale
        if self.integer_timesteps:
            steps = steps.round().long()
        else:  # float32 at least: bf16 would turn step 999 into 1000
            steps = steps.to(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
        if labels:
            labels = {self.label_keyword: labels["y"]}
        out = _as_output((self.model if model is None else model)(x_tau.to(dtype), steps, **labels))
        if not isinstance(out, Tensor):
            raise ValueError(
                f"The teacher's model returned a {type(out).__name__}, not a tensor; wrap it so "
                "that model(x, tau) returns its prediction."
            )
        if self.learned_variance and out.ndim == x_tau.ndim and out.shape[1] == 2 * x_tau.shape[1]:
            out = out[:, : x_tau.shape[1]]
        if out.shape != x_tau.shape:
            hint = (
                " (twice the channels: a model that also predicts its variance needs "
                "learned_variance=True)"
                if out.ndim == x_tau.ndim and out.shape[1] == 2 * x_tau.shape[1]
                else ""
            )
            raise ValueError(
                f"The teacher's model returned shape {list(out.shape)} for input "
                f"{list(x_tau.shape)}; a {self.prediction} prediction must have its input's "
                f"shape{hint}."
            )
        return out.to(_F64)

    def data_and_noise(self, out: Tensor, x_tau: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        r"""The model's :math:`(\hat x_1, \hat\varepsilon)` from its prediction ``out`` at
        :math:`(x_\tau, \tau)` (:func:`flowmap.paths.data_and_noise`)."""
        a, g = (expand_like(c, x_tau) for c in self.schedule.coefficients(tau))
        da = dg = None
        if self.prediction == "velocity":
            da, dg = (expand_like(c, x_tau) for c in self.schedule.derivatives(tau))
        return data_and_noise(self.prediction, out, x_tau, a, g, da, dg)

    def rescale(self, t: Tensor, tau: Tensor, x: Tensor) -> Tensor:
        r""":math:`r` with :math:`x_\tau = r x`: :math:`g_\tau/\sigma_t` nearer noise,
        :math:`a_\tau/\alpha_t` nearer data."""
        c = self.path.schedule(t.to(_F64))
        a, g = self.schedule.coefficients(tau)
        r = torch.where(c.sigma >= c.alpha, g / c.sigma, a / c.alpha)
        return expand_like(r, x)

    def _velocity(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, model: Callable[..., Any] | None = None
    ) -> Tensor:
        # torchdiffeq's dopri5 probes a little past its end time; outside [0, 1] there is no
        # path, so such a time is evaluated at the nearest end
        t = as_time(t, x).to(_F64).clamp(0.0, 1.0)
        tau = self.native_time(t)
        x64 = x.to(_F64)
        x_tau = self.rescale(t, tau, x64) * x64
        labels = {} if y is None else {"y": self._model_labels(y)}
        x1, eps = self.data_and_noise(
            self._predict(x_tau, tau, x.dtype, model, **labels), x_tau, tau
        )
        c = self.path.schedule(t)
        b = expand_like(c.d_alpha, x64) * x1 + expand_like(c.d_sigma, x64) * eps
        return b.to(x.dtype)

    def _model_labels(self, y: Tensor) -> Tensor:
        """Labels in the model's numbering: label -1 becomes its ``null_class``."""
        return self.conditioning.relabel(y, self.null_class, "teacher's model")

    def forward(
        self, x: Tensor, t: Tensor | float, y: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor:
        r""":math:`b_t(x)` on the student's path (:math:`b^w_t(x \mid y)` for a class-conditional model)."""
        y, w = self.conditioning.check(y, w, x.shape[0], x.device, "teacher")
        if y is None:
            return self._velocity(x, t)
        return guided_velocity(self._velocity, x, as_time(t, x), y, w)

    velocity = forward

    # ----------------------------------------------------------------- sampling
    def ddim_times(self, nfe: int) -> tuple[Tensor, Tensor]:
        """DDIM's model times and student grid (:func:`flowmap.teachers.ddim.ddim_times`)."""
        return _ddim.ddim_times(self, nfe)

    def ddim(self, x0: Tensor, nfe: int, cond: Mapping[str, Tensor] | None = None) -> Solution:
        """Deterministic DDIM from noise ``x0`` (:func:`flowmap.teachers.ddim.ddim`)."""
        return _ddim.ddim(self, x0, nfe, cond)

    @torch.no_grad()
    def generate(
        self,
        x0: Tensor,
        nfe: int | None = None,
        method: str | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        y: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Solution:
        """Samples from noise ``x0``: a fixed-step ``method`` (default Euler) or ``"ddim"`` at
        ``nfe``, or ``"dopri5"`` (adaptive; the NFE used is returned)."""
        method = method or "euler"
        if method not in self.methods:
            raise ValueError(f"Unknown method {method!r}; choose one of {list(self.methods)}.")
        y, w = self.conditioning.check(y, guidance, x0.shape[0], x0.device, "teacher")
        cond = {k: v for k, v in (("y", y), ("w", w)) if v is not None}
        cost = self.conditioning.cost(w)
        if method != "ddim":
            return solve_at_cost(self, x0, method, nfe, cost=cost, rtol=rtol, atol=atol, cond=cond)
        if nfe is None or int(nfe) < 1 or int(nfe) % cost:
            raise ValueError(
                f"DDIM at {cost} NFE per step cannot take NFE {nfe}; ask for a positive multiple."
            )
        return _ddim.ddim(self, x0, int(nfe) // cost, cond)

    def identity_facts(self) -> dict[str, Any]:
        """What defines this teacher besides its weights (a report compares it by these)."""
        lo, hi = sorted((self.tau_noise, self.tau_data))
        return {  # an nn.Module's repr is its architecture and settings (EDM's sigma_data …)
            "model": repr(self.model)
            if isinstance(self.model, nn.Module)
            else type(self.model).__name__,
            "prediction": self.prediction,
            "schedule": schedule_identity(self.schedule, lo, hi),
            "log_snr_range": [round(v, 12) for v in self.log_snr_range],
            "labels": [self.null_class, self.label_keyword],
            "path": self.path.name,
            "clip": self.clip,
            "integer_timesteps": self.integer_timesteps,
            "timestep_scale": self.timestep_scale,
            "learned_variance": self.learned_variance,
            "num_classes": self.num_classes,
        }

    def extra_repr(self) -> str:
        return (
            f"prediction={self.prediction!r}, schedule={self.schedule!r}, "
            f"path={self.path.name!r}, clip={self.clip}"
        )


class EDMDenoiser(nn.Module):
    r"""Karras et al.'s preconditioning of a raw network :math:`F`:
    :math:`D(x;\sigma) = c_{skip}(\sigma)\,x + c_{out}(\sigma)\,F(c_{in}(\sigma)\,x;\ c_{noise}(\sigma))`
    with :math:`c_{skip} = \sigma_d^2/(\sigma^2+\sigma_d^2)`,
    :math:`c_{out} = \sigma\sigma_d/\sqrt{\sigma^2+\sigma_d^2}`,
    :math:`c_{in} = 1/\sqrt{\sigma^2+\sigma_d^2}`, :math:`c_{noise} = \tfrac14\log\sigma`.
    A ``"sample"`` prediction on the ``"edm"`` schedule (``x = x_1 + σ ε``)."""

    def __init__(self, net: Callable[..., Tensor], sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net, self.sigma_data = net, float(sigma_data)

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}"

    def forward(self, x: Tensor, sigma: Tensor, **labels: Tensor) -> Tensor:
        s = expand_like(sigma, x).to(x.dtype)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        c_noise = sigma.to(x.dtype).log() / 4
        return c_skip * x + c_out * _as_output(self.net(c_in * x, c_noise, **labels))
