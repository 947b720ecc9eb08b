r"""Lagrangian map distillation (LMD / LSD): move the end time.

.. math:: r_L = \partial_t X(s,t,x_s) - b_t(\mathrm{sg}\,X(s,t,x_s))
              = \phi + (t-s)\,\partial_t\phi - b_t(\mathrm{sg}\,X).

:math:`\partial_t X` comes from one JVP in :math:`t` (tangent 1) that also returns :math:`X`. Two forms:

* ``"backprop"`` — :math:`\|r_L\|^2`, gradients through the JVP output (the paper's; default);
* ``"regression"`` — :math:`\phi(x_s,s,t) \leftarrow \mathrm{sg}[b_t(X) - (t-s)\,\partial_t\phi]`, no
  second-order autodiff.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from flowmap.conditioning import Condition
from flowmap.flowmap import FlowMap, JVPMethod
from flowmap.losses.base import FlowMapLoss, mean_square, regression_loss
from flowmap.losses.pairs import TimePairSampler
from flowmap.losses.weighting import LossWeighting
from flowmap.protocols import Velocity

__all__ = ["lagrangian_residual", "LagrangianLoss"]


def lagrangian_residual(
    flow_map: FlowMap,
    teacher: Velocity,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    cond: Condition | None = None,
    method: JVPMethod | None = None,
    tangent_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""Return :math:`(r_L, \phi)`; the teacher sees :math:`\mathrm{sg}(X)` and carries no gradient.
    The JVP (``method``) differentiates in :math:`t` only, never in the conditioning ``cond``;
    without ``tangent_grad`` :math:`r_L` carries no gradient through :math:`\partial_t\phi`."""
    cond = cond or {}
    one = t.new_ones(t.shape)
    j = flow_map.jvp(x_s, s, t, dt=one, method=method, tangent_grad=tangent_grad, **cond)
    return j.dX - teacher(j.X.detach(), t, **cond).detach(), j.phi


class LagrangianLoss(FlowMapLoss):
    """Lagrangian loss: the jump's end moves with the teacher,
    :math:`\\partial_t X(s,t,x_s) = b_t(X(s,t,x_s))`, with the teacher at :math:`\\mathrm{sg}(X)`.

    Args:
        form: ``"backprop"`` (default) or ``"regression"``. Distilling an exact mixture teacher
            (``benchmarks/results/exact-teacher``), the regression form's semigradient stalled at
            twice the backprop form's one-jump error.
        tangent_norm: with the regression form, normalise the residual as :math:`r/(\\|r\\| + c)`.
        jvp: how :math:`\\partial_t\\phi` is taken (:class:`~flowmap.flowmap.JVPMethod`); the
            backprop form needs autodiff.
        pairs: the time-pair sampler (:class:`~flowmap.losses.TimePairSampler`).
        weighting: default, distilling a teacher, adaptive with power one half (from scratch:
            none),
            :math:`\\ell/\\mathrm{sg}(\\ell + \\varepsilon)^{1/2}` (``LossWeighting("adaptive",
            p=0.5)``): unweighted, the single jump lags on 2D mixtures; with the full power
            (``p=1``) it lags on digits; one half holds on both
            (``benchmarks/results/exact-teacher/uneven6``, ``benchmarks/results/digits-ablation``).
    """

    name = "lagrangian"

    def __init__(
        self,
        form: Literal["backprop", "regression"] = "backprop",
        tangent_norm: float | None = None,
        pairs: TimePairSampler | None = None,
        weighting: LossWeighting | None = None,
        jvp: JVPMethod | None = None,
    ) -> None:
        super().__init__(pairs, weighting, LossWeighting("adaptive", p=0.5))
        if form not in ("backprop", "regression"):
            raise ValueError(f"Unknown Lagrangian form {form!r}; choose backprop or regression.")
        self.form, self.tangent_norm = form, tangent_norm
        self.jvp = self._jvp_method(jvp, through_tangent=form == "backprop")

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
        backprop = self.form == "backprop"
        r, phi = lagrangian_residual(flow_map, teacher, x_s, s, t, cond, self.jvp, backprop)
        if self.form == "backprop":
            return mean_square(r)
        return regression_loss(phi, r, self.tangent_norm)
