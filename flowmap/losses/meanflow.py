r"""MeanFlow: Eulerian self-distillation with the data's conditional velocity in place of a teacher.

MeanFlow (Geng et al. 2025) regresses the average velocity onto the Eulerian identity with the
conditional velocity :math:`\dot x_s` of the interpolant (:math:`x_1 - x_0` on the linear path)
where distillation has the teacher :math:`b_s`:

.. math:: \phi(x_s,s,t) \leftarrow \mathrm{sg}\big[\dot x_s + (t-s)\,D\phi(x_s,s,t)\big],\qquad
          D = \partial_s + v\cdot\nabla_x,

with the JVP's direction :math:`v = \dot x_s` (``tangent="conditional"``, MeanFlow) or the model's
own diagonal :math:`v = \mathrm{sg}\,\phi(x_s,s,s)` (``tangent="model"``, improved MeanFlow, whose
regression of :math:`\phi + (t-s)\,\mathrm{sg}(D\phi)` onto :math:`\dot x_s` has this same
semigradient). The residual is linear in :math:`\dot x_s`, so its conditional mean given
:math:`x_s` is the residual with :math:`b_s = E[\dot x_s \mid x_s]`: in expectation this is the
Eulerian regression of :class:`~flowmap.losses.EulerianLoss` on the exact velocity, without one
(the LSD paper's App. C.2; consistency training in the continuous-time limit). This works only
because the Eulerian residual evaluates the velocity at :math:`x_s` itself; a Lagrangian one
needs it at the transported point, so LSD uses its own diagonal instead.

On one-time pairs :math:`(s, 1)` (:class:`~flowmap.losses.OneTimePairSampler`) this is
continuous-time consistency training (sCT), whose stabilisers are ``tangent_norm`` and
``tangent_warmup_steps``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from flowmap.conditioning import Condition
from flowmap.flowmap import FlowMap, JVPMethod
from flowmap.losses.base import FlowMapLoss, regression_loss
from flowmap.losses.eulerian import eulerian_residual, tangent_warmup
from flowmap.losses.pairs import TimePairSampler
from flowmap.losses.weighting import LossWeighting
from flowmap.protocols import Velocity

__all__ = ["MeanFlowLoss"]

TANGENTS = ("conditional", "model")


class MeanFlowLoss(FlowMapLoss):
    r"""MeanFlow's loss: :math:`\phi \leftarrow \mathrm{sg}[\dot x_s + (t-s)D\phi]`, the Eulerian
    identity with the conditional velocity :math:`\dot x_s`; trains from scratch, no teacher.

    Args:
        tangent: the JVP's direction :math:`v`: ``"conditional"`` (:math:`\dot x_s`, MeanFlow) or
            ``"model"`` (:math:`\mathrm{sg}\,\phi(x_s,s,s)`, improved MeanFlow).
        tangent_norm: normalise the residual as :math:`r/(\|r\| + c)` (sCM), or ``None``.
        tangent_warmup_steps: :math:`H`: the :math:`(t-s)D\phi` term is scaled by
            :math:`\min(1, k/H)` (sCM's tangent warm-up; 0: none).
        pairs: the time-pair sampler (:class:`~flowmap.losses.TimePairSampler`).
        weighting: the per-pair weighting (:class:`~flowmap.losses.LossWeighting`).
        jvp: how :math:`D\phi` is taken (:class:`~flowmap.flowmap.JVPMethod`): autodiff or,
            its target being a stop-gradient, a finite difference.
    """

    name = "meanflow"
    accepts_teacher: ClassVar[bool] = False
    trivial_at_identity: ClassVar[bool] = False

    def __init__(
        self,
        tangent: Literal["conditional", "model"] = "conditional",
        tangent_norm: float | None = None,
        tangent_warmup_steps: int = 0,
        pairs: TimePairSampler | None = None,
        weighting: LossWeighting | None = None,
        jvp: JVPMethod | None = None,
    ) -> None:
        super().__init__(pairs, weighting)
        if tangent not in TANGENTS:
            raise ValueError(
                f"Unknown MeanFlow tangent {tangent!r}; choose one of {list(TANGENTS)}."
            )
        self.tangent, self.tangent_norm = tangent, tangent_norm
        self.tangent_warmup_steps = tangent_warmup_steps
        self.jvp = self._jvp_method(jvp, through_tangent=False)

    @property
    def self_taught(self) -> bool:
        """Only the model-tangent form (iMF) leans on the diagonal."""
        return self.tangent == "model"

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
        if self.tangent == "conditional":
            direction = dx_s
        else:
            with torch.no_grad():
                direction = flow_map.velocity(x_s, s, **cond)
        warmup = tangent_warmup(step, self.tangent_warmup_steps)
        r, phi = eulerian_residual(
            flow_map,
            direction,
            x_s,
            s,
            t,
            warmup,
            velocity=dx_s,
            cond=cond,
            method=self.jvp,
            tangent_grad=False,
        )
        return regression_loss(phi, r, self.tangent_norm)
