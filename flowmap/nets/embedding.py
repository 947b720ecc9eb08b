r"""Time embeddings in float32.

Every net takes two times :math:`(s, t)`. Following Boffi et al. it embeds the start time :math:`s`
and the gap :math:`t - s` (not :math:`s` and :math:`t`), so a teacher trained at :math:`s = t` sees a
gap of 0 and its weights warm-start a flow map unchanged on the diagonal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalEmbedding", "TwoTimeEmbedding"]


def _full_precision(t: Tensor) -> Tensor:
    """float32, or float64 where the caller already works in float64 (analytic tests)."""
    return t if t.dtype == torch.float64 else t.float()


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
            tau = _full_precision(tau)
            arg = tau[:, None] * self.freqs.to(tau.dtype)[None]
            return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TwoTimeEmbedding(nn.Module):
    r"""Embedding of :math:`(s, t)` as :math:`\mathrm{MLP}(\mathrm{emb}(s)) + \mathrm{MLP}(\mathrm{emb}(t-s))`.

    The gap branch's last layer starts at zero, so a freshly built net ignores the gap until trained.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 4 * dim
        self.features = SinusoidalEmbedding(dim)
        self.start = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.gap = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.gap[-1].weight)
        nn.init.zeros_(self.gap[-1].bias)
        self.out_dim = hidden

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device_type=s.device.type, enabled=False):
            s, t = _full_precision(s), _full_precision(t)
            return self.start(self.features(s)) + self.gap(self.features(t - s))
