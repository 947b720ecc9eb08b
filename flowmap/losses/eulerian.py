r"""Eulerian map distillation (EMD / ESD): move the start time.

.. math:: r_E = \partial_s X(s,t,x_s) + \nabla_x X(s,t,x_s)\,b_s(x_s)
              = b_s - \phi + (t-s)\,D\phi,\qquad D = \partial_s + b_s\cdot\nabla_x,

one JVP in :math:`(s, x)` with tangent :math:`(1, b_s(x_s))`. Forms (``form``):

* ``"regression"`` (MeanFlow) — :math:`\phi \leftarrow \mathrm{sg}[b_s + r(k)\,(t-s)\,D\phi]`;
* ``"sg_advective"`` — :math:`\|\partial_s X + \mathrm{sg}(\nabla_x X\,b_s)\|^2`, gradients through
  :math:`\partial_s X` only (Boffi's ESD "full" stop-gradient; two JVPs);
* ``"full"`` — :math:`\|r_E\|^2` with gradients through the whole JVP (the unstable one on images).

Stabilisers: tangent normalisation :math:`g/(\|g\| + c)` (``tangent_norm=c``, regression form) and
tangent warm-up :math:`r(k) = \min(1, k/H)` on the :math:`(t-s)D\phi` term (``tangent_warmup_steps=H``).
Adaptive weighting lives in :class:`~flowmap.losses.weighting.LossWeighting`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowmap.flowmap import FlowMap
from flowmap.losses.core import FlowMapLoss, Velocity, mean_square, phi_jvp, regression_loss
from flowmap.paths import expand_like

__all__ = ["eulerian_residual", "EulerianLoss"]

FORMS = ("regression", "sg_advective", "full")


def eulerian_residual(
    flow_map: FlowMap,
    teacher: Velocity,
    x_s: Tensor,
    s: Tensor,
    t: Tensor,
    warmup: float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""Return :math:`(r, \phi)` with :math:`r = \phi - b_s - w\,(t-s)D\phi = -r_E` at warm-up factor :math:`w`."""
    b = teacher(x_s, s).detach()
    phi, dphi = phi_jvp(flow_map, x_s, s, t, dx=b, ds=s.new_ones(s.shape))
    gap = expand_like(t - s, x_s).to(phi.dtype)
    return phi - b - warmup * gap * dphi, phi


class EulerianLoss(FlowMapLoss):
    """Eulerian loss with the stop-gradient variants and stabilisers of the module docstring."""

    name = "eulerian"

    def __init__(
        self,
        form: str = "regression",
        tangent_norm: float | None = None,
        tangent_warmup_steps: int = 0,
        **kw,
    ) -> None:
        super().__init__(**kw)
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
            gap = expand_like(t - s, x_s)
            phi, dphi_ds = phi_jvp(flow_map, x_s, s, t, ds=s.new_ones(s.shape))
            d_s_X = gap * dphi_ds - phi  # ∂_s X = -φ + (t - s) ∂_s φ
            with torch.no_grad():
                b = teacher(x_s, s)
                _, dphi_b = phi_jvp(flow_map, x_s, s, t, dx=b)
                advective = b + gap * dphi_b  # ∇_x X · b
            return mean_square(d_s_X + advective)
        r, phi = eulerian_residual(flow_map, teacher, x_s, s, t, self.warmup(step))
        if self.form == "full":
            return mean_square(r)
        return regression_loss(phi, r, self.tangent_norm)
