r"""Look-ahead guidance by a reward: steer the ODE (or the map's jumps) towards high :math:`r(x_1)`.

At each step from :math:`t_k` to :math:`t_{k+1}` the sample's endpoint is predicted, scored and
differentiated, and the velocity is pushed along the normalised gradient:

.. math::
   \hat x_1 = X(t, 1, x_t) \ \text{(flow map)} \quad\text{or}\quad
   \hat x_1 = E[x_1 \mid x_t] \ \text{(denoiser, from } b_t(x_t)\text{)},

   g = \nabla_{x_t} r(\hat x_1), \qquad \hat g = g / \max(\mathrm{rms}(g), 1),

   x_{t_{k+1}} = X\big(t_k, t_{k+1}, x_{t_k} + h\,\lambda\,w_{t_k}\,\hat g\big),
   \qquad h = t_{k+1} - t_k

(the push, then the jump, which carries it to :math:`t_{k+1}`; a velocity takes the Euler step
of the pushed field, :math:`x + h\,(b_t(x) + \lambda w_t \hat g)`). The weight
:math:`w_t = \sigma_t(\dot\alpha_t\sigma_t/\alpha_t - \dot\sigma_t)`, clipped at ``max_weight``
(``"tilt"``; :math:`(1-t)/t` on the linear path), is the factor by which a change of the score
changes the velocity: with ``normalize="none"``, :math:`\lambda = 1` and no clip,
:math:`g` in place of the score's change follows the tilt :math:`p(x_1)\,e^{r(x_1)}` as far as
:math:`\log E[e^{r(x_1)} \mid x_t] \approx r(\hat x_1)` holds (Flow Map Trajectory Tilting,
Diamond Maps); the normalised, clipped push is a heuristic on top. ``"constant"`` takes
:math:`w_t = 1`.

NFE counts network evaluations per sample: each forward call of the model and each backward
pass through it (a gradient call) is one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmap.conditioning import guidance_cost
from flowmap.flowmap import FlowMap
from flowmap.ode import time_grid
from flowmap.paths import AffinePath, as_time, data_and_noise, expand_like
from flowmap.protocols import Solution, Velocity
from flowmap.steering.rewards import Reward, RewardError, evaluate_reward

__all__ = [
    "LOOKAHEADS",
    "NORMALIZATIONS",
    "SCHEDULES",
    "RewardGuidance",
    "denoiser_lookahead",
    "guided_sample",
]

LOOKAHEADS = ("flow_map", "denoiser")
SCHEDULES = ("tilt", "constant")
NORMALIZATIONS = ("clip", "unit", "none")
GRADIENTS = ("input", "endpoint")


def denoiser_lookahead(path: AffinePath, x: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    r"""The denoiser's endpoint :math:`E[x_1 \mid x_t]` from the velocity :math:`b_t(x_t)`:
    :math:`(\dot\sigma_t x - \sigma_t b)/(\alpha_t\dot\sigma_t - \sigma_t\dot\alpha_t)`
    (:math:`x + (1-t)\,b` on the linear path)."""
    k = path.coefficients(t, x)
    return data_and_noise("velocity", velocity, x, k.alpha, k.sigma, k.d_alpha, k.d_sigma)[0]


@dataclass
class RewardGuidance:
    r"""How a reward steers sampling (see the module docstring for the update).

    Args:
        reward: :math:`r`, a callable ``(B, *shape) -> (B,)`` (:mod:`flowmap.steering.rewards`).
        scale: :math:`\lambda`, in units of the data's RMS per unit time (normalised).
        lookahead: ``"flow_map"`` (:math:`X(t, 1, x_t)`, needs a :class:`~flowmap.FlowMap`) or
            ``"denoiser"`` (:math:`E[x_1 \mid x_t]`).
        schedule: ``"tilt"`` (:math:`w_t`, clipped at ``max_weight``) or ``"constant"``.
        max_weight: the clip of the tilt weight, which grows as :math:`1/t` near the noise end
            (FMTT clips at 20 over some 30 steps; at a few steps a clip near 2 keeps each push
            :math:`h\lambda w_t` within the data's scale).
        normalize: ``"clip"`` scales a gradient of RMS above 1 down to 1 per sample and keeps a
            smaller one (a saturated reward does not push); ``"unit"`` rescales every gradient
            to RMS 1 (FMTT); ``"none"`` takes :math:`g` as it is.
        gradient: ``"input"`` differentiates through the look-ahead,
            :math:`g = \nabla_{x_t} r(\hat x_1)` (a backward call through the network);
            ``"endpoint"`` takes :math:`g = \nabla r(\hat x_1)` at the endpoint and applies it at
            :math:`x_t` (no backward call; the look-ahead's Jacobian taken as the identity, as
            manifold-preserving guidance does with the denoiser).
    """

    reward: Reward
    scale: float = 1.0
    lookahead: str = "flow_map"
    schedule: str = "tilt"
    max_weight: float = 2.0
    normalize: str = "clip"
    gradient: str = "input"

    def __post_init__(self) -> None:
        if self.lookahead not in LOOKAHEADS:
            raise ValueError(f"Unknown lookahead {self.lookahead!r}; choose one of {LOOKAHEADS}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; choose one of {SCHEDULES}.")
        if not callable(self.reward):
            raise TypeError("The reward must be a callable x -> (B,); see flowmap.steering.")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(
                f"Unknown normalize {self.normalize!r}; choose one of {NORMALIZATIONS}."
            )
        if self.gradient not in GRADIENTS:
            raise ValueError(f"Unknown gradient {self.gradient!r}; choose one of {GRADIENTS}.")
        if not math.isfinite(self.scale) or not self.max_weight > 0:
            raise ValueError(
                f"scale must be a finite number and max_weight positive, got {self.scale} and "
                f"{self.max_weight}."
            )

    def weight(self, path: AffinePath, t: Tensor, x: Tensor) -> Tensor:
        """:math:`w_t` per sample, broadcast against ``x``."""
        if self.schedule == "constant":
            return torch.ones_like(expand_like(t, x), dtype=x.dtype)
        k = path.schedule(torch.as_tensor(t, dtype=torch.float64).flatten())
        a, g = k.alpha, k.sigma
        tilt = g * (k.d_alpha * g / a.clamp_min(1e-12) - k.d_sigma)
        w = torch.where(a > 0, tilt, torch.full_like(tilt, self.max_weight))
        return expand_like(w.clamp(max=self.max_weight).to(x.dtype), x)

    def direction(self, x_hat: Tensor, x: Tensor) -> Tensor:
        r""":math:`\hat g`: the (normalised) gradient of :math:`r(\hat x_1)` with respect to ``x``
        (which ``x_hat`` was computed from, with grad)."""
        r = evaluate_reward(self.reward, x_hat)
        (g,) = torch.autograd.grad(r.sum(), x)
        if not bool(torch.isfinite(g).all()):
            raise RewardError(
                "The reward's gradient is not finite at some samples; smooth the reward (e.g. "
                "clamp what it takes a log or a root of)."
            )
        if self.normalize != "none":
            rms = g.flatten(1).pow(2).mean(1).sqrt()
            floor = 1.0 if self.normalize == "clip" else 1e-12
            g = g / expand_like(rms.clamp_min(floor), g)
        return g


def guided_sample(
    model: FlowMap | Velocity,
    x: Tensor,
    guidance: RewardGuidance,
    *,
    steps: int | None = None,
    grid: list[float] | Tensor | None = None,
    cond: Mapping[str, Tensor] | None = None,
) -> Solution:
    r"""Sample from noise ``x`` (at :math:`t = 0`) with look-ahead guidance over ``steps`` uniform
    steps (or a ``grid``). A :class:`~flowmap.FlowMap` pushes, then jumps
    (:math:`X(t_k, t_{k+1}, \cdot)`); any other velocity takes Euler steps and looks ahead with
    its denoiser only.

    NFE per sample and step: the look-ahead's forward call, with ``gradient="input"`` its
    backward call, and a flow map's jump (an Euler step shares the look-ahead's call); a velocity
    guided by classes pays both branches of each call.
    """
    is_map = isinstance(model, FlowMap)
    if guidance.lookahead == "flow_map" and not is_map:
        raise ValueError(
            f"The flow-map look-ahead X(t, 1, x) needs a FlowMap, not a {type(model).__name__}; "
            "use lookahead='denoiser' to steer a velocity."
        )
    if (steps is None) == (grid is None):
        raise ValueError("Give exactly one of steps= or grid= to guided_sample.")
    path: AffinePath | None = getattr(model, "path", None)
    if path is None:
        raise ValueError(
            f"The {type(model).__name__} declares no path (.path), which the look-ahead needs."
        )
    kw = {k: v for k, v in (cond or {}).items() if v is not None}
    ts = time_grid(steps, grid, 0.0, 1.0).tolist()
    if ts[-1] != 1.0 or ts[0] > ts[-1]:
        raise ValueError(f"The guided grid must rise to t = 1 (the data end), got {ts}.")
    through = guidance.gradient == "input"
    # a velocity guided by classes costs both branches a call (a flow map has it baked in)
    per_call = 1 if is_map or "y" not in kw else guidance_cost(kw.get("w"))
    nfe = 0
    for a, b in zip(ts[:-1], ts[1:]):
        t = as_time(a, x)
        with torch.set_grad_enabled(through):
            xg = x.detach().requires_grad_(through)
            if guidance.lookahead == "flow_map":
                x_hat = model(xg, t, as_time(1.0, x), **kw)
            else:
                v = model.velocity(xg, t, **kw) if is_map else model(xg, t, **kw)
                x_hat = denoiser_lookahead(path, xg, t, v)
        nfe += (2 if through else 1) * per_call
        with torch.enable_grad():
            if not through:  # the gradient at the endpoint, applied at x_t
                xg = x_hat = x_hat.detach().requires_grad_(True)
            g = guidance.direction(x_hat, xg)
        push = (b - a) * guidance.scale * guidance.weight(path, t, x) * g
        if is_map:
            with torch.no_grad():
                x = model(x + push, t, as_time(b, x), **kw)
            nfe += 1
        else:
            x = x + (b - a) * v.detach() + push
    return Solution(x.detach(), nfe)
