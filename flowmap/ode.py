r"""Samplers with honest NFE accounting.

* :func:`solve_ode` — fixed-step Euler, midpoint, Heun and RK4 for :math:`\dot x = b_t(x)` on a
  uniform or custom time grid. Ask for ``nfe`` (network evaluations) or ``steps``: a user who asks
  for 8 NFE gets exactly 8 NFE (4 Heun steps, 2 RK4 steps); an NFE the method cannot take is an error.
* :func:`solve_adaptive` — an adaptive reference solve (dopri5 and friends through torchdiffeq).
* :func:`sample_flow_map` — composes flow-map jumps :math:`x_{t_{k+1}} = X(t_k, t_{k+1}, x_{t_k})`;
  a decreasing grid runs the map backwards (data → noise).
* :func:`sample_consistency` — a one-time map's multistep sampling (consistency models): jump to
  data, re-noise to the next time of the grid, jump again.

Every function returns a :class:`Solution` with the samples and the NFE actually counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torchdiffeq import odeint

from flowmap.paths import AffinePath, as_time, expand_like
from flowmap.protocols import Solution, Velocity

__all__ = [
    "STAGES",
    "FIXED_STEP_METHODS",
    "time_grid",
    "steps_for_nfe",
    "solve_ode",
    "solve_between",
    "solve_adaptive",
    "solve_at_cost",
    "sample_flow_map",
    "sample_consistency",
]

#: network evaluations per step of each fixed-step method
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
FIXED_STEP_METHODS = tuple(STAGES)


def _given(cond: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """The conditioning keywords that are set (``None`` values dropped)."""
    return {k: v for k, v in (cond or {}).items() if v is not None}


class _Counted:
    """Wraps a velocity ``b(x, t, **cond)``, counting calls (one call = one NFE for the whole
    batch; a guided call's second branch is counted by its caller)."""

    def __init__(self, velocity: Velocity, cond: Mapping[str, Tensor] | None = None) -> None:
        self.velocity, self.nfe = velocity, 0
        self.cond = _given(cond)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.velocity(x, as_time(t, x), **self.cond)


def time_grid(
    steps: int | None = None,
    grid: Sequence[float] | Tensor | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
) -> Tensor:
    """A float64 time grid: ``steps`` uniform steps from ``t0`` to ``t1``, or a given strictly monotone ``grid``."""
    if grid is not None:
        g = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if g.numel() < 2:
            raise ValueError(f"A time grid needs at least 2 points, got {g.tolist()}.")
        d = g.diff()
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError(
                f"The time grid {g.tolist()} is not strictly monotone; give increasing times "
                "(noise → data) or decreasing times (data → noise)."
            )
        return g
    if steps is None or int(steps) < 1:
        raise ValueError(f"The number of steps must be at least 1, got {steps}.")
    return torch.linspace(t0, t1, int(steps) + 1, dtype=torch.float64)


def steps_for_nfe(method: str, nfe: int) -> int:
    """Number of steps of ``method`` that use exactly ``nfe`` evaluations; an error if there is none."""
    if method not in STAGES:
        raise ValueError(f"Unknown solver {method!r}; choose one of {list(STAGES)} or 'dopri5'.")
    if int(nfe) < 1:
        raise ValueError(f"NFE must be at least 1, got {nfe}.")
    k = STAGES[method]
    if nfe % k:
        raise ValueError(
            f"{method} uses {k} NFE per step, so it cannot take exactly {nfe} NFE; "
            f"ask for a multiple of {k}."
        )
    return nfe // k


def _step(method: str, f: _Counted, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
    """One step of ``method`` from times ``t`` ``(B,)`` by ``dt`` (scalar or ``(B,)``)."""
    h = expand_like(dt, x).to(x.dtype)
    if method == "euler":
        return x + h * f(x, t)
    if method == "midpoint":
        return x + h * f(x + 0.5 * h * f(x, t), t + 0.5 * dt)
    if method == "heun":
        k1 = f(x, t)
        k2 = f(x + h * k1, t + dt)
        return x + 0.5 * h * (k1 + k2)
    if method == "rk4":
        k1 = f(x, t)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * dt)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * dt)
        k4 = f(x + h * k3, t + dt)
        return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"Unknown solver {method!r}; choose one of {list(STAGES)}.")


def solve_ode(
    velocity: Velocity,
    x: Tensor,
    method: str = "euler",
    *,
    nfe: int | None = None,
    steps: int | None = None,
    grid: Sequence[float] | Tensor | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    cond: Mapping[str, Tensor] | None = None,
) -> Solution:
    r"""Integrate :math:`\dot x = b_t(x)` from ``x`` at ``t0`` (or ``grid[0]``) with a fixed-step method.

    Give exactly one of ``nfe`` (total evaluations), ``steps`` (uniform steps) or ``grid``.
    ``cond`` (e.g. ``{"y": labels}``) is passed to every call of the velocity, as Meta's
    flow_matching passes its ``model_extras``.
    """
    if sum(a is not None for a in (nfe, steps, grid)) != 1:
        raise ValueError("Give exactly one of nfe=, steps= or grid= to solve_ode.")
    if nfe is not None:
        steps = steps_for_nfe(method, nfe)
    if method not in STAGES:
        raise ValueError(f"Unknown solver {method!r}; choose one of {list(STAGES)}.")
    ts = time_grid(steps, grid, t0, t1)
    f = _Counted(velocity, cond)
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist()):
        t = as_time(a, x)
        x = _step(method, f, x, t, torch.tensor(b - a, dtype=t.dtype, device=x.device))
    return Solution(x, f.nfe)


def solve_between(
    velocity: Velocity,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    *,
    steps: int = 1,
    method: str = "heun",
    cond: Mapping[str, Tensor] | None = None,
) -> Solution:
    r"""Integrate from per-sample start times ``s`` ``(B,)`` to end times ``t`` ``(B,)`` in ``steps`` uniform steps.

    Used for teacher targets on many short jumps at once (each row has its own interval).
    """
    if int(steps) < 1:
        raise ValueError(f"The number of steps must be at least 1, got {steps}.")
    s, t = as_time(s, x), as_time(t, x)
    f = _Counted(velocity, cond)
    for k in range(int(steps)):
        x = _step(method, f, x, s + (t - s) * (k / steps), (t - s) / steps)
    return Solution(x, f.nfe)


def solve_adaptive(
    velocity: Velocity,
    x: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t0: float = 0.0,
    t1: float = 1.0,
    cond: Mapping[str, Tensor] | None = None,
) -> Solution:
    """Adaptive reference solve from ``t0`` to ``t1`` with torchdiffeq; NFE is what the solver used."""
    f = _Counted(velocity, cond)

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        return f(y, t)

    ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    y = odeint(rhs, x, ts, method=method, rtol=rtol, atol=atol)[-1]
    return Solution(y, f.nfe)


def solve_at_cost(
    velocity: Velocity,
    x: Tensor,
    method: str,
    nfe: int | None,
    *,
    cost: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    cond: Mapping[str, Tensor] | None = None,
) -> Solution:
    """Sample from noise ``x`` with a fixed-step ``method`` at ``nfe`` network evaluations, or
    adaptively (``nfe`` ignored), when one call of ``velocity`` costs ``cost`` evaluations (2 for
    a guided call, both branches in one batch). The returned NFE counts evaluations."""
    if method in STAGES:
        per_step = STAGES[method] * cost
        if cost > 1 and nfe is not None and nfe % per_step:  # else the solver's own message
            raise ValueError(
                f"A guided {method} step costs {per_step} NFE (both branches at each of its "
                f"{STAGES[method]} stages), so it cannot take exactly {nfe} NFE; ask for a "
                f"multiple of {per_step}."
            )
        sol = solve_ode(velocity, x, method, nfe=None if nfe is None else nfe // cost, cond=cond)
    else:
        sol = solve_adaptive(velocity, x, method=method, rtol=rtol, atol=atol, cond=cond)
    return Solution(sol.x, sol.nfe * cost)


def sample_flow_map(
    flow_map: Callable[[Tensor, Tensor, Tensor], Tensor],
    x: Tensor,
    *,
    steps: int | None = None,
    grid: Sequence[float] | Tensor | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    cond: Mapping[str, Tensor] | None = None,
) -> Solution:
    r"""Compose jumps :math:`x \leftarrow X(t_k, t_{k+1}, x)` over a grid (one NFE per jump).

    ``flow_map(x, s, t)`` is any map with the signature of :meth:`flowmap.FlowMap.forward`. Pass
    ``t0=1, t1=0`` (or a decreasing grid) to invert: data → noise. ``cond`` (e.g. labels and
    guidance scales) is passed to every jump.
    """
    if (steps is None) == (grid is None):
        raise ValueError("Give exactly one of steps= or grid= to sample_flow_map.")
    ts = time_grid(steps, grid, t0, t1)
    kw = _given(cond)
    n = 0
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x = flow_map(x, as_time(a, x), as_time(b, x), **kw)
        n += 1
    return Solution(x, n)


def sample_consistency(
    flow_map: Callable[[Tensor, Tensor, Tensor], Tensor],
    x: Tensor,
    path: AffinePath,
    *,
    steps: int,
    generator: torch.Generator | None = None,
    cond: Mapping[str, Tensor] | None = None,
) -> Solution:
    r"""Multistep sampling of a one-time map :math:`f(x, s) = X(s, 1, x)` (consistency models):
    on the grid :math:`t_k = k/N`, :math:`\hat x = X(t_k, 1, x)`, then
    :math:`x \leftarrow \alpha_{t_{k+1}}\hat x + \sigma_{t_{k+1}} z` with fresh noise :math:`z`
    (``generator``), until the last jump ends at data. One NFE per jump, ``steps`` in all.

    A map trained only on pairs :math:`(s, 1)` has untrained jumps :math:`X(t_k, t_{k+1}, \cdot)`,
    so :func:`sample_flow_map` cannot serve it; each extra step re-noises, and an imperfect
    consistency model can get worse with more of them (Align Your Flow, Thm 3.1).
    """
    if steps < 1:
        raise ValueError(f"A consistency sampler takes at least 1 step, got {steps}.")
    kw = _given(cond)
    one = as_time(1.0, x)
    x1 = flow_map(x, as_time(0.0, x), one, **kw)
    for k in range(1, steps):
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = path.sample(z, x1, as_time(k / steps, x)).x_t
        x1 = flow_map(x, as_time(k / steps, x), one, **kw)
    return Solution(x1, steps)
