r"""Eulerian map distillation (EMD / ESD): move the start time.

.. math:: r_E = \partial_s X(s,t,x_s) + \nabla_x X(s,t,x_s)\,b_s(x_s)
              = b_s - \phi + (t-s)\,D\phi,\qquad D = \partial_s + b_s\cdot\nabla_x,

i.e. :math:`X(s,t,\cdot)` is constant along the teacher's flow in :math:`s`. Forms (``form``):

* ``"discrete"`` (default; consistency distillation with a two-time map) — the teacher moves the
  start time a share :math:`\delta` of the jump, the map does the rest:
  :math:`\phi(x_s,s,t) \leftarrow \mathrm{sg}\big[(X(u,t,\hat x_u) - x_s)/(t-s)\big]` with
  :math:`u = s + \delta(t-s)` and :math:`\hat x_u` ``teacher_steps`` Heun steps of :math:`b` from
  :math:`x_s`. Then :math:`\mathrm{target} - \phi = \delta\,r_E + O(\delta^2)`: as :math:`\delta \to 0`
  it is the regression form below (the LSD paper's App. C.1). No JVP. A finite :math:`\delta`
  carries information from the diagonal a finite distance per update instead of an
  infinitesimal one: distilling an exact mixture teacher it reached 6.0% of the data radius at one
  jump where the regression form was at 28.6% (``benchmarks/results/exact-teacher``). The map
  inherits the error of the teacher's step, so the teacher moves at most ``teacher_max_gap``
  (default 0.125) on long jumps, as consistency distillation's fixed teacher step does;
* ``"regression"`` (MeanFlow, AYF, sCM) —
  :math:`\phi \leftarrow \mathrm{sg}[b_s + r(k)\,(t-s)\,D\phi]`, one JVP in :math:`(s, x)` with tangent
  :math:`(1, b_s)`, a semigradient that needs no second-order autodiff. Its fixed point is the flow
  map and nothing else, but it converges slowly (a fixed-point iteration along characteristics),
  and it needs smooth time features: with sinusoidal features up to 100 rad it stalled at 28.6%,
  with 10 rad it reached 6.1%;
* ``"full"`` — :math:`\|r_E\|^2` with gradients through the whole JVP (Flow Map Matching's convex
  objective). Fast at first, then it drifts (9% of the data radius at step 500, 50% at step
  3000): its gradient can also shrink :math:`\nabla_x X`, flattening the map away from the
  diagonal, which the stop-gradient forbids. Unstable on images (spatial Jacobian);
* ``"sg_advective"`` — :math:`\|\partial_s X + \mathrm{sg}(\nabla_x X\,b_s)\|^2`, gradients through
  :math:`\partial_s X` only (Boffi's ESD stop-gradient; two JVPs).

Stabilisers of the JVP forms: tangent normalisation :math:`g/(\|g\| + c)` (``tangent_norm=c``,
regression form) and tangent warm-up :math:`r(k) = \min(1, k/H)` on the :math:`(t-s)D\phi` term
(``tangent_warmup_steps=H``). Adaptive weighting lives in :class:`~flowmap.losses.LossWeighting`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowmap.conditioning import Condition
from flowmap.flowmap import FlowMap, JVPMethod
from flowmap.losses.base import FlowMapLoss, chord_slope, mean_square, regression_loss
from flowmap.losses.pairs import TimePairSampler
from flowmap.losses.weighting import LossWeighting
from flowmap.ode import solve_between
from flowmap.paths import expand_like
from flowmap.protocols import Velocity

__all__ = [
    "eulerian_residual",
    "discrete_eulerian_target",
    "tangent_warmup",
    "EulerianLoss",
]

FORMS = ("discrete", "regression", "full", "sg_advective")


def eulerian_residual(
    flow_map: FlowMap,
    direction: Velocity | Tensor,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    warmup: float = 1.0,
    *,
    velocity: Tensor | None = None,
    cond: Condition | None = None,
    method: JVPMethod | None = None,
    tangent_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""Return :math:`(r, \phi)` with :math:`r = \phi - v - w\,(t-s)D\phi`,
    :math:`D = \partial_s + b\cdot\nabla_x` the derivative along the direction :math:`b`
    (:math:`r = -r_E` when :math:`b = v = b_s` and :math:`w = 1`).

    ``direction`` is the teacher velocity :math:`b` or its values :math:`b_s(x_s)`; ``velocity``
    is the :math:`v` of the target (default :math:`b`). MeanFlow passes the conditional velocity
    :math:`\dot x_s` as both (improved MeanFlow: as :math:`v` only): :math:`r` is affine in
    :math:`\dot x_s`, so its conditional mean is the residual with
    :math:`b_s = E[\dot x_s \mid x_s]`. The JVP (``method``) differentiates in :math:`(x, s)` only, never in
    the conditioning ``cond``; without ``tangent_grad`` :math:`r` carries no gradient through
    :math:`D\phi`.
    """
    cond = cond or {}
    b = (direction if isinstance(direction, Tensor) else direction(x_s, s, **cond)).detach()
    one = s.new_ones(s.shape)
    j = flow_map.jvp(x_s, s, t, dx=b, ds=one, method=method, tangent_grad=tangent_grad, **cond)
    gap = expand_like(t - s, x_s).to(j.phi.dtype)
    v = b if velocity is None else velocity.detach().to(j.phi.dtype)
    return j.phi - v - warmup * gap * j.dphi, j.phi


def tangent_warmup(step: int, steps: int) -> float:
    r"""Tangent warm-up factor :math:`r(k) = \min(1, k/H)` (sCM; 1 when :math:`H` = ``steps`` is 0)."""
    if steps <= 0:
        return 1.0
    return min(1.0, step / steps)


@torch.no_grad()
def discrete_eulerian_target(
    flow_map: FlowMap,
    teacher: Velocity,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    share: float = 0.5,
    steps: int = 1,
    max_gap: float | None = None,
    cond: Condition | None = None,
) -> Tensor:
    r"""Target of the discrete Eulerian form: the teacher moves the start time to
    :math:`u = s + \delta\,(t-s)` (:math:`\delta` = ``share``), the map does the rest,

    .. math:: \phi(x_s,s,t) \leftarrow \mathrm{sg}\Big[\frac{X(u,t,\hat x_u) - x_s}{t-s}\Big],\qquad
              \hat x_u = \mathrm{ODE}_{s\to u}[b](x_s)\ (\text{Heun}).

    With ``max_gap`` :math:`\Delta`, the teacher moves at most :math:`\Delta`:
    :math:`u = s + \mathrm{clip}(\delta(t-s), -\Delta, \Delta)` (consistency distillation's fixed
    teacher step, for the long jumps), so its Heun step never exceeds :math:`\Delta/`\ ``steps``.
    """
    move = share * (t - s)
    if max_gap is not None:
        move = move.clamp(-max_gap, max_gap)
    u = s + move
    cond = cond or {}
    x_u = solve_between(teacher, x_s, s, u, steps=steps, method="heun", cond=cond).x
    return chord_slope(x_s, flow_map(x_u, u, t, **cond), s, t, teacher, cond)


class EulerianLoss(FlowMapLoss):
    r"""Eulerian loss: the map is constant along the teacher's flow in its start point,
    :math:`\partial_s X + (\nabla_x X)\, b_s = 0`, in a discrete (default) or JVP form.

    Args:
        form: ``"discrete"`` (default), ``"regression"``, ``"full"`` or ``"sg_advective"``.
        tangent_norm: normalisation constant :math:`c` (regression form), or ``None``.
        tangent_warmup_steps: :math:`H` of the tangent warm-up (0: none).
        teacher_share: :math:`\delta`, the share of each jump the teacher covers (discrete form).
            Default 0.5 with ``teacher_steps=1``: 6.0% at one jump against 6.8% for 0.25 and
            5.6% for 0.75 with 2 steps, differences within one seed's spread.
        teacher_steps: Heun steps of the teacher over that share (discrete form).
        teacher_max_gap: the longest time the teacher covers, :math:`\Delta` (discrete form;
            ``None``: no cap). Default 0.125: one Heun step of a *trained* teacher over half of a
            long jump is biased, and the map learns the bias. Capping the teacher's move at 0.125
            took the toy checkerboard's one-jump W2 from 1.39 ± 0.15× to 0.99 ± 0.03× the
            teacher's adaptive solve (mean endpoint distance 0.23 → 0.06) and the digits one-step
            FID from 48.5 to 29.3 (training check, 2000 samples) at the same cost; on the exact
            mixture teacher one jump went 2.8% → 2.5% of the radius, two jumps 2.3% → 3.2%.
        pairs: the time-pair sampler (:class:`~flowmap.losses.TimePairSampler`).
        weighting: the per-pair weighting (:class:`~flowmap.losses.LossWeighting`).
        jvp: how the JVP forms take :math:`D\phi` (:class:`~flowmap.flowmap.JVPMethod`); the full
            and sg_advective forms need autodiff.
    """

    name = "eulerian"

    def __init__(
        self,
        form: Literal["discrete", "regression", "full", "sg_advective"] = "discrete",
        tangent_norm: float | None = None,
        tangent_warmup_steps: int = 0,
        teacher_share: float = 0.5,
        teacher_steps: int = 1,
        teacher_max_gap: float | None = 0.125,
        pairs: TimePairSampler | None = None,
        weighting: LossWeighting | None = None,
        jvp: JVPMethod | None = None,
    ) -> None:
        super().__init__(pairs, weighting)
        if form not in FORMS:
            raise ValueError(f"Unknown Eulerian form {form!r}; choose one of {list(FORMS)}.")
        if not 0.0 < teacher_share <= 1.0:
            raise ValueError(f"teacher_share must lie in (0, 1], got {teacher_share}.")
        if teacher_steps < 1:
            raise ValueError(f"teacher_steps must be at least 1, got {teacher_steps}.")
        if teacher_max_gap is not None and not 0.0 < teacher_max_gap <= 1.0:
            raise ValueError(
                f"teacher_max_gap must lie in (0, 1] or be None, got {teacher_max_gap}."
            )
        self.form, self.tangent_norm = form, tangent_norm
        self.tangent_warmup_steps = tangent_warmup_steps
        self.teacher_share, self.teacher_steps = teacher_share, teacher_steps
        self.teacher_max_gap = teacher_max_gap
        self.jvp = self._jvp_method(jvp, through_tangent=form in ("full", "sg_advective"))

    @property
    def autodiff_jvp(self) -> bool:
        """The discrete form takes no JVP."""
        return self.form != "discrete" and super().autodiff_jvp

    def off_diagonal(
        self,
        flow_map: FlowMap,
        teacher: Velocity,
        x_s: Tensor,
        s: Tensor,
        t: Tensor,
        step: int,
        dx_s: Tensor,
        cond: Condition | None = None,
    ) -> Tensor:
        cond = cond or {}
        if self.form == "discrete":
            target = discrete_eulerian_target(
                flow_map,
                teacher,
                x_s,
                s,
                t,
                share=self.teacher_share,
                steps=self.teacher_steps,
                max_gap=self.teacher_max_gap,
                cond=cond,
            )
            return mean_square(flow_map.phi(x_s, s, t, **cond) - target)
        if self.form == "sg_advective":
            d_s_X = flow_map.jvp(
                x_s, s, t, ds=s.new_ones(s.shape), method=self.jvp, **cond
            ).dX  # -φ + (t-s) ∂_s φ
            with torch.no_grad():
                b = teacher(x_s, s, **cond)
                advective = flow_map.jvp(x_s, s, t, dx=b, method=self.jvp, **cond).dX  # ∇_x X · b_s
            return mean_square(d_s_X + advective)
        warmup = tangent_warmup(step, self.tangent_warmup_steps)
        full = self.form == "full"
        r, phi = eulerian_residual(
            flow_map, teacher, x_s, s, t, warmup, cond=cond, method=self.jvp, tangent_grad=full
        )
        if self.form == "full":
            return mean_square(r)
        return regression_loss(phi, r, self.tangent_norm)
