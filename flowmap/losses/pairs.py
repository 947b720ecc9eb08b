r"""Time samplers: single times :math:`t` for CFM and pairs :math:`(s, t)` for flow maps.

One implementation serves every loss. A fraction :math:`\eta` of each batch
lies on the diagonal :math:`s = t`; the rest is drawn off the diagonal from

* ``"uniform"`` — uniform on the triangle :math:`0 \le s < t \le 1` (min/max of two uniforms);
* ``"logit_normal"`` — sorted pair of :math:`\mathrm{sigmoid}(N(\mathrm{loc}, \mathrm{scale}^2))` draws;
* ``"gap"`` — gap-controlled: :math:`t - s \sim U[0, g]`, :math:`s \sim U[0, 1 - (t - s)]`.

A curriculum caps the gap :math:`t - s \le g(k)` with :math:`g(k)` growing linearly from
``gap_start`` to ``max_gap`` over ``gap_warmup_steps`` training steps. With ``backward_fraction``
> 0 that fraction of off-diagonal pairs is swapped to :math:`s > t` (data → noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from flowmap.paths import as_time

__all__ = ["sample_times", "TimePairs", "TimePairSampler", "TimeDistribution", "PairDistribution"]

TimeDistribution = Literal["uniform", "logit_normal"]
PairDistribution = Literal["uniform", "logit_normal", "gap"]
TIME_DISTRIBUTIONS: tuple[str, ...] = get_args(TimeDistribution)
PAIR_DISTRIBUTIONS: tuple[str, ...] = get_args(PairDistribution)
#: The one default of the diagonal fraction η, tuned for distillation. Self-distillation from
#: scratch learns its velocity from the diagonal alone and wants more (Boffi et al. use 0.75).
DEFAULT_ETA = 0.25


def sample_times(
    n: int,
    distribution: TimeDistribution = "uniform",
    *,
    loc: float = 0.0,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""``n`` float32 times in [0, 1]: uniform, or :math:`\mathrm{sigmoid}(N(\mathrm{loc}, \mathrm{scale}^2))`."""
    if distribution == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if distribution == "logit_normal":
        z = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(loc + scale * z)
    raise ValueError(
        f"Unknown time distribution {distribution!r}; choose one of {list(TIME_DISTRIBUTIONS)}."
    )


@dataclass
class TimePairs:
    """Start times ``s``, end times ``t`` (both ``(B,)``) and the mask ``diagonal`` ``(B,)`` of the
    rows that train the tangent condition on :math:`s = t` (their ``s`` and ``t`` are equal)."""

    s: Tensor
    t: Tensor
    diagonal: Tensor

    def __post_init__(self) -> None:
        n = self.s.shape[0]
        if self.s.shape != (n,) or self.t.shape != (n,) or self.diagonal.shape != (n,):
            raise ValueError(
                f"TimePairs needs s, t and diagonal of one shape (B,), got {tuple(self.s.shape)}, "
                f"{tuple(self.t.shape)} and {tuple(self.diagonal.shape)}."
            )
        if self.diagonal.dtype != torch.bool:
            raise ValueError("TimePairs.diagonal must be a boolean mask.")
        if not torch.equal(self.s[self.diagonal], self.t[self.diagonal]):
            raise ValueError(
                "TimePairs rows marked diagonal must have s == t; fix s, t or the mask."
            )

    def to(self, like: Tensor) -> TimePairs:
        """The pairs as times of ``like``'s device and time dtype."""
        return TimePairs(
            as_time(self.s, like), as_time(self.t, like), self.diagonal.to(like.device)
        )


class TimePairSampler:
    """Draws :class:`TimePairs`; see the module docstring for the distributions and curriculum.

    Args:
        distribution: law of the off-diagonal pairs.
        eta: diagonal fraction :math:`\\eta` of each batch.
        loc: location of the logit-normal law.
        scale: scale of the logit-normal law.
        max_gap: cap on :math:`|t - s|`.
        gap_start: the cap at step 0 when it grows (default: ``max_gap``, no curriculum).
        gap_warmup_steps: steps over which the cap grows linearly from ``gap_start`` to ``max_gap``.
        backward_fraction: share of off-diagonal pairs swapped to :math:`s > t` (data to noise);
            a map needs it > 0 to invert (the toy recipes use 0.5).
    """

    def __init__(
        self,
        distribution: PairDistribution = "uniform",
        eta: float = DEFAULT_ETA,
        loc: float = 0.0,
        scale: float = 1.0,
        max_gap: float = 1.0,
        gap_start: float | None = None,
        gap_warmup_steps: int = 0,
        backward_fraction: float = 0.0,
    ) -> None:
        if distribution not in PAIR_DISTRIBUTIONS:
            raise ValueError(
                f"Unknown pair distribution {distribution!r}; choose one of {list(PAIR_DISTRIBUTIONS)}."
            )
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta (the diagonal fraction) must lie in [0, 1], got {eta}.")
        if not 0.0 < max_gap <= 1.0:
            raise ValueError(f"max_gap must lie in (0, 1], got {max_gap}.")
        if not 0.0 <= backward_fraction <= 1.0:
            raise ValueError(f"backward_fraction must lie in [0, 1], got {backward_fraction}.")
        self.distribution, self.eta, self.loc, self.scale = distribution, eta, loc, scale
        self.max_gap, self.gap_warmup_steps = max_gap, gap_warmup_steps
        self.gap_start = max_gap if gap_start is None else gap_start
        self.backward_fraction = backward_fraction

    def gap_cap(self, step: int) -> float:
        """The curriculum's cap :math:`g(k)` on :math:`|t - s|` at training step ``k``."""
        if self.gap_warmup_steps <= 0:
            return self.max_gap
        frac = min(1.0, step / self.gap_warmup_steps)
        return self.gap_start + frac * (self.max_gap - self.gap_start)

    def __call__(
        self,
        batch_size: int,
        *,
        step: int = 0,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> TimePairs:
        n_diag = int(round(self.eta * batch_size))
        n_off = batch_size - n_diag
        kw = dict(loc=self.loc, scale=self.scale, device=device, generator=generator)
        t_diag = sample_times(
            n_diag, "uniform" if self.distribution == "gap" else self.distribution, **kw
        )
        cap = self.gap_cap(step)
        if self.distribution == "gap":
            gap = cap * torch.rand(n_off, device=device, generator=generator)
            s = (1 - gap) * torch.rand(n_off, device=device, generator=generator)
            t = s + gap
        else:
            a = sample_times(n_off, self.distribution, **kw)
            b = sample_times(n_off, self.distribution, **kw)
            s, t = torch.minimum(a, b), torch.maximum(a, b)
            if cap < 1.0:  # shrink the pair towards a random anchor so that t - s <= cap
                t = s + (t - s) * cap
        if self.backward_fraction > 0:
            flip = torch.rand(n_off, device=device, generator=generator) < self.backward_fraction
            s, t = torch.where(flip, t, s), torch.where(flip, s, t)
        diagonal = torch.arange(batch_size, device=device) < n_diag
        return TimePairs(torch.cat([t_diag, s]), torch.cat([t_diag, t]), diagonal)
