r"""What every flow-map loss shares: the JVP, the regression step, the diagonal and the batch split.

Notation (DESIGN §4): :math:`X(s,t,x) = x + (t-s)\phi(x,s,t)`, teacher velocity :math:`b_t(x)`,
:math:`\mathrm{sg}` stop-gradient, :math:`x_s` an interpolant sample at time :math:`s`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowmap.flowmap import FlowMap, as_time
from flowmap.losses.pairs import TimePairs, TimePairSampler
from flowmap.losses.weighting import LossWeighting
from flowmap.paths import AffinePath, expand_like

__all__ = [
    "Velocity",
    "phi_jvp",
    "mean_square",
    "regression_loss",
    "diagonal_residual",
    "FlowMapLoss",
]

Velocity = Callable[[Tensor, Tensor], Tensor]


def phi_jvp(
    flow_map: FlowMap,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    dx: Tensor | None = None,
    ds: Tensor | None = None,
    dt: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r""":math:`\phi(x,s,t)` and its directional derivative :math:`\dot x\cdot\nabla_x\phi + \dot s\,\partial_s\phi
    + \dot t\,\partial_t\phi` in one ``torch.func.jvp``, in float32 (autocast off).

    Only the inputs given a tangent are differentiated; the others are closed over as constants.
    Attention runs on the math backend inside the JVP (fused kernels lack forward-mode AD).
    """
    names = ("x", "s", "t")
    primals = {"x": x, "s": s, "t": t}
    tangents = {k: v for k, v in zip(names, (dx, ds, dt)) if v is not None}
    if not tangents:
        raise ValueError("phi_jvp needs a tangent for at least one of x, s, t.")
    keys = tuple(tangents)

    def phi(*args: Tensor) -> Tensor:
        kw = {**primals, **dict(zip(keys, args))}
        return flow_map.net(kw["x"], kw["s"], kw["t"])

    # fused attention kernels have no forward-mode AD; the math backend is plain differentiable ops
    with torch.autocast(device_type=x.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        prim = tuple(
            primals[k].float() if primals[k].dtype != torch.float64 else primals[k] for k in keys
        )
        tang = tuple(tangents[k].to(p.dtype) for k, p in zip(keys, prim))
        return torch.func.jvp(phi, prim, tang)


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


def diagonal_residual(flow_map: FlowMap, x_t: Tensor, t: Tensor, target: Tensor) -> Tensor:
    r"""Tangent condition :math:`\phi(x_t, t, t) - \mathrm{target}`, the target being :math:`b_t(x_t)` in
    distillation or :math:`\dot x_t` from scratch (plain CFM on the diagonal)."""
    return flow_map.velocity(x_t, t) - target


class FlowMapLoss(nn.Module):
    r"""Base of the Lagrangian, Eulerian and semigroup losses.

    One call draws :math:`(x_0, x_1)`-interpolants at pairs :math:`(s, t)` from the shared
    :class:`TimePairSampler`, puts the first :math:`\eta B` rows on the diagonal, and returns the
    sample-weighted mean

    .. math:: L = \frac{1}{B}\Big(\sum_{\rm diag} \omega(\|\phi(x_t,t,t) - \beta_t\|^2)
              + \sum_{\rm off} \omega(\ell_{\rm off}(x_s, s, t))\Big),

    with :math:`\beta_t = b_t(x_t)` (distillation) or :math:`\dot x_t` (``teacher=None``:
    self-distillation, whose teacher is :math:`\mathrm{sg}\,\phi(\cdot, t, t)`), :math:`\omega` the
    shared :class:`LossWeighting`, and :math:`\ell_{\rm off}` defined by the subclass.
    """

    name = "flowmap"

    def __init__(
        self,
        pairs: TimePairSampler | None = None,
        weighting: LossWeighting | None = None,
        schedule: str = "linear",
    ) -> None:
        super().__init__()
        self.pairs = pairs or TimePairSampler()
        self.weighting = weighting or LossWeighting()
        self.path = AffinePath(schedule)

    def off_diagonal(
        self, flow_map: FlowMap, teacher: Velocity, x_s: Tensor, s: Tensor, t: Tensor, step: int
    ) -> Tensor:
        """Per-sample off-diagonal loss ``(n_off,)``."""
        raise NotImplementedError

    def forward(
        self,
        flow_map: FlowMap,
        x1: Tensor,
        teacher: Velocity | None = None,
        *,
        x0: Tensor | None = None,
        pairs: TimePairs | None = None,
        step: int = 0,
    ) -> dict[str, Tensor]:
        """Return ``{"loss", "diagonal", <name>}`` (the last two unweighted means, for logging)."""
        x0 = torch.randn_like(x1) if x0 is None else x0
        p = pairs or self.pairs(x1.shape[0], step=step, device=x1.device)
        n = p.n_diag
        p = TimePairs(as_time(p.s, x1), as_time(p.t, x1), n)
        x_s, dx_s = self.path.sample(x0, x1, p.s)
        if teacher is None:

            @torch.no_grad()
            def teacher(x: Tensor, t: Tensor) -> Tensor:
                return flow_map.velocity(x, t)

            diag_target = dx_s[:n]
        else:
            with torch.no_grad():
                diag_target = teacher(x_s[:n], p.t[:n]) if n else x_s[:0]
        parts, out = [], {}
        if n:
            diag = mean_square(diagonal_residual(flow_map, x_s[:n], p.t[:n], diag_target))
            parts.append(self.weighting(diag, p.s[:n], p.t[:n]))
            out["diagonal"] = diag.mean().detach()
        if n < x1.shape[0]:
            off = self.off_diagonal(flow_map, teacher, x_s[n:], p.s[n:], p.t[n:], step)
            parts.append(self.weighting(off, p.s[n:], p.t[n:]))
            out[self.name] = off.mean().detach()
        out["loss"] = torch.cat(parts).mean()
        return out
