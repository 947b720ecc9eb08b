r"""The flow map :math:`X(s, t, x) = x + (t - s)\,\phi(x, s, t)` (DESIGN §2).

:math:`X(s, s, x) = x` holds exactly by construction, and the diagonal :math:`\phi(x, t, t)` is a
velocity field, so the same network is a teacher (called on the diagonal) and a flow map.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from flowmap.paths import expand_like

__all__ = ["FlowMap", "as_time"]


def as_time(t: float | Tensor, x: Tensor) -> Tensor:
    """A time (float, 0-d or ``(B,)`` tensor) as a vector ``(B,)`` on ``x``'s device.

    Times are float32 (DESIGN §2), except next to float64 samples, where they stay float64 so that
    analytic oracles can be checked to float64 precision.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(t, device=x.device).to(dtype)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"Times must be scalars or shape ({x.shape[0]},), got {tuple(t.shape)}.")
    return t


class FlowMap(nn.Module):
    r"""Wraps a network :math:`\phi(x, s, t)` as the two-time map :math:`X(s,t,x) = x + (t-s)\phi(x,s,t)`.

    ``s > t`` is allowed: it runs the map backwards in time (data → noise).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def phi(self, x: Tensor, s: float | Tensor, t: float | Tensor) -> Tensor:
        r"""The chord slope :math:`\phi(x, s, t)`."""
        return self.net(x, as_time(s, x), as_time(t, x))

    def forward(self, x: Tensor, s: float | Tensor, t: float | Tensor) -> Tensor:
        r""":math:`X(s, t, x) = x + (t - s)\,\phi(x, s, t)`."""
        s, t = as_time(s, x), as_time(t, x)
        return x + expand_like(t - s, x).to(x.dtype) * self.net(x, s, t)

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The diagonal :math:`\phi(x, t, t) = \partial_t X(s, t, x)|_{s=t}`, a velocity field :math:`b_t(x)`."""
        t = as_time(t, x)
        return self.net(x, t, t)

    @classmethod
    def from_velocity_net(cls, net: nn.Module) -> FlowMap:
        """Warm start: a flow map whose :math:`\\phi` is a copy of a teacher's velocity net.

        The nets embed :math:`(s, t - s)`; the teacher was trained at gap 0, so on the diagonal the
        copy equals the teacher exactly and off the diagonal it starts as one Euler step of it.
        """
        return cls(copy.deepcopy(net))
