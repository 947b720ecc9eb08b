r"""Time samplers: single times :math:`t` for CFM and pairs :math:`(s, t)` for flow maps.

One implementation serves every loss. A fraction :math:`\eta` of each batch
lies on the diagonal :math:`s = t`; the rest is drawn off the diagonal from

* ``"uniform"`` — uniform on the triangle :math:`0 \le s < t \le 1` (min/max of two uniforms);
* ``"logit_normal"`` — sorted pair of :math:`\mathrm{sigmoid}(N(\mathrm{loc}, \mathrm{scale}^2))` draws;
* ``"gap"`` — gap-controlled: :math:`t - s \sim U[0, g]`, :math:`s \sim U[0, 1 - (t - s)]`;
* ``"dyadic"`` — shortcut models' grid: :math:`t - s = d = 2^{-k}`, :math:`k` uniform on
  :math:`\{0, \dots, K\}` (``levels`` :math:`= K`), :math:`s` a uniform multiple of :math:`d` in
  :math:`[0, 1 - d]`.

A curriculum caps the gap :math:`t - s \le g(k)` with :math:`g(k)` growing linearly from
``gap_start`` to ``max_gap`` over ``gap_warmup_steps`` training steps (on the dyadic grid: the
levels with :math:`d \le g(k)`). :class:`OneTimePairSampler` draws the pairs :math:`(s, 1)` of a
one-time map (consistency models). With ``backward_fraction``
> 0 that fraction of off-diagonal pairs is swapped to :math:`s > t` (data → noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from flowmap.paths import as_time

__all__ = [
    "sample_times",
    "TimePairs",
    "DEFAULT_ETA",
    "SCRATCH_ETA",
    "MIN_SCRATCH_ETA",
    "TimePairSampler",
    "OneTimePairSampler",
    "TimeDistribution",
    "PairDistribution",
]

TimeDistribution = Literal["uniform", "logit_normal"]
PairDistribution = Literal["uniform", "logit_normal", "gap", "dyadic"]
TIME_DISTRIBUTIONS: tuple[str, ...] = get_args(TimeDistribution)
PAIR_DISTRIBUTIONS: tuple[str, ...] = get_args(PairDistribution)
#: The default diagonal fraction η of distillation.
DEFAULT_ETA = 0.25
#: The default diagonal fraction η from scratch (a loss with no teacher): its velocity is learned on
#: the diagonal alone (Boffi et al. and MeanFlow use 0.75).
SCRATCH_ETA = 0.75
#: The least diagonal share a self-taught loss accepts from scratch: below it the off-diagonal rows,
#: which the identity map fits exactly, pull the map onto the identity.
MIN_SCRATCH_ETA = 0.5


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
        levels: :math:`K`, the finest gap :math:`2^{-K}` of the dyadic grid (default 7: 1/128,
            as shortcut models).
    """

    #: whether every off-diagonal pair ends at data (:class:`OneTimePairSampler`)
    one_time = False

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
        levels: int = 7,
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
        if not 0 <= levels <= 20:
            raise ValueError(
                f"levels (the finest dyadic gap is 2**-levels) must lie in [0, 20], not {levels}."
            )
        self.levels = levels
        if distribution == "dyadic" and min(self.gap_start, max_gap) < 2.0**-levels:
            raise ValueError(
                f"The dyadic grid's finest gap is 2**-{levels} = {2.0**-levels:g}, above the "
                f"gap cap {min(self.gap_start, max_gap):g}; raise gap_start/max_gap or levels."
            )

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
            n_diag, "logit_normal" if self.distribution == "logit_normal" else "uniform", **kw
        )
        s, t = self.off_diagonal_pairs(n_off, self.gap_cap(step), device, generator)
        if self.backward_fraction > 0:
            flip = torch.rand(n_off, device=device, generator=generator) < self.backward_fraction
            s, t = torch.where(flip, t, s), torch.where(flip, s, t)
        diagonal = torch.arange(batch_size, device=device) < n_diag
        return TimePairs(torch.cat([t_diag, s]), torch.cat([t_diag, t]), diagonal)

    def off_diagonal_pairs(
        self,
        n_off: int,
        cap: float,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``n_off`` forward pairs :math:`s < t` with :math:`t - s \le` ``cap``."""
        kw = dict(loc=self.loc, scale=self.scale, device=device, generator=generator)
        if self.distribution == "dyadic":
            levels = [k for k in range(self.levels + 1) if 2.0**-k <= cap + 1e-9]
            k = torch.tensor(levels, device=device)[
                torch.randint(len(levels), (n_off,), device=device, generator=generator)
            ]
            d = torch.pow(2.0, -k.float())
            cells = torch.floor(torch.rand(n_off, device=device, generator=generator) / d)
            s = cells * d
            return s, s + d
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
        return s, t


class OneTimePairSampler(TimePairSampler):
    r"""Pairs :math:`(s, 1)`: the one-time map :math:`f(x, s) = X(s, 1, x)` of consistency models.

    Every off-diagonal pair ends at data, :math:`t = 1`, with :math:`s` from ``distribution``
    (uniform, or logit-normal: sCM's :math:`\tan` law, :math:`\log\frac{1-s}{s} \sim N(P_{mean},
    P_{std}^2)`, is ``loc`` :math:`= -P_{mean}`, ``scale`` :math:`= P_{std}`). The boundary condition
    :math:`f(x, 1) = x` holds by construction, :math:`X(1, 1, x) = x`. A flow map trained only on
    these pairs samples as a consistency model does (:func:`flowmap.ode.sample_consistency`):
    jump to data, re-noise to the next time, jump again.

    Args:
        distribution: ``"uniform"`` or ``"logit_normal"``, the law of :math:`s`.
        eta: diagonal fraction (default 0: consistency models train no velocity).
        loc: location of the logit-normal law.
        scale: scale of the logit-normal law.
    """

    one_time = True

    def __init__(
        self,
        distribution: TimeDistribution = "uniform",
        eta: float = 0.0,
        loc: float = 0.0,
        scale: float = 1.0,
    ) -> None:
        if distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(
                f"A one-time map draws s from {list(TIME_DISTRIBUTIONS)}, not {distribution!r}."
            )
        super().__init__(distribution, eta, loc, scale)

    def off_diagonal_pairs(
        self,
        n: int,
        cap: float,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``n`` pairs :math:`(s, 1)`."""
        kw = dict(loc=self.loc, scale=self.scale, device=device, generator=generator)
        s = sample_times(n, self.distribution, **kw)
        return s, torch.ones_like(s)
