r"""The two interfaces callers rely on, so that nothing switches on a concrete type.

* :class:`Velocity` — anything called as ``b(x, t)`` that returns the velocity :math:`b_t(x)` of the
  ODE :math:`\dot x = b_t(x)` (time 0 = noise, 1 = data): a trained
  :class:`~flowmap.training.VelocityModule`, an analytic oracle
  (:class:`~flowmap.oracles.GaussianTarget`), the diagonal of a :class:`~flowmap.FlowMap`, or a
  model from another library wrapped to this convention (:mod:`flowmap.teachers`).
* :class:`Sampler` — anything with ``generate(x0, nfe, method=None) -> Solution``: noise at
  :math:`t=0` to data at :math:`t=1` in ``nfe`` network evaluations. ``methods`` lists the methods it
  accepts, its default first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Velocity", "Sampler", "Solution", "declared_schedule"]


@dataclass
class Solution:
    """Samples and the number of network evaluations (NFE) per sample that produced them."""

    x: Tensor
    nfe: int


@runtime_checkable
class Velocity(Protocol):
    r"""A velocity field :math:`b_t(x)`: ``x`` is ``(B, *data_shape)``, ``t`` is ``(B,)``.

    A teacher declares the probability path it follows with a ``path`` attribute (an
    :class:`~flowmap.paths.AffinePath`); the flow map distilled from it follows the same path.
    A class-conditional teacher also takes keywords, ``b(x, t, y=labels, w=scales)`` (the guided
    velocity, :mod:`flowmap.conditioning`), and says its ``num_classes``.
    """

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


def declared_schedule(velocity: object) -> str | None:
    """The schedule name of the path a velocity declares (``velocity.path.name``), or ``None``."""
    name = getattr(getattr(velocity, "path", None), "name", None)
    return name if isinstance(name, str) else None


@runtime_checkable
class Sampler(Protocol):
    """Something that generates: noise ``x0`` at t = 0 to samples at t = 1 in ``nfe`` evaluations."""

    methods: tuple[str, ...]

    def generate(self, x0: Tensor, nfe: int | None = None, method: str | None = None) -> Solution:
        """Samples from noise ``x0`` in ``nfe`` evaluations with ``method`` (``None``: the default)."""
