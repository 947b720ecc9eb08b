r"""Loss weighting shared by every loss.

* ``"none"``: :math:`\ell`.
* ``"learned"``: a learned log-variance :math:`w(s, t)` per pair, :math:`e^{-w(s,t)}\,\ell + w(s,t)`
  (EDM2; Boffi et al.). At the optimum :math:`e^{w} = E[\ell \mid s, t]`, so every pair counts equally.
* ``"adaptive"``: :math:`\ell / \mathrm{sg}(\ell + \varepsilon)^p` (MeanFlow), per sample.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

from flowmap.nets.embedding import TwoTimeEmbedding

__all__ = ["LossWeighting", "WEIGHTINGS"]

WeightingKind = Literal["none", "learned", "adaptive"]
WEIGHTINGS: tuple[str, ...] = get_args(WeightingKind)


class LossWeighting(nn.Module):
    """Maps per-sample losses :math:`\\ell` ``(B,)`` at pairs :math:`(s, t)` to weighted losses ``(B,)``.

    Args:
        kind: ``"none"``, ``"learned"`` or ``"adaptive"`` (module docstring).
        p: the adaptive weighting's power.
        eps: the adaptive weighting's offset.
        dim: embedding size of the learned log-variance :math:`w(s, t)`.
    """

    def __init__(
        self, kind: WeightingKind = "none", p: float = 1.0, eps: float = 1e-3, dim: int = 32
    ) -> None:
        super().__init__()
        if kind not in WEIGHTINGS:
            raise ValueError(f"Unknown loss weighting {kind!r}; choose one of {list(WEIGHTINGS)}.")
        self.kind, self.p, self.eps = kind, p, eps
        if kind == "learned":
            self.embed = TwoTimeEmbedding(dim, hidden=dim)
            self.head = nn.Linear(dim, 1)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def log_variance(self, s: Tensor, t: Tensor) -> Tensor:
        """:math:`w(s, t)` ``(B,)`` (learned weighting only)."""
        return self.head(torch.nn.functional.silu(self.embed(s, t))).squeeze(-1)

    def forward(self, loss: Tensor, s: Tensor, t: Tensor) -> Tensor:
        if self.kind == "learned":
            if self.head.weight.device != loss.device:
                raise ValueError(
                    f"The loss's learned weighting is on {self.head.weight.device} but the batch "
                    f"on {loss.device}; move the loss with the net (loss.to(device)) and give "
                    "loss.parameters() to the optimiser too (Lightning does both)."
                )
            w = self.log_variance(s, t)
            return torch.exp(-w) * loss + w
        if self.kind == "adaptive":
            return loss / (loss.detach() + self.eps) ** self.p
        return loss
