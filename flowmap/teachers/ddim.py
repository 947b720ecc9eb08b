r"""DDIM, the deterministic sampler of a diffusion model, in the model's own variables.

For a :class:`~flowmap.teachers.DiffusionTeacher` with schedule :math:`(a_\tau, g_\tau)`, from
:math:`x_{\tau_0} = r\,x_0` each step is

.. math:: x_{\tau_{k+1}} = a_{\tau_{k+1}}\hat x_1 + g_{\tau_{k+1}}\hat\varepsilon,
   \qquad (\hat x_1, \hat\varepsilon) \text{ from the prediction at } (x_{\tau_k}, \tau_k),

and the sample is the last step's :math:`\hat x_1`. Since :math:`(\hat x_1, \hat\varepsilon)` do not
depend on the path, this is, rescaled, the Euler step of the converted velocity :math:`b` on the
linear student path between the matching student times (:func:`ddim_times`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flowmap.conditioning import guidance_cost, guided_velocity
from flowmap.protocols import Solution

#: ``teacher`` below is a :class:`~flowmap.teachers.DiffusionTeacher` (which calls this module:
#: named, not imported, so the two do not import each other)
DiffusionTeacher = Any

__all__ = ["ddim", "ddim_times"]

_F64 = torch.float64


def ddim_times(teacher: DiffusionTeacher, nfe: int) -> tuple[Tensor, Tensor]:
    r"""DDIM's ``nfe`` model times :math:`\tau_k`, evenly spaced from the noisy end (diffusers'
    ``"trailing"`` spacing; whole steps for a discrete schedule), and the matching student grid
    :math:`t_0 < \dots < t_{N-1} < t_N = 1` (float64)."""
    n = int(nfe)
    if n < 1:
        raise ValueError(f"DDIM needs at least 1 step, got {nfe}.")
    k = torch.arange(n, dtype=_F64)
    schedule, tau_noise, tau_data = teacher.schedule, teacher.tau_noise, teacher.tau_data
    if schedule.discrete:  # diffusers: round(arange(T, 0, -T/n)) - 1 over the range
        lo, hi = sorted((tau_noise, tau_data))
        T = hi - lo + 1
        if n > T:
            raise ValueError(
                f"DDIM cannot take {n} steps on a schedule of {T:g} timesteps; ask for at "
                f"most {T:g}."
            )
        taus = lo + torch.round(T - k * T / n) - 1
    else:
        taus = teacher.whole_steps(tau_noise + (tau_data - tau_noise) * k / n)
    times = teacher.student_time(schedule.log_snr(taus))
    return taus, torch.cat([times, torch.ones(1, dtype=_F64)])


@torch.no_grad()
def ddim(
    teacher: DiffusionTeacher, x0: Tensor, nfe: int, cond: Mapping[str, Tensor] | None = None
) -> Solution:
    r"""Deterministic DDIM from noise ``x0`` (the student's :math:`x` at :math:`t_0`) in ``nfe``
    steps (module docstring); a guided step (``cond`` with ``y`` and ``w``) guides the
    prediction, which the conversion is linear in, so it is :math:`b^w`."""
    taus, times = ddim_times(teacher, nfe)
    cond = {k: v for k, v in (cond or {}).items() if v is not None}
    x = x0.to(_F64)
    tau0 = taus[:1].expand(x.shape[0])
    x_tau = teacher.rescale(times[:1].expand(x.shape[0]), tau0, x) * x
    for i in range(len(taus)):
        tau = taus[i : i + 1].expand(x.shape[0]).to(x.device)
        if cond:

            def f(xt: Tensor, tt: Tensor, y: Tensor) -> Tensor:
                return teacher._predict(xt, tt, x0.dtype, y=teacher._model_labels(y))

            out = guided_velocity(f, x_tau, tau, cond["y"], cond.get("w"))
        else:
            out = teacher._predict(x_tau, tau, x0.dtype)
        x1, eps = teacher.data_and_noise(out, x_tau, tau)
        if i + 1 < len(taus):
            a, g = teacher.schedule.coefficients(taus[i + 1 : i + 2].to(x.device))
            x_tau = a * x1 + g * eps
    cost = guidance_cost(cond.get("w")) if cond else 1
    return Solution(x1.to(x0.dtype), len(taus) * cost)
