r"""Class conditioning and classifier-free guidance (CFG), in one place.

A conditional model is called with keywords: ``b(x, t, y=labels)`` for a velocity,
``X(s, t, x, y=labels, w=scales)`` for a flow map. Labels ``y`` are int64 ``(B,)`` in
``0..K-1``, and :data:`NULL_CLASS` ``= -1`` is the null class :math:`\varnothing` (no label), which
label dropout trains. The guided velocity with scale :math:`w` is

.. math:: b^w_t(x \mid c) = b_t(x \mid \varnothing) + w\,\big(b_t(x \mid c) - b_t(x \mid \varnothing)\big),

so :math:`w = 1` is the conditional velocity and :math:`w = 0` the unconditional one. A flow map
:math:`X(s, t, x \mid c, w)` follows the ODE of :math:`b^w` and takes :math:`w` as an input: one
network evaluation per jump at any scale, where the guided teacher pays two per step (the
conditional and the unconditional branch, here one doubled batch, counted as 2 NFE).

For the null class the scale is irrelevant (:math:`b^w(\cdot\mid\varnothing) = b(\cdot\mid\varnothing)`
for every :math:`w`), so :func:`canonical_scale` sets it to 1 there: a net never sees a null row
with another scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NULL_CLASS",
    "SCALE_LAWS",
    "Condition",
    "as_labels",
    "as_scales",
    "canonical_scale",
    "guidance_cost",
    "guided_velocity",
    "check_scale_law",
    "rows",
    "sample_scales",
]

#: the label of the null class :math:`\varnothing` (label dropout; unconditional branch of CFG)
NULL_CLASS = -1

#: conditioning keywords of a call, e.g. ``{"y": labels, "w": scales}`` (absent keys: none)
Condition = Mapping[str, Tensor]


def rows(cond: Condition | None, index: Tensor) -> dict[str, Tensor]:
    """The conditioning of the rows ``index`` (a mask or indices) of a batch."""
    return {k: v[index] for k, v in (cond or {}).items() if v is not None}


def as_labels(y: Any, batch: int, num_classes: int | None, device: Any = None) -> Tensor | None:
    """Check and broadcast labels: an int or ``(B,)`` integer tensor in ``0..K-1`` (or
    :data:`NULL_CLASS`) → int64 ``(B,)``. ``None`` stays ``None``. One-sentence errors for labels
    given to an unconditional model (``num_classes=None``), of a float dtype or out of range."""
    if y is None:
        return None
    if num_classes is None:
        raise ValueError(
            "Labels were given to a model trained without classes (num_classes unset); drop "
            "the labels, or train a class-conditional model (net num_classes, data labels: true)."
        )
    y = torch.as_tensor(y, device=device)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"Class labels must be integers (int64), got dtype {y.dtype}; pass e.g. "
            "torch.tensor([3, 1], dtype=torch.long)."
        )
    y = y.to(torch.long)
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(
            f"Expected {batch} labels (one per sample) but got shape {list(y.shape)}; pass "
            "one int or a (B,) tensor."
        )
    bad = (y < NULL_CLASS) | (y >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"Class label {int(y[bad][0])} is out of range: this model has {num_classes} "
            f"classes, 0..{num_classes - 1} (and {NULL_CLASS} for no class)."
        )
    return y


def as_scales(w: Any, batch: int, device: Any = None) -> Tensor | None:
    """Check and broadcast guidance scales: a float or ``(B,)`` tensor, finite and ``>= 0``, →
    float32 ``(B,)``. ``None`` stays ``None``."""
    if w is None:
        return None
    w = torch.as_tensor(w, device=device)
    if not w.is_floating_point():
        w = w.to(torch.float32)
    w = w.to(torch.float32)
    if w.ndim == 0:
        w = w.expand(batch)
    if w.shape != (batch,):
        raise ValueError(
            f"Expected one guidance scale or {batch} of them, got shape {list(w.shape)}."
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        bad = w[~torch.isfinite(w) | (w < 0)][0]
        raise ValueError(
            f"The guidance scale must be finite and >= 0 (0: unconditional, 1: conditional, "
            f">1: guided), got {float(bad)}."
        )
    return w


def canonical_scale(y: Tensor | None, w: Tensor | None) -> Tensor | None:
    r"""The scale with null-class rows set to 1 (the scale cannot change :math:`b(\cdot\mid\varnothing)`)."""
    if y is None or w is None:
        return w
    return torch.where(y == NULL_CLASS, torch.ones_like(w), w)


def guidance_cost(w: Tensor | float | None) -> int:
    """Network evaluations per guided velocity call: 1 when every scale is 0 or 1 (one branch
    suffices), else 2 (both branches, one doubled batch)."""
    if w is None:
        return 1
    w = torch.as_tensor(w)
    return 1 if bool(((w == 1) | (w == 0)).all()) else 2


def guided_velocity(
    velocity: Callable[..., Tensor], x: Tensor, t: Tensor, y: Tensor, w: Tensor | None
) -> Tensor:
    r""":math:`b^w = b(\varnothing) + w\,(b(c) - b(\varnothing))` from a conditional velocity
    ``velocity(x, t, y=labels)``, in one batched call of both branches (or of the one branch
    needed when every scale is 0 or 1: the unconditional branch on the rows at 0, the conditional
    on the others). ``w=None`` is :math:`w = 1`."""
    if w is None or bool((w == 1).all()):
        return velocity(x, t, y=y)
    null = torch.full_like(y, NULL_CLASS)
    if bool(((w == 0) | (w == 1)).all()):
        return velocity(x, t, y=torch.where(w == 0, null, y))
    both = velocity(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))
    b_c, b_u = both.chunk(2)
    scale = w.to(b_c.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return b_u + scale * (b_c - b_u)


def check_scale_law(law: str, low: float, high: float) -> None:
    """One-sentence errors for an impossible guidance law (see :func:`sample_scales`)."""
    if law not in SCALE_LAWS:
        raise ValueError(f"Unknown guidance law {law!r}; choose one of {list(SCALE_LAWS)}.")
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < low:
        raise ValueError(
            f"The guidance range must satisfy 0 <= low <= high (finite), got [{low}, {high}]."
        )
    if law == "log_uniform" and low <= 0:
        raise ValueError(
            f"A log-uniform guidance law needs low > 0, got low = {low}; use e.g. [1, 8] "
            "(improved MeanFlow's) or the uniform law."
        )


#: laws of the training guidance scale: fixed (``low``), uniform or log-uniform on ``[low, high]``
SCALE_LAWS = ("fixed", "uniform", "log_uniform")


def sample_scales(
    n: int, law: str, low: float, high: float, device: Any = None, generator=None
) -> Tensor:
    r"""``n`` training guidance scales: ``"fixed"`` (all ``low``), ``"uniform"`` on
    :math:`[\mathrm{low}, \mathrm{high}]` or ``"log_uniform"`` (:math:`\log w` uniform, as improved
    MeanFlow and TVM draw :math:`w \in [1, 8]`)."""
    check_scale_law(law, low, high)
    if law == "fixed":
        return torch.full((n,), float(low), device=device)
    u = torch.rand(n, device=device, generator=generator)
    if law == "uniform":
        return low + (high - low) * u
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * u)
