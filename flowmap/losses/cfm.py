r"""Conditional flow matching for the teacher: :math:`E\,\|v(x_t, t) - \dot x_t\|^2`."""

from __future__ import annotations

import torch
from torch import Tensor

from flowmap.conditioning import Condition
from flowmap.losses.base import mean_square
from flowmap.losses.pairs import TimeDistribution, sample_times
from flowmap.paths import AffinePath
from flowmap.protocols import Velocity

__all__ = ["cfm_loss"]


def cfm_loss(
    velocity: Velocity,
    x1: Tensor,
    path: AffinePath,
    *,
    x0: Tensor | None = None,
    t: Tensor | None = None,
    time_distribution: TimeDistribution = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
    cond: Condition | None = None,
) -> Tensor:
    r"""Mean over the batch of :math:`\|v(x_t,t) - \dot x_t\|^2` (per-sample mean over dimensions);
    ``cond`` (e.g. ``{"y": labels}``) is passed to the velocity."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    if t is None:
        t = sample_times(x1.shape[0], time_distribution, loc=loc, scale=scale, device=x1.device)
    sample = path.sample(x0, x1, t)
    return mean_square(velocity(sample.x_t, t, **(cond or {})) - sample.dx_t).mean()
