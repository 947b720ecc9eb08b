r"""Confidence intervals for sample-quality metrics: independent replicates or a group jackknife.

A metric computed on ``N`` generated samples is a random variable (the noise seed). Two ways
give it a 95% interval here, both over ``G`` disjoint groups of the same samples — disjoint
groups of i.i.d. samples are independent replicates, exactly as ``G`` noise seeds would be:

* **replicates** (:func:`t_interval`): the metric is computed on each group,
  :math:`θ_1, …, θ_G`; the value is their mean :math:`\barθ` and the interval
  :math:`\barθ ± t_{G-1, 0.975}\, s/\sqrt G` (Student t, :math:`s` the sample standard
  deviation). It covers :math:`\mathbb E[θ_g]`, the metric *at the group's sample size*.
* **jackknife** (:func:`jackknife_interval`): for a metric that must see all ``N`` samples
  (FID, whose bias falls like :math:`1/N`), the value is :math:`\hatθ` on all samples and
  :math:`θ_{(g)}` leaves group ``g`` out; the delete-a-group jackknife variance is
  :math:`\widehat{\mathrm{Var}} = \frac{G-1}{G}\sum_g (θ_{(g)} - \bar θ_{(\cdot)})^2` and the
  interval :math:`\hatθ ± t_{G-1,0.975} \sqrt{\widehat{\mathrm{Var}}}`. Sound for smooth
  functions of sample moments (FID is one of the mean and covariance).

A ratio of two metrics measured on the same noise (a method against the teacher) keeps the
pairing: per-group ratios for replicates, ratios of the full and leave-one-out values for the
jackknife (:meth:`Replicates.ratio`), so the shared noise cancels in the interval.

Both intervals are about the estimator at the stated sample size; neither removes its bias
(an empirical W2 or FID is biased upward at finite ``N``), which is why reports print the
data-against-data floor beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

__all__ = ["Estimate", "Replicates", "jackknife_interval", "t_interval"]

#: Confidence level of every interval the package prints.
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% confidence interval ``[ci_low, ci_high]`` from ``n_seeds`` replicates.

    ``method`` is ``"replicates"`` (mean and Student-t interval over independent groups) or
    ``"jackknife"`` (value on all samples, delete-a-group jackknife interval).
    """

    value: float
    ci_low: float
    ci_high: float
    n_seeds: int
    method: str

    @property
    def half_width(self) -> float:
        """Half the interval's width, :math:`(\\text{ci\\_high} - \\text{ci\\_low})/2`."""
        return 0.5 * (self.ci_high - self.ci_low)

    @property
    def relative_half_width(self) -> float:
        """``half_width / |value|`` (``inf`` when the value is 0)."""
        return self.half_width / abs(self.value) if self.value else math.inf

    def as_dict(self) -> dict[str, float | int | str]:
        """``{"value", "ci_low", "ci_high", "n_seeds", "interval"}`` for ``results.json``."""
        return {
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n_seeds": self.n_seeds,
            "interval": self.method,
        }

    def __format__(self, spec: str) -> str:
        spec = spec or ".4g"
        return f"{self.value:{spec}} ± {self.half_width:.2g}"


def _t_quantile(dof: int) -> float:
    return float(stats.t.ppf(0.5 + LEVEL / 2, dof))


def _finite_values(values: np.ndarray | list[float], what: str, minimum: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) < minimum:
        raise ValueError(f"{what} needs at least {minimum} replicates, got {len(v)}.")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} got non-finite replicate values {v.tolist()}.")
    return v


def t_interval(values: np.ndarray | list[float]) -> Estimate:
    r"""Mean of independent replicates and its Student-t 95% interval,
    :math:`\barθ ± t_{G-1,0.975}\, s/\sqrt G`."""
    v = _finite_values(values, "A t interval", 2)
    mean = float(v.mean())
    half = _t_quantile(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return Estimate(mean, mean - half, mean + half, len(v), "replicates")


def jackknife_interval(full: float, leave_one_out: np.ndarray | list[float]) -> Estimate:
    r"""``full`` with the delete-a-group jackknife 95% interval from the ``G`` leave-one-out values,
    :math:`\hatθ ± t_{G-1,0.975}\sqrt{\tfrac{G-1}{G}\sum_g (θ_{(g)} - \barθ_{(\cdot)})^2}`."""
    v = _finite_values(leave_one_out, "A jackknife interval", 2)
    if not math.isfinite(full):
        raise ValueError(f"A jackknife interval needs a finite full-sample value, got {full}.")
    g = len(v)
    se = math.sqrt((g - 1) / g * float(np.sum((v - v.mean()) ** 2)))
    half = _t_quantile(g - 1) * se
    return Estimate(float(full), full - half, full + half, g, "jackknife")


@dataclass(frozen=True)
class Replicates:
    """The raw material of an :class:`Estimate`: what was computed on the groups.

    ``kind="replicates"``: ``values[g]`` is the metric on group ``g`` (``full`` is unused, the
    estimate is their mean). ``kind="jackknife"``: ``full`` is the metric on all samples and
    ``values[g]`` the metric without group ``g``.
    """

    kind: Literal["replicates", "jackknife"]
    values: np.ndarray
    full: float = math.nan

    def estimate(self) -> Estimate:
        """The value and its 95% interval."""
        if self.kind == "replicates":
            return t_interval(self.values)
        return jackknife_interval(self.full, self.values)

    def ratio(self, other: Replicates) -> Estimate:
        """``self / other`` on the same noise and groups, with its own interval (paired)."""
        if other.kind != self.kind or len(other.values) != len(self.values):
            raise ValueError(
                "A ratio needs two metrics measured the same way on the same groups; got "
                f"{self.kind} × {len(self.values)} and {other.kind} × {len(other.values)}."
            )
        if self.kind == "replicates":
            return t_interval(self.values / other.values)
        return jackknife_interval(self.full / other.full, self.values / other.values)

    def to_array(self) -> np.ndarray:
        """``[full, *values]`` as one float64 array (for caches; the kind is stored apart)."""
        return np.concatenate([[self.full], self.values]).astype(np.float64)

    @classmethod
    def from_array(cls, kind: str, a: np.ndarray) -> Replicates:
        """Inverse of :meth:`to_array`."""
        if kind not in ("replicates", "jackknife"):
            raise ValueError(f"Unknown replicate kind {kind!r}.")
        a = np.asarray(a, dtype=np.float64)
        return cls(kind, a[1:], float(a[0]))  # type: ignore[arg-type]
