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

A model's settings (classes, label dropout, the scales it learns and their law) form one policy,
:class:`Conditioning`, checked once when built; the nets, the modules and the teachers check each
call's labels and scales through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NULL_CLASS",
    "SCALE_LAWS",
    "Condition",
    "Conditioning",
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


def as_labels(
    y: Any,
    batch: int,
    num_classes: int | None,
    device: Any = None,
    owner: str = "model",
    made: str = "trained",
) -> Tensor | None:
    """Check and broadcast labels: an int or ``(B,)`` integer tensor in ``0..K-1`` (or
    :data:`NULL_CLASS`) → int64 ``(B,)``. ``None`` stays ``None``. One-sentence errors for labels
    given to an unconditional model (``num_classes=None``), of a float dtype or out of range;
    ``owner`` and ``made`` name the model in them ("this MLP, built without classes")."""
    if y is None:
        return None
    if num_classes is None:
        raise ValueError(
            f"Labels were given to this {owner}, {made} without classes (num_classes unset); drop "
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
            f"Class label {int(y[bad][0])} is out of range: this {owner} has {num_classes} "
            f"classes, 0..{num_classes - 1} (and {NULL_CLASS} for no class)."
        )
    return y


def as_scales(w: Any, batch: int, device: Any = None) -> Tensor | None:
    """Check and broadcast guidance scales: a float or ``(B,)`` tensor, finite and ``>= 0``, →
    float32 ``(B,)``. ``None`` stays ``None``."""
    if w is None:
        return None
    w = torch.as_tensor(w, device=device).to(torch.float32)
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
        raise ValueError(f"Unknown guidance_law {law!r}; choose one of {list(SCALE_LAWS)}.")
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


@dataclass(frozen=True)
class Conditioning:
    r"""The conditioning policy of one model, checked once when built: :math:`K` classes and the
    null class :math:`\varnothing`, trained on a fraction ``label_dropout`` of the rows, and the
    scales :math:`w \sim` ``law`` on ``guidance = (low, high)`` of the guided flow
    :math:`b^w = b(\varnothing) + w\,(b(c) - b(\varnothing))` that a map learns.

    Args:
        num_classes: :math:`K` (``None``: unconditional).
        label_dropout: the probability of training a row as :math:`\varnothing` (0: the null
            class is never trained, so a velocity cannot guide and a map cannot take label -1).
        guidance: ``(low, high)`` of the trained scales (``(1, 1)``: the conditional flow).
        law: their training law, one of :data:`SCALE_LAWS` (:func:`sample_scales`).
        scale_input: whether :math:`w` is an input of the network (a range of scales needs one).
    """

    num_classes: int | None = None
    label_dropout: float = 0.0
    guidance: tuple[float, float] = (1.0, 1.0)
    law: str = "fixed"
    scale_input: bool = False

    def __post_init__(self) -> None:
        k = self.num_classes
        if k is not None and int(k) < 2:
            raise ValueError(f"num_classes must be at least 2 (or null), got {k}.")
        if self.scale_input and k is None:
            raise ValueError(
                "guidance_input needs class labels (guidance mixes the conditional and the "
                "unconditional velocity); set num_classes too."
            )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}.")
        low, high = (float(v) for v in self.guidance)
        check_scale_law(self.law, low, high)
        if k is None and (low, high) != (1.0, 1.0):
            raise ValueError(
                "Guidance needs a class-conditional net (num_classes) and labelled data; drop "
                "the guidance settings for an unconditional map."
            )
        if high > low and not self.scale_input:
            raise ValueError(
                f"A range of guidance scales [{low}, {high}] needs a net that takes the scale; "
                "set the net's guidance_input: true, or fix one scale (guidance_law: fixed)."
            )
        object.__setattr__(self, "num_classes", None if k is None else int(k))
        object.__setattr__(self, "label_dropout", float(self.label_dropout))
        object.__setattr__(self, "guidance", (low, high))
        object.__setattr__(self, "scale_input", bool(self.scale_input))

    @classmethod
    def of(
        cls,
        num_classes: int | None,
        label_dropout: float = 0.0,
        guidance: float | Sequence[float] = 1.0,
        law: str = "fixed",
        scale_input: bool = False,
    ) -> Conditioning:
        """The policy from a module's settings: ``guidance`` one scale (``law="fixed"``) or
        ``[low, high]`` (the other laws)."""
        values = [float(v) for v in ([guidance] if isinstance(guidance, int | float) else guidance)]
        if law not in SCALE_LAWS:
            raise ValueError(f"Unknown guidance_law {law!r}; choose one of {list(SCALE_LAWS)}.")
        if (law == "fixed") != (len(values) == 1) or not 1 <= len(values) <= 2:
            raise ValueError(
                f"guidance_law {law!r} takes {'one scale' if law == 'fixed' else '[low, high]'}, "
                f"got guidance={values}."
            )
        return cls(num_classes, label_dropout, (values[0], values[-1]), law, scale_input)

    # ----------------------------------------------------------------- what it is
    @property
    def guided(self) -> bool:
        """Whether the map learns a guided flow (some trained scale is not 1)."""
        return self.num_classes is not None and self.guidance != (1.0, 1.0)

    @property
    def null_trained(self) -> bool:
        r"""Whether label dropout trained the null class :math:`\varnothing`."""
        return self.label_dropout > 0

    @property
    def default_scale(self) -> float:
        """The scale a map samples at unless told: its trained one, or 1 inside a trained range."""
        low, high = self.guidance
        return low if low == high or not low <= 1.0 <= high else 1.0

    # ----------------------------------------------------------------- checks of a call
    def _labels(
        self, y: Any, w: Any, batch: int, device: Any, owner: str, made: str
    ) -> Tensor | None:
        """Labels checked: refused by an unconditional model (with a scale too), needed by a
        conditional one."""
        if self.num_classes is None:
            if y is None and w is not None:
                raise ValueError(
                    f"A guidance scale was given to this {owner}, {made} without classes; drop "
                    "it, or train a class-conditional one."
                )
            return as_labels(y, batch, None, owner=owner, made=made)  # labels: an error
        if y is None:
            raise ValueError(
                f"This {owner} is class-conditional ({self.num_classes} classes) and needs labels "
                f"y ({NULL_CLASS} for no class); give labels y=..."
            )
        return as_labels(y, batch, self.num_classes, device, owner, made)

    def check(
        self, y: Any, w: Any, batch: int, device: Any = None, owner: str = "model"
    ) -> tuple[Tensor | None, Tensor | None]:
        """Labels int64 ``(B,)`` and scales float32 ``(B,)`` (1 on null rows), checked
        (:func:`as_labels`, :func:`as_scales`); ``(None, None)`` for an unconditional model."""
        y = self._labels(y, w, batch, device, owner, "trained")
        if y is None:
            return None, None
        return y, canonical_scale(y, as_scales(w, batch, device))

    def velocity_condition(
        self, y: Any, w: Any, batch: int, device: Any = None, owner: str = "model"
    ) -> tuple[Tensor | None, Tensor | None]:
        r""":meth:`check` for a velocity :math:`b^w`, which needs :math:`b(\varnothing)` for
        label -1 and for every :math:`w \ne 1` (both refused without label dropout)."""
        y, w = self.check(y, w, batch, device, owner)
        if y is not None and not self.null_trained:
            needs_null = (y == NULL_CLASS) if w is None else (y == NULL_CLASS) | (w != 1)
            if bool(needs_null.any()):
                raise ValueError(
                    f"This {owner} was trained without label dropout (label_dropout 0), so it "
                    f"has no unconditional velocity (label {NULL_CLASS}, or any w other than 1); "
                    "sample at w=1 with real labels, or retrain it with label_dropout > 0."
                )
        return y, w

    def sampling_condition(
        self, y: Any, w: Any, batch: int, device: Any = None, owner: str = "flow map"
    ) -> dict[str, Tensor]:
        r"""The keywords of a map :math:`X(s, t, x \mid c, w)` sampled at ``w`` (default
        :attr:`default_scale`): checked, inside the trained scales, label -1 only if trained."""
        if self.num_classes is None:
            self.check(y, w, batch, device, owner)  # an error for labels or a scale
            return {}
        y, w = self.check(y, self.default_scale if w is None else w, batch, device, owner)
        if not self.null_trained and bool((y == NULL_CLASS).any()):
            raise ValueError(
                f"This {owner} was trained without label dropout (label_dropout 0), so its null "
                f"class (label {NULL_CLASS}, the unconditional map) was never trained; pass real "
                "labels."
            )
        low, high = self.guidance
        outside = (y != NULL_CLASS) & ((w < low - 1e-6) | (w > high + 1e-6))
        if bool(outside.any()):
            trained = f"scale {low:g} only" if low == high else f"scales [{low:g}, {high:g}]"
            raise ValueError(
                f"This {owner} was trained at the guidance {trained}, not "
                f"{float(w[outside][0]):g}; sample inside what it learned (y={NULL_CLASS} gives "
                "the unconditional map)."
            )
        return {"y": y, "w": w} if self.guided else {"y": y}

    def net_inputs(
        self, y: Tensor | None, w: Tensor | None, owner: str = "net"
    ) -> tuple[Tensor | None, Tensor | None]:
        """What a network's condition embedding takes: checked labels (:func:`as_labels`), and
        the scale only if it is an input (1 when not given)."""
        batch = y.shape[0] if isinstance(y, Tensor) and y.ndim else 1
        y = self._labels(y, w, batch, None, owner, "built")
        if y is None:
            return None, None
        if w is not None and not self.scale_input:
            raise ValueError(
                f"This {owner} takes no guidance scale (guidance_input false); its guidance is "
                "fixed at training, so drop w or build the net with guidance_input: true."
            )
        if w is None and self.scale_input:
            w = torch.ones(y.shape, device=y.device)  # no guidance: the conditional map
        return y, w

    def relabel(self, y: Tensor, null: int | None, owner: str = "model") -> Tensor:
        r"""Labels in a network's own numbering: :math:`\varnothing` (label -1) becomes ``null``
        (its null row, e.g. :math:`K` for an embedding of :math:`K + 1` rows); a network with no
        null label (``null=None``) refuses it."""
        if null is None:
            if bool((y == NULL_CLASS).any()):
                raise ValueError(
                    f"The {owner} has no null class (null_class=None), so it cannot give the "
                    f"unconditional velocity that guidance or label {NULL_CLASS} needs."
                )
            return y
        return torch.where(y == NULL_CLASS, torch.full_like(y, null), y)

    # ----------------------------------------------------------------- training and cost
    def drop(self, y: Tensor | None) -> Tensor | None:
        r"""Label dropout: each label becomes :math:`\varnothing` with probability ``label_dropout``."""
        if y is None or self.label_dropout <= 0:
            return y
        return torch.where(torch.rand(y.shape, device=y.device) < self.label_dropout, NULL_CLASS, y)

    def training_condition(self, y: Tensor | None) -> dict[str, Tensor]:
        """A training batch's keywords: labels after dropout and, for a guided map, scales drawn
        from the law (1 on null rows)."""
        if y is None:
            return {}
        y = self.drop(y)
        if not self.guided:
            return {"y": y}
        low, high = self.guidance
        w = sample_scales(len(y), self.law, low, high, device=y.device)
        return {"y": y, "w": canonical_scale(y, w)}

    @staticmethod
    def cost(w: Tensor | float | None) -> int:
        """Network evaluations per call of the guided velocity (:func:`guidance_cost`)."""
        return guidance_cost(w)
