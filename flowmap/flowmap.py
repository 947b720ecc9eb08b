r"""The flow map :math:`X(s, t, x) = x + (t - s)\,\phi(x, s, t)`, the one owner of the
parameterisation, as EDM's preconditioner is: losses and samplers call :class:`FlowMap`, never its net.

:math:`X(s, s, x) = x` holds exactly by construction, and the diagonal :math:`\phi(x, t, t)` is a
velocity field, so the same network is a teacher (called on the diagonal) and a flow map.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from flowmap.conditioning import NULL_CLASS
from flowmap.paths import AffinePath, Schedule, as_path, as_time, expand_like, time_dtype

__all__ = ["FlowMap", "FlowMapJVP", "JVPMethod", "JVP_MODES"]

JVP_MODES = ("autodiff", "finite_difference")


@dataclass(frozen=True)
class JVPMethod:
    r"""How :meth:`FlowMap.jvp` takes :math:`\dot\phi`, the derivative of :math:`\phi` along a tangent.

    Args:
        mode: ``"autodiff"`` (``torch.func.jvp``: exact; gradients flow through the tangent) or
            ``"finite_difference"``: :math:`(\phi(p + \varepsilon v) - \phi(p - \varepsilon v))
            /2\varepsilon` in float64, one-sided at the ends of :math:`[0, 1]`, with no gradient,
            for stop-gradient targets only (MeanFlow, sCM, the regression forms; FastGen and
            AnyFlow at scale). Its evaluations are plain forwards, so fused attention and FSDP
            serve them; the primal :math:`\phi` is an ordinary forward with gradients.
        precision: ``"float32"`` (autocast off for the JVP and its primal :math:`\phi`) or
            ``"autocast"`` (autodiff in the surrounding autocast dtype, e.g. bf16); a finite
            difference always runs with autocast off (float64 nets stay float64). A
            net with GroupNorm (flowmap's U-Net) takes float32 only: torch's forward AD under
            autocast hands the next convolution a float32 tangent (torch 2.14).
        eps: :math:`\varepsilon` of the finite difference.
        chunks: autodiff: split the rows into this many chunks, each recomputed in the backward
            (activation checkpointing): the tangent pass holds one chunk's activations at a time,
            for one more JVP forward.
    """

    mode: Literal["autodiff", "finite_difference"] = "autodiff"
    precision: Literal["float32", "autocast"] = "float32"
    eps: float = 1e-3
    chunks: int = 1

    def __post_init__(self) -> None:
        if self.mode not in JVP_MODES:
            raise ValueError(f"Unknown JVP mode {self.mode!r}; choose one of {list(JVP_MODES)}.")
        if self.precision not in ("float32", "autocast"):
            raise ValueError(
                f"Unknown JVP precision {self.precision!r}; choose float32 or autocast."
            )
        if not self.eps > 0:
            raise ValueError(f"The finite difference's eps must be positive, got {self.eps}.")
        if self.chunks < 1:
            raise ValueError(f"JVP chunks must be at least 1, got {self.chunks}.")
        if self.mode == "finite_difference" and (self.precision != "float32" or self.chunks > 1):
            raise ValueError(
                "A finite-difference JVP runs in float32 and holds no activations; precision "
                "and chunks apply to autodiff only, so leave them at their defaults."
            )


@dataclass
class FlowMapJVP:
    r"""A value of the map and its directional derivative along a tangent :math:`(\dot x, \dot s, \dot t)`.

    ``dX`` :math:`= \dot x + (\dot t - \dot s)\,\phi + (t - s)\,\dot\phi`, with
    ``dphi`` :math:`= \dot\phi = \dot x\cdot\nabla_x\phi + \dot s\,\partial_s\phi + \dot t\,\partial_t\phi`.
    """

    X: Tensor
    dX: Tensor
    phi: Tensor
    dphi: Tensor


def _accepted_keywords(net: nn.Module) -> set[str] | None:
    """The keyword arguments beyond ``(x, s, t)`` that ``net.forward`` takes (``None``: any)."""
    params = list(inspect.signature(getattr(net, "forward", net)).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params[3:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


class FlowMap(nn.Module):
    r"""Wraps a network :math:`\phi(x, s, t)` as the two-time map :math:`X(s,t,x) = x + (t-s)\,\phi(x,s,t)`.

    Args:
        net: any module called as ``net(x, s, t)`` with ``x`` ``(B, *data_shape)`` and ``s, t``
            ``(B,)``. Conditioning keywords (e.g. a label ``y``) given to the map's methods are
            passed on to the net; ``None`` values are dropped, so a plain ``net(x, s, t)`` serves
            unconditional calls, and a value the net's ``forward`` does not take is an error
            (dropping a label silently would sample the wrong class).
        path: the probability path (schedule) whose ODE the map follows. A distilled map takes the
            teacher's; the losses draw interpolant samples :math:`x_s` from it.
        scale: the guidance scale :math:`w` a map whose net takes no scale input follows (1: the
            conditional flow). Calls with that ``w`` drop it before the net; any other ``w`` is
            an error. A net with a scale input (``guidance_input``) takes every ``w``.

    ``s > t`` is allowed: it runs the map backwards in time (data → noise). The conditioning
    keywords (labels ``y``, scales ``w``) are :math:`X(s, t, x \mid c, w)`'s parameters, never
    differentiated by :meth:`jvp`.
    """

    def __init__(
        self, net: nn.Module, path: str | Schedule | AffinePath = "linear", scale: float = 1.0
    ) -> None:
        super().__init__()
        self.net = net
        self.path = as_path(path)
        self.scale = float(scale)
        self._keywords = _accepted_keywords(net)
        self._group_norm = any(isinstance(m, nn.GroupNorm) for m in net.modules())
        declared = getattr(getattr(net, "condition", None), "guidance_input", None)
        self.takes_scale = (
            bool(declared)
            if declared is not None
            else self._keywords is None or "w" in self._keywords
        )

    def _cond(self, cond: dict[str, Any]) -> dict[str, Any]:
        cond = {k: v for k, v in cond.items() if v is not None}
        w = cond.get("w")
        if w is not None and not self.takes_scale:
            y = cond.get("y")
            fixed = w == self.scale
            if y is not None:
                fixed = fixed | (y == NULL_CLASS)
            if not bool(fixed.all()):
                raise ValueError(
                    f"This flow map follows the guidance scale {self.scale:g} only (its net "
                    "takes no scale input); sample at that scale, or train a net with "
                    "guidance_input: true to choose the scale when sampling."
                )
            del cond["w"]
        if self._keywords is not None:
            foreign = sorted(set(cond) - self._keywords)
            if foreign:
                raise ValueError(
                    f"{type(self.net).__name__}.forward takes no {foreign} argument; use a net "
                    "built for this conditioning or drop it."
                )
        return cond

    def phi(self, x: Tensor, s: float | Tensor, t: float | Tensor, **cond: Any) -> Tensor:
        r"""The chord slope :math:`\phi(x, s, t)`."""
        return self.net(x, as_time(s, x), as_time(t, x), **self._cond(cond))

    def forward(self, x: Tensor, s: float | Tensor, t: float | Tensor, **cond: Any) -> Tensor:
        r""":math:`X(s, t, x) = x + (t - s)\,\phi(x, s, t)`."""
        s, t = as_time(s, x), as_time(t, x)
        return x + expand_like(t - s, x).to(x.dtype) * self.phi(x, s, t, **cond)

    def velocity(self, x: Tensor, t: float | Tensor, **cond: Any) -> Tensor:
        r"""The diagonal :math:`\phi(x, t, t) = \partial_t X(s, t, x)|_{s=t}`, a velocity field :math:`b_t(x)`."""
        t = as_time(t, x)
        return self.phi(x, t, t, **cond)

    def jvp(
        self,
        x: Tensor,
        s: Tensor,
        t: Tensor,
        *,
        dx: Tensor | None = None,
        ds: Tensor | None = None,
        dt: Tensor | None = None,
        method: JVPMethod | None = None,
        tangent_grad: bool = True,
        **cond: Any,
    ) -> FlowMapJVP:
        r""":math:`X`, :math:`\phi` and their derivatives along :math:`(\dot x, \dot s, \dot t)`.

        Only inputs given a tangent are differentiated; conditioning never is. ``method``
        (:class:`JVPMethod`, default autodiff in float32) says how: ``torch.func.jvp``
        (attention on the math backend, which alone has forward-mode AD) or a finite difference.
        With ``tangent_grad`` (autodiff only) one JVP gives :math:`\phi` and :math:`\dot\phi`,
        both with gradients; without it, for a stop-gradient target, :math:`\dot\phi` is taken
        under ``no_grad`` and :math:`\phi` by an ordinary forward, so that the step holds the
        activations of a forward only.
        """
        method = method or JVPMethod()
        x = x.to(time_dtype(x))  # float32 (float64 stays), whatever the surrounding precision
        primals = {"x": x, "s": as_time(s, x), "t": as_time(t, x)}
        given = {k: v for k, v in (("x", dx), ("s", ds), ("t", dt)) if v is not None}
        given = {k: v.to(primals[k].dtype) for k, v in given.items()}
        if not given:
            raise ValueError("FlowMap.jvp needs a tangent for at least one of dx, ds, dt.")
        kwargs = self._cond(cond)
        if method.precision == "autocast" and self._group_norm:
            raise ValueError(
                f"A JVP in the autocast dtype fails inside torch for a net with GroupNorm "
                f"({type(self.net).__name__}); use JVPMethod(precision='float32')."
            )
        if method.mode == "finite_difference" and tangent_grad and torch.is_grad_enabled():
            raise ValueError(
                "A finite-difference JVP carries no gradient in its tangent; call jvp with "
                "tangent_grad=False (a stop-gradient target) or use autodiff."
            )
        if tangent_grad and method.mode == "autodiff":
            value, dphi = self._autodiff(primals, given, kwargs, method)
        else:
            with self._precision(method, x):
                value = self.net(x, primals["s"], primals["t"], **kwargs).to(x.dtype)
            with torch.no_grad():
                if method.mode == "finite_difference":
                    dphi = self._finite_difference(primals, given, kwargs, method.eps)
                else:
                    dphi = self._autodiff(primals, given, kwargs, method)[1]
        s_, t_ = primals["s"], primals["t"]
        gap = expand_like(t_ - s_, value).to(value.dtype)
        zero = torch.zeros_like(s_)
        dgap = (given.get("t", zero) - given.get("s", zero)).to(value.dtype)
        dX = gap * dphi + expand_like(dgap, value) * value
        if dx is not None:
            dX = dX + given["x"].to(value.dtype)
        return FlowMapJVP(X=x + gap * value, dX=dX, phi=value, dphi=dphi)

    @staticmethod
    def _precision(method: JVPMethod, x: Tensor) -> contextlib.AbstractContextManager:
        """Autocast off (``precision="float32"``), or the surrounding precision."""
        if method.precision == "float32":
            return torch.autocast(device_type=x.device.type, enabled=False)
        return contextlib.nullcontext()

    def _autodiff(
        self, primals: dict[str, Tensor], given: dict[str, Tensor], kwargs: dict, method: JVPMethod
    ) -> tuple[Tensor, Tensor]:
        r""":math:`(\phi, \dot\phi)` by ``torch.func.jvp``, in ``method.chunks`` row chunks each
        recomputed in the backward (activation checkpointing) when there are several."""
        keys = tuple(given)
        conds = list(kwargs.items())

        def jvp_rows(x: Tensor, s: Tensor, t: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
            kw = {"x": x, "s": s, "t": t}
            cond = {k: v for (k, _), v in zip(conds, rest[: len(conds)])}
            tangents = rest[len(conds) :]

            def phi(*args: Tensor) -> Tensor:
                at = {**kw, **dict(zip(keys, args))}
                return self.net(at["x"], at["s"], at["t"], **cond)

            with self._precision(method, x), sdpa_kernel(SDPBackend.MATH):
                value, dphi = torch.func.jvp(phi, tuple(kw[k] for k in keys), tangents)
            return value.to(x.dtype), dphi.to(x.dtype)

        args = [primals["x"], primals["s"], primals["t"], *(v for _, v in conds)]
        args += [given[k] for k in keys]
        if method.chunks == 1 or not torch.is_grad_enabled():
            return jvp_rows(*args)
        parts = [
            checkpoint(jvp_rows, *chunk, use_reentrant=False)
            for chunk in zip(*(a.chunk(method.chunks) for a in args))
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _finite_difference(
        self, primals: dict[str, Tensor], given: dict[str, Tensor], kwargs: dict, eps: float
    ) -> Tensor:
        r"""Central difference :math:`(\phi(p + \varepsilon v) - \phi(p - \varepsilon v))/2\varepsilon`
        along :math:`v = (\dot x, \dot s, \dot t)`, taken in float64 from two float32 evaluations
        batched in one call; one-sided (:math:`p` and :math:`p \pm \varepsilon v`) in a row whose
        stencil would take a time out of :math:`[0, 1]` on one side; refused where it would on
        both."""
        s, t = primals["s"], primals["t"]
        ds, dt = given.get("s", torch.zeros_like(s)), given.get("t", torch.zeros_like(t))

        def inside(sign: float) -> Tensor:
            a, b = s + sign * eps * ds, t + sign * eps * dt
            return (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)

        up, down = inside(1.0), inside(-1.0)
        if not bool((up | down).all()):
            raise ValueError(
                f"No finite-difference stencil of eps {eps:g} fits in [0, 1] along this tangent "
                "at some row (its times leave the interval both ways); lower eps or use autodiff."
            )
        lo = torch.where(down, -1.0, 0.0).to(s.dtype)  # stencil ends, in steps of eps
        hi = torch.where(up, 1.0, 0.0).to(s.dtype)
        steps = torch.cat([lo, hi]) * eps
        at = {k: torch.cat([v, v]) for k, v in primals.items()}
        for k, v in given.items():
            at[k] = at[k] + expand_like(steps, at[k]).to(at[k].dtype) * torch.cat([v, v])
        cond = {k: torch.cat([v, v]) for k, v in kwargs.items()}
        with torch.autocast(device_type=s.device.type, enabled=False):
            out = self.net(at["x"], at["s"], at["t"], **cond).double()
        f_lo, f_hi = out.chunk(2)
        width = expand_like((hi - lo).double() * eps, f_lo)
        return ((f_hi - f_lo) / width).to(primals["x"].dtype)

    @torch.no_grad()
    def has_net_to_copy(self, teacher: Any) -> bool:
        """Whether :meth:`warm_start` has something to copy: a net that copies itself, or a
        teacher with a network (a function teacher, e.g. an analytic oracle, has none)."""
        if callable(getattr(self.net, "warm_start", None)):
            return True
        velocity_net = getattr(teacher, "sampling_net", teacher)
        return isinstance(velocity_net, nn.Module) and bool(list(velocity_net.parameters()))

    def warm_start(self, teacher: Any) -> FlowMap:
        r"""Start :math:`\phi` as a copy of the teacher's network, so that :math:`\phi(x, t, t) =
        b_t(x)` and, while the gap branch is untrained, :math:`X(s, t, x) = x + (t - s)\,b_s(x)`:
        one Euler step of the teacher.

        ``teacher`` is a velocity net :math:`v(x, t) = \mathrm{net}(x, t, t)`, or a teacher with
        one (``sampling_net``: a :class:`~flowmap.training.VelocityModule`'s EMA net). A net
        with a ``warm_start(teacher)`` of its own copies itself
        (:class:`~flowmap.teachers.DiffusionStudent`). flowmap's nets have the gap branch built
        in (:class:`~flowmap.nets.TwoTimeEmbedding`); a one-time network gets it from
        :class:`~flowmap.nets.TwoTimeAdapter`.
        """
        own = getattr(self.net, "warm_start", None)
        if callable(own):
            own(teacher)
            return self
        velocity_net = getattr(teacher, "sampling_net", teacher)
        if not self.has_net_to_copy(teacher):
            raise ValueError(
                f"warm_start needs a teacher with a network to copy, and a "
                f"{type(teacher).__name__} has none; set warm_start: false."
            )
        try:
            missing, unexpected = self.net.load_state_dict(velocity_net.state_dict(), strict=False)
        except RuntimeError:
            missing, unexpected = ["(shapes)"], []
        # a student with a guidance-scale input may lack it in the teacher: that branch starts at
        # zero (ConditionEmbedding), so the student begins as the teacher's conditional velocity
        # b(c) at every scale, and training moves it to b^w
        missing = [k for k in missing if not k.startswith("condition.scale.")]
        if missing or unexpected:
            foreign = hasattr(teacher, "prediction")  # a model trained elsewhere
            raise ValueError(
                "Warm start needs the student net to have the teacher's architecture (it may add "
                "guidance_input), but they differ; "
                + (
                    "leave the student's net unset (it is then the teacher's own network) or "
                    "set warm_start: false."
                    if foreign
                    else "copy the teacher's `net` config or set warm_start: false."
                )
            )
        teacher_buffers = dict(velocity_net.named_buffers())
        for name, buf in self.net.named_buffers():  # e.g. the time features' frequencies
            other = teacher_buffers.get(name)
            if other is not None and (other.shape != buf.shape or not torch.equal(other, buf)):
                raise ValueError(
                    f"Warm start needs the student net built as the teacher's, but their fixed "
                    f"buffer {name!r} differs (e.g. another time_scale); copy the teacher's `net` "
                    "config or set warm_start: false."
                )
        return self
