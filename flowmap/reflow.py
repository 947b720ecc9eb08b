r"""Reflow (rectified flow's straightening): couplings from a teacher's ODE and how straight a flow is.

A teacher :math:`b` couples each noise :math:`x_0` with its ODE endpoint
:math:`x_1 = \mathrm{ODE}_{0\to1}[b](x_0)` (:func:`draw_couplings`, an adaptive solve). Flow matching
on those pairs instead of independent ones (:class:`~flowmap.data.CouplingDataModule`, a
:class:`~flowmap.training.VelocityModule`) gives the 1-rectified flow :math:`b'`, whose marginals
are the teacher's and whose paths cross less, so few Euler steps follow it better; its own
couplings give the 2-rectified flow, and so on (Liu, Gong & Liu, Rectified flow, 2022; InstaFlow).
A reflowed teacher can be distilled into a flow map like any other.

How straight a flow is (the same ODE, solved once on a fine grid):

* :func:`straightness` — :math:`S(b) = \int_0^1 E\,\|(x_1 - x_0) - b_t(x_t)\|^2\,dt` along the
  flow's own paths (Liu et al.'s measure; 0 for straight paths at constant speed);
* :func:`euler_error` — the one-Euler-step error :math:`E\,\|x_0 + b_0(x_0) - x_1\|`.

Couplings are stored as safetensors (``x0``, ``x1``, optionally ``y``) by
:func:`save_couplings`, with the teacher's identity in the metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowmap.io import UnsafeFileError, load_safetensors
from flowmap.ode import solve_adaptive, solve_ode
from flowmap.paths import as_time
from flowmap.protocols import Velocity

__all__ = [
    "draw_couplings",
    "save_couplings",
    "load_couplings",
    "couplings_source",
    "straightness",
    "euler_error",
]


@torch.no_grad()
def draw_couplings(
    velocity: Velocity,
    n: int,
    shape: Sequence[int],
    *,
    batch: int = 4096,
    seed: int = 0,
    labels: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    r"""``n`` couplings :math:`(x_0, x_1 = \mathrm{ODE}_{0\to1}[b](x_0))`, :math:`x_0 \sim N(0, I)`
    from ``seed``, solved by dopri5 in batches of ``batch``. ``labels`` ``(n,)`` condition a
    class-conditional teacher (``velocity(x, t, y=...)``) and are returned as ``y``. Returns
    ``{"x0", "x1"[, "y"]}`` on the CPU."""
    if n < 1 or batch < 1:
        raise ValueError(f"draw_couplings needs n >= 1 and batch >= 1, got {n} and {batch}.")
    if labels is not None and labels.shape != (n,):
        raise ValueError(
            f"labels must have shape ({n},), one per coupling, not {tuple(labels.shape)}."
        )
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g)
    ends = []
    for i in range(0, n, batch):
        cond = None if labels is None else {"y": labels[i : i + batch].to(device)}
        x = x0[i : i + batch].to(device)
        ends.append(solve_adaptive(velocity, x, rtol=rtol, atol=atol, cond=cond).x.cpu())
    out = {"x0": x0, "x1": torch.cat(ends)}
    if labels is not None:
        out["y"] = labels.cpu()
    return out


def save_couplings(
    path: str | os.PathLike[str],
    couplings: Mapping[str, Tensor],
    teacher: str = "",
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"x0", "x1"[, "y"]}`` to a safetensors file, with the ``teacher``'s identity and
    the hyperparameters of the ``data`` it was trained on (JSON) in the metadata. Returns the path."""
    from safetensors.torch import save_file

    _check(couplings, str(path))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in couplings.items()}
    meta = {"teacher": teacher, "count": str(len(tensors["x0"])), "data": json.dumps(data or {})}
    save_file(tensors, str(p), metadata=meta)
    return p


def couplings_source(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The hyperparameters of the data the couplings' teacher was trained on (``{}``: unknown)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return dict(json.loads(meta.get("data") or "{}"))


def load_couplings(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The couplings of :func:`save_couplings` (safetensors only; no code runs)."""
    couplings = load_safetensors(path, what="couplings file")
    _check(couplings, str(path))
    return couplings


def _check(couplings: Mapping[str, Tensor], where: str) -> None:
    x0, x1 = couplings.get("x0"), couplings.get("x1")
    if x0 is None or x1 is None or x0.shape != x1.shape:
        raise UnsafeFileError(
            f"The couplings {where!r} need tensors x0 and x1 of one shape (noise and its ODE "
            "endpoint); write them with flowmap.reflow.save_couplings."
        )
    y = couplings.get("y")
    if y is not None and y.shape != (x0.shape[0],):
        raise UnsafeFileError(f"The couplings {where!r} have labels y not of shape (count,).")


@torch.no_grad()
def straightness(
    velocity: Velocity, x0: Tensor, steps: int = 64, cond: Mapping[str, Tensor] | None = None
) -> float:
    r""":math:`S(b) = \int_0^1 E\,\|(x_1 - x_0) - b_t(x_t)\|^2 dt` (mean over dimensions) along the
    paths of ``steps`` RK4 steps from ``x0``, the integral by the trapezoid rule on that grid."""
    path = [x0]
    x = x0
    for k in range(steps):
        x = solve_ode(velocity, x, "rk4", steps=1, t0=k / steps, t1=(k + 1) / steps, cond=cond).x
        path.append(x)
    chord = path[-1] - x0
    gaps = []
    for k, xt in enumerate(path):
        b = velocity(xt, as_time(k / steps, xt), **(cond or {}))
        gaps.append((chord - b).pow(2).flatten(1).mean(1).mean())
    g = torch.stack(gaps)
    return float((g[1:] + g[:-1]).mean() / 2)


@torch.no_grad()
def euler_error(
    velocity: Velocity, x0: Tensor, x1: Tensor, cond: Mapping[str, Tensor] | None = None
) -> float:
    r"""One Euler step's error :math:`E\,\|x_0 + b_0(x_0) - x_1\|` (Euclidean per sample) against the
    endpoints ``x1`` of the same ODE (e.g. :func:`~flowmap.ode.solve_adaptive`)."""
    one = solve_ode(velocity, x0, "euler", steps=1, cond=cond).x
    return float((one - x1).flatten(1).norm(dim=1).mean())
