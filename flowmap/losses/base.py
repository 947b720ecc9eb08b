r"""What every flow-map loss shares: the batch of pairs, the diagonal, the regression step, weighting.

Notation: :math:`X(s,t,x) = x + (t-s)\phi(x,s,t)`, teacher velocity :math:`b_t(x)`,
:math:`\mathrm{sg}` stop-gradient, :math:`x_s` an interpolant sample at time :math:`s`.

A loss is plain torch: ``loss(flow_map, x1, teacher, step=k) -> {"loss": …, <terms>}`` runs in any
training loop, with or without Lightning; ``teacher=None`` self-distils.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from flowmap.conditioning import NULL_CLASS, Condition, rows
from flowmap.flowmap import FlowMap, JVPMethod
from flowmap.losses.pairs import MIN_SCRATCH_ETA, SCRATCH_ETA, TimePairs, TimePairSampler
from flowmap.losses.weighting import LossWeighting
from flowmap.paths import expand_like
from flowmap.protocols import Velocity, declared_schedule

__all__ = [
    "FlowMapLoss",
    "mean_square",
    "regression_loss",
    "diagonal_residual",
    "chord_slope",
    "guided_conditional_velocity",
]


def mean_square(r: Tensor) -> Tensor:
    """Per-sample mean of squares over all but the batch dimension, ``(B,)``."""
    return r.pow(2).flatten(1).mean(1)


def regression_loss(phi: Tensor, residual: Tensor, tangent_norm: float | None = None) -> Tensor:
    r"""Regression form :math:`\|\phi - \mathrm{sg}(\phi - g)\|^2` with :math:`g = r` or :math:`g = r/(\|r\| + c)`.

    Its gradient is :math:`2 g\cdot\partial_\theta\phi`, the semigradient of :math:`\|r\|^2` with every
    term of :math:`r` but :math:`\phi` held fixed; with ``tangent_norm = c`` the residual is normalised
    per sample (sCM / AYF tangent normalisation). Returns ``(B,)``.
    """
    g = residual.detach()
    if tangent_norm is not None:
        norm = g.flatten(1).norm(dim=1) / g[0].numel() ** 0.5
        g = g / (expand_like(norm, g) + tangent_norm)
    return mean_square(phi - (phi - g).detach())


def diagonal_residual(
    flow_map: FlowMap, x_t: Tensor, t: Tensor, target: Tensor, cond: Condition | None = None
) -> Tensor:
    r"""Tangent condition :math:`\phi(x_t, t, t) - \mathrm{target}`, the target being :math:`b_t(x_t)` in
    distillation or :math:`\dot x_t` from scratch (plain CFM on the diagonal)."""
    return flow_map.velocity(x_t, t, **(cond or {})) - target


@torch.no_grad()
def guided_conditional_velocity(
    flow_map: FlowMap, dx_t: Tensor, x_t: Tensor, t: Tensor, cond: Condition | None
) -> Tensor:
    r"""Self-distillation's guided target (MeanFlow's CFG, with :math:`\kappa = 0`):
    :math:`\tilde v = w\,\dot x_t + (1 - w)\,\mathrm{sg}\,\phi(x_t, t, t \mid \varnothing)`.

    Given :math:`x_t` and :math:`c`, :math:`E[\dot x_t] = b_t(x_t \mid c)`, so
    :math:`E[\tilde v] = b^w_t(x_t \mid c)` once the diagonal has learned :math:`b(\cdot\mid\varnothing)`
    on the label-dropped rows (whose scale is 1, so their target is :math:`\dot x_t`). Returns
    ``dx_t`` itself when every scale is 1 (no extra evaluation)."""
    w = (cond or {}).get("w")
    if w is None or bool((w == 1).all()):
        return dx_t
    if cond.get("y") is None:
        raise ValueError("Guidance scales w need class labels y (guidance mixes the two).")
    null = {"y": torch.full_like(cond["y"], NULL_CLASS), "w": torch.ones_like(w)}
    u = flow_map.velocity(x_t, t, **null)
    scale = expand_like(w, dx_t).to(dx_t.dtype)
    return scale * dx_t + (1 - scale) * u


@torch.no_grad()
def chord_slope(
    x_s: Tensor,
    end: Tensor,
    s: Tensor,
    t: Tensor,
    velocity: Velocity,
    cond: Condition | None = None,
) -> Tensor:
    r"""Slope :math:`(\mathrm{end} - x_s)/(t - s)` of a jump :math:`x_s \to \mathrm{end}`, the :math:`\phi`
    a target jump implies; a zero-length jump takes its limit, the velocity :math:`b_s(x_s)`."""
    gap = expand_like(t - s, x_s).to(x_s.dtype)
    zero = t == s
    slope = (end - x_s) / torch.where(gap == 0, torch.ones_like(gap), gap)
    if zero.any():
        slope[zero] = velocity(x_s[zero], s[zero], **rows(cond, zero))
    return slope


_UNWEIGHTED = LossWeighting("none")


def _check_same_path(flow_map: FlowMap, teacher: Velocity) -> None:
    name = declared_schedule(teacher)
    if name is not None and name != flow_map.path.name:
        raise ValueError(
            f"The teacher follows the {name!r} schedule but the flow map the "
            f"{flow_map.path.name!r} one; build the FlowMap with the teacher's path."
        )


class _SharedTeacherCall:
    r"""A teacher whose first call also evaluates the diagonal target :math:`b_t(x_t)`, so that a
    loss step makes one batched teacher call where it would make two (the diagonal rows and the
    off-diagonal query of the residual, e.g. :math:`b_t(\mathrm{sg}\,X)` or :math:`b_s(x_s)`).
    The conditioning of the diagonal rows, ``cond_diag``, is batched with the call's own."""

    def __init__(
        self, teacher: Velocity, x_diag: Tensor, t_diag: Tensor, cond_diag: Condition
    ) -> None:
        self.teacher, self.x_diag, self.t_diag = teacher, x_diag, t_diag
        self.cond_diag = dict(cond_diag)
        self._diag: Tensor | None = None
        self.path = getattr(teacher, "path", None)

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        if self._diag is not None or self.x_diag.shape[0] == 0 or set(cond) != set(self.cond_diag):
            return self.teacher(x, t, **cond)
        n = x.shape[0]
        both = self.teacher(
            torch.cat([x, self.x_diag.to(x.dtype)]),
            torch.cat([t, self.t_diag]),
            **{k: torch.cat([v, self.cond_diag[k]]) for k, v in cond.items()},
        )
        self._diag = both[n:]
        return both[:n]

    @torch.no_grad()
    def diagonal_target(self) -> Tensor:
        """:math:`b_t(x_t)` on the diagonal rows (from the shared call if there was one)."""
        if self._diag is None:
            self._diag = self.teacher(self.x_diag, self.t_diag, **self.cond_diag)
        return self._diag


class FlowMapLoss(nn.Module, ABC):
    r"""Base of the Lagrangian, Eulerian and semigroup losses.

    One call draws interpolants :math:`x_s` from ``flow_map.path`` at pairs :math:`(s, t)` of the
    :class:`TimePairSampler`, and returns the weighted mean over the batch

    .. math:: L = \frac{1}{B}\Big(\sum_{s=t} \omega(\|\phi(x_t,t,t) - \beta_t\|^2)
              + \sum_{s\neq t} \omega(\ell(x_s, s, t))\Big),

    with :math:`\beta_t = b_t(x_t)` (distillation) or :math:`\dot x_t` (``teacher=None``:
    self-distillation, whose teacher is :math:`\mathrm{sg}\,\phi(\cdot, t, t)`), :math:`\omega` the
    :class:`LossWeighting`, and :math:`\ell` the subclass's :meth:`off_diagonal`.

    Args:
        pairs: the time-pair sampler (default: uniform pairs, diagonal fraction 0.25 with a
            teacher, :data:`~flowmap.losses.pairs.SCRATCH_ETA` = 0.75 without).
        weighting: the per-pair weighting (default: none, or the subclass's with a teacher).
        distillation_weighting: a subclass's default weighting with a teacher (e.g. Lagrangian's
            adaptive); from scratch an unset weighting is none.

    From scratch (``teacher=None``) a default left unset takes its from-scratch value. A loss
    whose off-diagonal target is the model's own (:attr:`trivial_at_identity`) has a trivial
    minimiser there, the identity map :math:`\phi \equiv 0`; only the diagonal's flow matching
    holds the map off it, so such a loss refuses a diagonal share below
    :data:`~flowmap.losses.pairs.MIN_SCRATCH_ETA` and the learned weighting, which divides the
    vanishing off-diagonal rows by their own loss without bound.
    """

    #: the key of the off-diagonal term in the returned dict (default: the class name, lower case,
    #: without "Loss")
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__.removesuffix("Loss").lower()
        # a subclass written as off_diagonal(flow_map, teacher, x_s, s, t, step) still works
        params = inspect.signature(cls.off_diagonal).parameters
        cls._takes_dx_s, cls._takes_cond = "dx_s" in params, "cond" in params

    def __init__(
        self,
        pairs: TimePairSampler | None = None,
        weighting: LossWeighting | None = None,
        distillation_weighting: LossWeighting | None = None,
    ) -> None:
        super().__init__()
        self.pairs = pairs if pairs is not None else TimePairSampler()
        given = weighting if weighting is not None else distillation_weighting
        self.weighting = given if given is not None else LossWeighting("none")
        #: the sampler of a run without a teacher: the given one, or the from-scratch default
        self.scratch_pairs = pairs if pairs is not None else TimePairSampler(eta=SCRATCH_ETA)
        self._weighting_given = weighting is not None

    #: whether the identity map :math:`\phi \equiv 0` zeroes the off-diagonal residual when the
    #: model is its own teacher (Lagrangian, Eulerian, semigroup; not MeanFlow, whose target holds
    #: the data's :math:`\dot x_s`)
    trivial_at_identity: ClassVar[bool] = True

    def settings(self, has_teacher: bool) -> tuple[TimePairSampler, LossWeighting]:
        """The time-pair sampler and weighting of a run with or without a teacher."""
        if has_teacher or self._weighting_given:
            return (self.pairs if has_teacher else self.scratch_pairs), self.weighting
        return self.scratch_pairs, _UNWEIGHTED  # from scratch, unweighted unless given

    #: whether the teacher is a flow map's checkpoint, the frozen reference the student starts
    #: from (reward fine-tuning); any other loss refuses one
    takes_map_teacher: ClassVar[bool] = False

    #: whether the loss can distil a given teacher (MeanFlow's target is the data's own
    #: conditional velocity, so it cannot)
    accepts_teacher: ClassVar[bool] = True

    @property
    def self_taught(self) -> bool:
        """Whether, without a teacher, the loss takes its teacher from the model's own diagonal
        (all but MeanFlow's conditional form), which then needs diagonal rows to learn."""
        return True

    def check_teacher(self, has_teacher: bool) -> None:
        """Refuse a teacher this loss cannot take, or settings that do not self-distil (see the
        class docstring)."""
        if has_teacher and not self.accepts_teacher:
            raise ValueError(
                f"{type(self).__name__} trains from the data's conditional velocity and takes no "
                "teacher; drop the teacher to train from scratch, or distil with EulerianLoss."
            )
        if has_teacher:
            return
        pairs, weighting = self.settings(False)
        if self.self_taught and pairs.eta == 0:
            raise ValueError(
                f"Self-distillation with {type(self).__name__} takes its teacher from the "
                "model's own diagonal, which pairs.eta = 0 never trains; set pairs.eta > 0 "
                "(Boffi et al. use 0.75) or give a teacher."
            )
        if not self.trivial_at_identity:
            return
        if pairs.eta < MIN_SCRATCH_ETA:
            raise ValueError(
                f"From scratch, {type(self).__name__} learns its velocity on the diagonal rows "
                f"only, and with pairs.eta = {pairs.eta:g} the off-diagonal rows, which the "
                "identity map fits exactly, pull the map onto the identity; set pairs.eta to at "
                f"least {MIN_SCRATCH_ETA:g} (unset: {SCRATCH_ETA:g}) or give a teacher."
            )
        if weighting.kind == "learned":
            raise ValueError(
                f"From scratch, {type(self).__name__}'s off-diagonal rows are fitted to the "
                "model's own map, which the identity map fits exactly, and a learned weighting "
                "multiplies them by the inverse of their shrinking loss without bound until the "
                "map collapses and then diverges; use weighting none (or adaptive, bounded by "
                "its eps) or give a teacher."
            )

    @property
    def autodiff_jvp(self) -> bool:
        """Whether a training step runs ``torch.func.jvp`` through the net (which FSDP
        supports from torch 2.14 on)."""
        jvp = getattr(self, "jvp", None)
        return isinstance(jvp, JVPMethod) and jvp.mode == "autodiff"

    def _jvp_method(self, jvp: JVPMethod | None, through_tangent: bool) -> JVPMethod:
        """The loss's :class:`~flowmap.flowmap.JVPMethod`, refusing a finite difference where the
        loss back-propagates through the tangent (which a finite difference does not carry)."""
        jvp = jvp if jvp is not None else JVPMethod()
        if through_tangent and jvp.mode == "finite_difference":
            raise ValueError(
                f"{type(self).__name__} with these options back-propagates through the JVP's "
                "tangent, which a finite difference does not carry; use jvp mode autodiff or "
                "a regression form."
            )
        return jvp

    @abstractmethod
    def off_diagonal(
        self,
        flow_map: FlowMap,
        teacher: Velocity,
        x_s: Tensor,
        s: Tensor,
        t: Tensor,
        step: int,
        dx_s: Tensor,
        cond: Condition,
    ) -> Tensor:
        r"""Per-sample loss ``(n,)`` on off-diagonal pairs :math:`s \neq t`; ``dx_s`` is the
        conditional velocity :math:`\dot x_s` of the interpolant samples ``x_s`` (guided, in
        self-distillation with scales: :func:`guided_conditional_velocity`), ``cond`` the rows'
        conditioning (labels ``y``, scales ``w``), passed to every call of the map and the teacher
        and never differentiated. A subclass that needs neither may leave them out."""

    def forward(
        self,
        flow_map: FlowMap,
        x1: Tensor,
        teacher: Velocity | None = None,
        *,
        step: int = 0,
        x0: Tensor | None = None,
        pairs: TimePairs | None = None,
        y: Tensor | None = None,
        w: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Return ``{"loss", "diagonal", <name>}`` (the last two unweighted means, for logging).

        Args:
            flow_map: the map being trained.
            x1: a batch of data.
            teacher: the velocity :math:`b_t(x)` to distil; ``None`` self-distils.
            step: the training step (drives warm-ups and curricula).
            x0: the noise (default: fresh standard normal).
            pairs: the time pairs (default: drawn from ``self.pairs``).
            y: class labels ``(B,)`` (-1: the null class), for a class-conditional map.
            w: guidance scales ``(B,)``: the map learns the flow of the guided velocity
                :math:`b^w` (the teacher is called with ``y`` and ``w``; self-distillation takes
                :func:`guided_conditional_velocity` as its target).
        """
        cond = {k: v for k, v in (("y", y), ("w", w)) if v is not None}
        if cond and not self._takes_cond:
            raise ValueError(
                f"{type(self).__name__}.off_diagonal takes no conditioning (cond), so it cannot "
                "train a class-conditional map; add a cond argument and pass it to every call."
            )
        x0 = torch.randn_like(x1) if x0 is None else x0
        self.check_teacher(teacher is not None)
        sampler, weighting = self.settings(teacher is not None)
        p = pairs if pairs is not None else sampler(x1.shape[0], step=step, device=x1.device)
        p = p.to(x1)
        sample = flow_map.path.sample(x0, x1, p.s)
        x_s = sample.x_t
        d, off = p.diagonal, ~p.diagonal
        shared: _SharedTeacherCall | None = None
        dx_s = sample.dx_t
        if teacher is None:

            @torch.no_grad()
            def teacher(x: Tensor, t: Tensor, **c: Tensor) -> Tensor:
                return flow_map.velocity(x, t, **c)

            dx_s = guided_conditional_velocity(flow_map, dx_s, x_s, p.s, cond)
            diag_target = dx_s[d]  # plain (guided) CFM on the diagonal (s = t there)
        else:
            _check_same_path(flow_map, teacher)
            teacher = shared = _SharedTeacherCall(teacher, x_s[d], p.t[d], rows(cond, d))
        out: dict[str, Tensor] = {}
        total = x_s.new_zeros(())
        if off.any():  # first: its teacher call also serves the diagonal
            extra = {"dx_s": dx_s[off]} if self._takes_dx_s else {}
            if self._takes_cond:
                extra["cond"] = rows(cond, off)
            ell = self.off_diagonal(flow_map, teacher, x_s[off], p.s[off], p.t[off], step, **extra)
            total = total + weighting(ell, p.s[off], p.t[off]).sum()
            out[self.name] = ell.mean().detach()
        if d.any():
            if shared is not None:
                diag_target = shared.diagonal_target()
            diag = mean_square(
                diagonal_residual(flow_map, x_s[d], p.t[d], diag_target, rows(cond, d))
            )
            total = total + weighting(diag, p.s[d], p.t[d]).sum()
            out["diagonal"] = diag.mean().detach()
        out["loss"] = total / x1.shape[0]
        return out
