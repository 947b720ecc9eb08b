r"""flowmap: few-step sampling by flow-map distillation (Boffi et al.'s Lagrangian, Eulerian and
semigroup losses).

Time runs from noise at :math:`t = 0` to data at :math:`t = 1`; the interpolant is
:math:`x_t = \alpha_t x_1 + \sigma_t x_0` with :math:`x_0 \sim N(0, I)`.

The public API:

* :class:`AffinePath` — the path :math:`x_t = \alpha_t x_1 + \sigma_t x_0`,
  :math:`\dot x_t = \dot\alpha_t x_1 + \dot\sigma_t x_0` (linear or cosine schedule).
* :class:`Velocity` — any ``b(x, t)``: the velocity of the ODE :math:`\dot x = b_t(x)` (a teacher).
* :class:`Sampler` — anything with ``generate(x0, nfe, method) -> Solution``.
* :class:`FlowMap` — :math:`X(s,t,x) = x + (t-s)\,\phi(x,s,t)`, so :math:`X(s,s,x) = x`; its
  diagonal :math:`\phi(x,t,t)` is a velocity; ``jvp`` gives :math:`X` and its derivative.
* :class:`JVPMethod` — how that derivative is taken: autodiff or a finite difference (for
  stop-gradient targets), its precision, row chunks recomputed in the backward.
* :class:`FlowMapLoss` — base of the losses: ``loss(flow_map, x1, teacher, step=k)``.
* :class:`LagrangianLoss` — :math:`r_L = \partial_t X(s,t,x_s) - b_t(\mathrm{sg}\,X(s,t,x_s))`.
* :class:`EulerianLoss` — :math:`r_E = \partial_s X(s,t,x_s) + \nabla_x X(s,t,x_s)\, b_s(x_s)`.
* :class:`SemigroupLoss` — :math:`X(s,t,x) = X(u,t,X(s,u,x))`, :math:`u = \gamma s + (1-\gamma) t`.
* :class:`MeanFlowLoss` — :math:`\phi \leftarrow \mathrm{sg}[\dot x_s + (t-s)D\phi]`, the Eulerian
  identity on the conditional velocity (MeanFlow; no teacher).
* :func:`build_loss` — a known method by name (``"lsd"``, ``"meanflow"``, ``"shortcut"``, ``"scd"``,
  …): :mod:`flowmap.presets`, one configuration of the classes above per method.
* :class:`VelocityModule` — the CFM teacher, :math:`E\|v(x_t,t) - \dot x_t\|^2`, a Lightning module.
* :class:`FlowMapModule` — distils (or self-distils) a flow map with an injected loss.
* :func:`solve_ode` — Euler / midpoint / Heun / RK4 for :math:`\dot x = b_t(x)` at an exact NFE.
* :func:`sample_flow_map` — composed jumps :math:`x_{k+1} = X(t_k, t_{k+1}, x_k)`, one NFE each.
* :func:`load_module` — a flowmap checkpoint, read with ``weights_only=True`` and checked.

Layers, each importing only those before it: the math core (``io``, ``paths``, ``protocols``,
``conditioning``, ``flowmap``, ``ode``, ``oracles``, ``reflow``), ``nets`` (with ``TwoTimeAdapter``, the gap
:math:`t - s` for any one-time network), ``teachers`` (models trained elsewhere, e.g.
``flowmap.teachers.DiffusionTeacher``, and ``DiffusionStudent``, such a teacher's own network as
:math:`\phi`), ``losses``, ``presets``, ``data``, ``codecs`` (latent codecs and the data module
that serves latents), ``metrics``, ``steering`` (rewards, look-ahead guidance, search and reward
fine-tuning through the map's jump to the data end), ``training``, ``apps``.
"""

from flowmap.flowmap import FlowMap, JVPMethod
from flowmap.losses import EulerianLoss, FlowMapLoss, LagrangianLoss, MeanFlowLoss, SemigroupLoss
from flowmap.ode import sample_flow_map, solve_ode
from flowmap.paths import AffinePath
from flowmap.presets import build_loss
from flowmap.protocols import Sampler, Velocity
from flowmap.training import FlowMapModule, VelocityModule, load_module

__version__ = "0.2.0"

__all__ = [
    "AffinePath",
    "Velocity",
    "Sampler",
    "FlowMap",
    "JVPMethod",
    "FlowMapLoss",
    "LagrangianLoss",
    "EulerianLoss",
    "SemigroupLoss",
    "MeanFlowLoss",
    "build_loss",
    "VelocityModule",
    "FlowMapModule",
    "solve_ode",
    "sample_flow_map",
    "load_module",
]
