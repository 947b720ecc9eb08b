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

from flowmap.conditioning import Conditioning
from flowmap.paths import time_dtype

__all__ = ["ConditionEmbedding", "GapBranch", "SinusoidalEmbedding", "TwoTimeEmbedding"]


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


class GapBranch(nn.Sequential):
    r""":math:`g` = Linear(SiLU(Linear(·))) on features of the gap, its last layer zero at
    initialisation; :meth:`difference` gives :math:`g(\delta) - g(0)`, exactly 0 at
    :math:`\delta = 0` whatever the weights."""

    def __init__(self, dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)

    def difference(self, features: nn.Module, delta: Tensor) -> Tensor:
        r""":math:`g(\mathrm{features}(\delta)) - g(\mathrm{features}(0))`."""
        # g(0) on a batch of the same shape, so that the diagonal rows cancel bit for bit
        return self(features(delta)) - self(features(torch.zeros_like(delta)))


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
        self.gap = GapBranch(dim, hidden, hidden)
        self.out_dim = hidden

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        diagonal = s is t  # a velocity call φ(x, t, t): the gap term is exactly 0
        with torch.autocast(device_type=s.device.type, enabled=False):
            s, t = s.to(time_dtype(s)), t.to(time_dtype(t))
            start = self.start(self.features(s))
            if diagonal:  # g(0) - g(0) skipped; g stays in the graph with a zero gradient (DDP)
                return start + 0.0 * sum(p.sum() for p in self.gap.parameters())
            return start + self.gap.difference(self.features, t - s)


class ConditionEmbedding(nn.Module):
    r"""Embedding of the class label :math:`c` and the guidance scale :math:`w`, added to the time
    embedding (as in DiT/EDM2 class conditioning and LCM/improved MeanFlow scale conditioning).

    * labels: ``nn.Embedding(K + 1, out_dim)``, the extra row the null class
      (:data:`~flowmap.conditioning.NULL_CLASS`) that label dropout trains;
    * scale: an MLP of sinusoidal features of :math:`w` whose last layer starts at zero, so a net
      warm-started from a teacher without a scale input begins as the teacher at every :math:`w`.

    Its labels and scale are checked by its :class:`~flowmap.conditioning.Conditioning` policy.

    Args:
        out_dim: the width of the time embedding it is added to.
        num_classes: :math:`K` (``None``: no labels).
        guidance_input: whether :math:`w` is an input.
    """

    def __init__(self, out_dim: int, num_classes: int | None, guidance_input: bool) -> None:
        super().__init__()
        self.policy = Conditioning(num_classes, scale_input=bool(guidance_input))
        self.num_classes = self.policy.num_classes
        self.guidance_input = self.policy.scale_input
        k = self.num_classes
        self.label = None if k is None else nn.Embedding(k + 1, out_dim)
        self.scale = None
        if guidance_input:
            self.scale = nn.Sequential(
                SinusoidalEmbedding(64, scale=10.0),
                nn.Linear(64, out_dim),
                nn.SiLU(),
                nn.Linear(out_dim, out_dim),
            )
            nn.init.zeros_(self.scale[-1].weight)
            nn.init.zeros_(self.scale[-1].bias)

    def forward(self, owner: str, y: Tensor | None, w: Tensor | None) -> Tensor | float:
        """The conditioning vector ``(B, out_dim)`` (0 for an unconditional net); ``owner`` names
        the net in the one-sentence errors."""
        y, w = self.policy.net_inputs(y, w, owner)
        if y is None:
            return 0.0
        c = self.label(self.policy.relabel(y, self.num_classes))  # the null class: row K
        if w is not None:
            c = c + self.scale(w.to(self.scale[1].weight.dtype))
        return c
