r"""Semigroup (progressive) flow-map loss: :math:`X(s,t,x) = X(u,t,X(s,u,x))` for :math:`u` between.

With :math:`u = \gamma s + (1-\gamma)t` the law reads
:math:`\phi(x,s,t) = (1-\gamma)\,\phi(x,s,u) + \gamma\,\phi(X(s,u,x),u,t)`, and the loss regresses

.. math:: \phi(x_s,s,t) \leftarrow \mathrm{sg}\big[(1-\gamma)\phi(x_s,s,u) + \gamma\,\phi(X(s,u,x_s),u,t)\big],

:math:`\gamma = 1/2` (``"midpoint"``, shortcut-style) or :math:`\gamma \sim U[0,1]` (``"uniform"``).
No JVP. Short jumps :math:`|t-s| \le \delta` take their target from the teacher instead,
:math:`\phi \leftarrow (\mathrm{ODE}_{s\to t}[b](x_s) - x_s)/(t-s)` with ``teacher_steps`` Heun steps.
A curriculum on the gap lives in the shared :class:`~flowmap.losses.pairs.TimePairSampler`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowmap.conditioning import Condition, rows
from flowmap.flowmap import FlowMap
from flowmap.losses.base import FlowMapLoss, chord_slope, mean_square
from flowmap.losses.pairs import TimePairSampler
from flowmap.losses.weighting import LossWeighting
from flowmap.ode import solve_between
from flowmap.paths import expand_like
from flowmap.protocols import Velocity

__all__ = ["semigroup_target", "semigroup_residual", "SemigroupLoss"]

SPLITS = ("midpoint", "uniform")


@torch.no_grad()
def semigroup_target(
    flow_map: FlowMap,
    teacher: Velocity,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    gamma: Tensor,
    teacher_gap: float = 0.0,
    teacher_steps: int = 2,
    cond: Condition | None = None,
) -> Tensor:
    r"""The stop-gradient target for :math:`\phi(x_s, s, t)`: the student's composed jump, or the
    teacher's solve for rows with :math:`|t - s| \le` ``teacher_gap``."""
    cond = cond or {}
    u = gamma * s + (1 - gamma) * t
    g = expand_like(gamma, x_s).to(x_s.dtype)
    phi_su = flow_map.phi(x_s, s, u, **cond)
    x_u = x_s + expand_like(u - s, x_s).to(x_s.dtype) * phi_su
    target = (1 - g) * phi_su + g * flow_map.phi(x_u, u, t, **cond)
    short = (t - s).abs() <= teacher_gap
    if short.any():
        xs, ss, ts, cs = x_s[short], s[short], t[short], rows(cond, short)
        end = solve_between(teacher, xs, ss, ts, steps=teacher_steps, method="heun", cond=cs).x
        target[short] = chord_slope(xs, end, ss, ts, teacher, cs)
    return target


def semigroup_residual(
    flow_map: FlowMap, teacher: Velocity, x_s: Tensor, s: Tensor, t: Tensor, **kw
) -> tuple[Tensor, Tensor]:
    r"""Return :math:`(\phi - \mathrm{sg}[\mathrm{target}], \phi)`; see :func:`semigroup_target`."""
    phi = flow_map.phi(x_s, s, t, **(kw.get("cond") or {}))
    return phi - semigroup_target(flow_map, teacher, x_s, s, t, **kw), phi


class SemigroupLoss(FlowMapLoss):
    """Semigroup loss with a midpoint or uniform split and teacher targets on short jumps.

    Args:
        split: ``"midpoint"`` (:math:`\\gamma = 1/2`) or ``"uniform"`` (:math:`\\gamma \\sim U[0, 1]`).
        teacher_gap: :math:`\\delta`: jumps with :math:`|t - s| \\le \\delta` take the teacher's target.
        teacher_steps: Heun steps of the teacher's target. Default (0.25, 2): distilling an exact
            mixture teacher, 2 steps gave the one-jump error of 4 (7.6% vs 7.8% of the data
            radius) at 2.1× the cost of a CFM step instead of 2.9×; a horizon of 0.125 or 0.5
            did not change it either (``benchmarks/results/exact-teacher``, ``throughput``).
        pairs: the time-pair sampler (:class:`~flowmap.losses.TimePairSampler`).
        weighting: the per-pair weighting (:class:`~flowmap.losses.LossWeighting`).
    """

    name = "semigroup"

    def __init__(
        self,
        split: Literal["midpoint", "uniform"] = "midpoint",
        teacher_gap: float = 0.25,
        teacher_steps: int = 2,
        pairs: TimePairSampler | None = None,
        weighting: LossWeighting | None = None,
    ) -> None:
        super().__init__(pairs, weighting)
        if split not in SPLITS:
            raise ValueError(f"Unknown semigroup split {split!r}; choose one of {list(SPLITS)}.")
        if teacher_steps < 1:
            raise ValueError(f"teacher_steps must be at least 1, got {teacher_steps}.")
        self.split, self.teacher_gap, self.teacher_steps = split, teacher_gap, teacher_steps

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
        gamma = torch.full_like(s, 0.5) if self.split == "midpoint" else torch.rand_like(s)
        r, _ = semigroup_residual(
            flow_map,
            teacher,
            x_s,
            s,
            t,
            gamma=gamma,
            teacher_gap=self.teacher_gap,
            teacher_steps=self.teacher_steps,
            cond=cond,
        )
        return mean_square(r)
