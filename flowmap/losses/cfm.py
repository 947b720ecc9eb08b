r"""Conditional flow matching for the teacher: :math:`E\,\|v(x_t, t) - \dot x_t\|^2`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowmap.losses.core import mean_square
from flowmap.losses.pairs import sample_times
from flowmap.paths import AffinePath

__all__ = ["cfm_loss"]


def cfm_loss(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x1: Tensor,
    path: AffinePath,
    *,
    x0: Tensor | None = None,
    t: Tensor | None = None,
    time_distribution: str = "uniform",
    loc: float = 0.0,
    scale: float = 1.0,
) -> Tensor:
    r"""Mean over the batch of :math:`\|v(x_t,t) - \dot x_t\|^2` (per-sample mean over dimensions)."""
    x0 = torch.randn_like(x1) if x0 is None else x0
    if t is None:
        t = sample_times(x1.shape[0], time_distribution, loc=loc, scale=scale, device=x1.device)
    x_t, dx_t = path.sample(x0, x1, t)
    return mean_square(velocity(x_t, t) - dx_t).mean()
