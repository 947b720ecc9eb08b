r"""Time embeddings in float32.

Every net takes two times :math:`(s, t)`. Following Boffi et al. it embeds the start time :math:`s`
and the gap :math:`t - s` (not :math:`s` and :math:`t`), and the gap's contribution is
:math:`g(t - s) - g(0)`, which vanishes identically on the diagonal: a teacher trained at
:math:`s = t` never moves the gap branch, so its weights warm-start a flow map that equals the
teacher on the diagonal and is one Euler step of it off the diagonal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowmap.paths import time_dtype

__all__ = ["SinusoidalEmbedding", "TwoTimeEmbedding"]


class SinusoidalEmbedding(nn.Module):
    r"""Positional features :math:`[\cos(\omega_k \tau), \sin(\omega_k \tau)]`, :math:`\omega_k = s\cdot 10^{-4k/d}`.

    Always computed in float32 (autocast is disabled here), whatever the surrounding precision.
    """

    def __init__(self, dim: int, scale: float = 100.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"Embedding dim must be even, got {dim}.")
        half = dim // 2
        freqs = scale * torch.exp(-math.log(10_000.0) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.dim = dim

    def forward(self, tau: Tensor) -> Tensor:
        with torch.autocast(device_type=tau.device.type, enabled=False):
            tau = tau.to(time_dtype(tau))
            arg = tau[:, None] * self.freqs.to(tau.dtype)[None]
            return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TwoTimeEmbedding(nn.Module):
    r"""Embedding of :math:`(s, t)` as :math:`f(s) + g(t - s) - g(0)`, with :math:`f, g` small MLPs of
    sinusoidal features.

    The gap term vanishes at :math:`t = s` whatever :math:`g`'s weights, and :math:`g`'s last layer
    starts at zero, so a freshly built (or warm-started) net ignores the gap until trained on it.
    """

    def __init__(self, dim: int, hidden: int | None = None, scale: float = 100.0) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.features = SinusoidalEmbedding(dim, scale)
        self.start = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.gap = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.gap[-1].weight)
        nn.init.zeros_(self.gap[-1].bias)
        self.out_dim = hidden

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device_type=s.device.type, enabled=False):
            s, t = s.to(time_dtype(s)), t.to(time_dtype(t))
            # g(0) on a batch of the same shape, so that the diagonal rows cancel bit for bit
            g = self.gap(self.features(t - s)) - self.gap(self.features(torch.zeros_like(s)))
            return self.start(self.features(s)) + g
