r"""Eulerian map distillation (EMD / ESD): move the start time.

.. math:: r_E = \partial_s X(s,t,x_s) + \nabla_x X(s,t,x_s)\,b_s(x_s)
              = b_s - \phi + (t-s)\,D\phi,\qquad D = \partial_s + b_s\cdot\nabla_x,

one JVP in :math:`(s, x)` with tangent :math:`(1, b_s(x_s))`. Forms (``form``):

* ``"regression"`` (MeanFlow, AYF, sCM; default) —
  :math:`\phi \leftarrow \mathrm{sg}[b_s + r(k)\,(t-s)\,D\phi]`, a semigradient that needs no
  second-order autodiff. Its fixed point is the flow map and nothing else, but it converges slowly
  (a fixed-point iteration along characteristics, not the gradient of an objective);
* ``"full"`` — :math:`\|r_E\|^2` with gradients through the whole JVP (Flow Map Matching's convex
  objective). Distilling an exact mixture teacher it is three times better than the regression
  form after 1500 steps, but in longer runs it drifts away (9% of the data radius at step 500,
  50% at step 3000): its gradient can also shrink :math:`\nabla_x X`, flattening the map away
  from the diagonal, which the stop-gradient of the regression form forbids
  (``benchmarks/results/exact-teacher``). Unstable on images (spatial Jacobian);
* ``"sg_advective"`` — :math:`\|\partial_s X + \mathrm{sg}(\nabla_x X\,b_s)\|^2`, gradients through
  :math:`\partial_s X` only (Boffi's ESD stop-gradient; two JVPs).

Stabilisers: tangent normalisation :math:`g/(\|g\| + c)` (``tangent_norm=c``, regression form) and
tangent warm-up :math:`r(k) = \min(1, k/H)` on the :math:`(t-s)D\phi` term (``tangent_warmup_steps=H``).
Adaptive weighting lives in :class:`~flowmap.losses.LossWeighting`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowmap.flowmap import FlowMap
from flowmap.losses.base import FlowMapLoss, mean_square, regression_loss
from flowmap.losses.pairs import TimePairSampler
from flowmap.losses.weighting import LossWeighting
from flowmap.paths import expand_like
from flowmap.protocols import Velocity

__all__ = ["eulerian_residual", "EulerianLoss"]

FORMS = ("regression", "full", "sg_advective")


def eulerian_residual(
    flow_map: FlowMap,
    teacher: Velocity,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    warmup: float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""Return :math:`(r, \phi)` with :math:`r = \phi - b_s - w\,(t-s)D\phi` (:math:`= -r_E` at :math:`w = 1`)."""
    b = teacher(x_s, s).detach()
    j = flow_map.jvp(x_s, s, t, dx=b, ds=s.new_ones(s.shape))
    gap = expand_like(t - s, x_s).to(j.phi.dtype)
    return j.phi - b - warmup * gap * j.dphi, j.phi


class EulerianLoss(FlowMapLoss):
    """Eulerian loss with the stop-gradient variants and stabilisers of the module docstring.

    Args:
        form: ``"regression"`` (default), ``"full"`` or ``"sg_advective"``.
        tangent_norm: normalisation constant :math:`c` (regression form), or ``None``.
        tangent_warmup_steps: :math:`H` of the tangent warm-up (0: none).
        pairs, weighting: see :class:`~flowmap.losses.FlowMapLoss`.
    """

    name = "eulerian"

    def __init__(
        self,
        form: Literal["regression", "full", "sg_advective"] = "regression",
        tangent_norm: float | None = None,
        tangent_warmup_steps: int = 0,
        pairs: TimePairSampler | None = None,
        weighting: LossWeighting | None = None,
    ) -> None:
        super().__init__(pairs, weighting)
        if form not in FORMS:
            raise ValueError(f"Unknown Eulerian form {form!r}; choose one of {list(FORMS)}.")
        self.form, self.tangent_norm = form, tangent_norm
        self.tangent_warmup_steps = tangent_warmup_steps

    def warmup(self, step: int) -> float:
        """Tangent warm-up factor :math:`r(k) = \\min(1, k/H)` (1 without warm-up)."""
        if self.tangent_warmup_steps <= 0:
            return 1.0
        return min(1.0, step / self.tangent_warmup_steps)

    def off_diagonal(
        self, flow_map: FlowMap, teacher: Velocity, x_s: Tensor, s: Tensor, t: Tensor, step: int
    ) -> Tensor:
        if self.form == "sg_advective":
            d_s_X = flow_map.jvp(x_s, s, t, ds=s.new_ones(s.shape)).dX  # -φ + (t - s) ∂_s φ
            with torch.no_grad():
                advective = flow_map.jvp(x_s, s, t, dx=teacher(x_s, s)).dX  # ∇_x X · b_s
            return mean_square(d_s_X + advective)
        r, phi = eulerian_residual(flow_map, teacher, x_s, s, t, self.warmup(step))
        if self.form == "full":
            return mean_square(r)
        return regression_loss(phi, r, self.tangent_norm)
