r"""A divergence guard: stop a run whose flow map leaves the data's scale, keeping the last good
weights. Plain torch, for any training loop; :class:`~flowmap.training.FlowMapModule` runs one.

Every ``every`` steps the guard jumps a fixed probe of noise :math:`z` from the batch's rows and
conditioning across the whole interval and compares the scale of the jump's end with the data's,

.. math:: \rho = \frac{\mathrm{rms}\,X(0, 1, z)}{\max(\mathrm{rms}\,x_1,\ 1)},

the data's RMS being the largest batch RMS seen (1: the noise's). A map that learns keeps
:math:`\rho` near 1; one whose self-taught velocity runs away grows it by orders of magnitude.
Above ``max_scale`` times :math:`\max(\rho_0, 1)`, :math:`\rho_0` its value at the first check (a
warm start from an odd teacher may begin off the scale), or at a non-finite loss, the guard raises
:class:`DivergenceError` naming the step, before the optimiser step spoils anything::

    guard = DivergenceGuard()
    for k in range(steps):
        x1 = next(batches)
        out = loss(flow_map, x1, None, step=k)
        guard(flow_map, x1, step=k, loss=out["loss"])   # raises on divergence
        opt.zero_grad(); out["loss"].backward(); opt.step()

With ``keep=True`` the weights of the last check that passed are held on the CPU
(:attr:`DivergenceGuard.last_good`, :attr:`DivergenceGuard.last_good_step`), to load back with
``flow_map.load_state_dict(guard.last_good)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from flowmap.flowmap import FlowMap

__all__ = ["DivergenceError", "DivergenceGuard"]


class DivergenceError(FloatingPointError):
    """The flow map left the data's scale (or the loss became non-finite); raised before the
    optimiser step, so no weight is spoiled."""


class DivergenceGuard:
    """Raises :class:`DivergenceError` when the map's one-jump output leaves the data's scale.

    Args:
        max_scale: the largest growth of :math:`\\rho` accepted, a factor on
            :math:`\\max(\\rho_0, 1)`.
        every: check every this many steps (the first step is always checked).
        rows: at most this many rows of the batch make the probe.
        keep: hold a CPU copy of the weights at each check that passed.
        advice: what the error says to do (default: where the kept weights are, and the
            settings that self-distil stably).
    """

    def __init__(
        self,
        max_scale: float = 100.0,
        every: int = 10,
        rows: int = 64,
        keep: bool = True,
        advice: Callable[[], str] | None = None,
    ) -> None:
        if not max_scale > 1:
            raise ValueError(
                f"max_scale must exceed 1 (a ratio to the data's scale), not {max_scale}."
            )
        if every < 1 or rows < 1:
            raise ValueError(f"every and rows must be at least 1, got {every} and {rows}.")
        self.max_scale, self.every, self.rows, self.keep = float(max_scale), every, rows, keep
        self.advice = advice if advice is not None else self._advice
        self.data_rms = 0.0
        self._probe: Tensor | None = None
        self._cond: dict[str, Tensor] = {}
        #: the weights (CPU) and step of the last check that passed (``keep=True``)
        self.last_good: dict[str, Tensor] | None = None
        self.last_good_step: int | None = None
        #: the ratio measured at the first and at the last check
        self.start_ratio: float | None = None
        self.last_ratio: float | None = None

    def observe(self, x1: Tensor, **cond: Tensor | None) -> None:
        """Record the data's scale from a batch; the first batch fixes the probe's noise and
        conditioning (its first ``rows`` rows)."""
        self.data_rms = max(self.data_rms, float(x1.detach().float().pow(2).mean().sqrt()))
        if self._probe is None or self._probe.device != x1.device:
            n = min(self.rows, x1.shape[0])
            g = torch.Generator(device=x1.device).manual_seed(0)
            self._probe = torch.randn(x1[:n].shape, generator=g, device=x1.device, dtype=x1.dtype)
            self._cond = {k: v[:n].detach() for k, v in cond.items() if v is not None}

    @torch.no_grad()
    def ratio(self, flow_map: FlowMap) -> float:
        """:math:`\\rho`, the RMS of :math:`X(0, 1, z)` over the data's (after :meth:`observe`)."""
        if self._probe is None:
            raise RuntimeError("DivergenceGuard.ratio needs a batch first: call observe(x1).")
        z = self._probe
        s, t = z.new_zeros(z.shape[0]), z.new_ones(z.shape[0])
        end = flow_map(z, s, t, **self._cond).float()
        rms = float(end.pow(2).mean().sqrt())
        return rms / max(self.data_rms, 1.0) if math.isfinite(rms) else math.inf

    def check(self, flow_map: FlowMap, step: int, loss: Tensor | float | None = None) -> float:
        """Measure :math:`\\rho` now; raise :class:`DivergenceError` above ``max_scale`` or at a
        non-finite ``loss``, else keep the weights (``keep``). Returns :math:`\\rho`."""
        if loss is not None and not math.isfinite(_value(loss)):
            raise DivergenceError(f"The loss is {_value(loss)} at step {step}. {self.advice()}")
        rho = self.last_ratio = self.ratio(flow_map)
        if self.start_ratio is None and math.isfinite(rho):
            self.start_ratio = rho
        limit = self.max_scale * max(self.start_ratio or 1.0, 1.0)
        if not rho <= limit:
            raise DivergenceError(
                f"The flow map diverged at step {step}: one jump from noise lands {rho:.3g}× the "
                f"data's scale (limit {limit:.3g}×). {self.advice()}"
            )
        if self.keep:
            state = flow_map.state_dict().items()
            self.last_good = {k: v.detach().to("cpu", copy=True) for k, v in state}
            self.last_good_step = step
        return rho

    def __call__(
        self,
        flow_map: FlowMap,
        x1: Tensor,
        step: int,
        loss: Tensor | float | None = None,
        **cond: Tensor | None,
    ) -> float | None:
        """:meth:`observe` the batch; :meth:`check` on the first step, every ``every`` steps and
        at a non-finite loss. Returns :math:`\\rho` when it checked."""
        self.observe(x1, **cond)
        bad = loss is not None and not math.isfinite(_value(loss))
        if bad or self.last_ratio is None or step % self.every == 0:
            return self.check(flow_map, step, loss)
        return None

    def _advice(self) -> str:
        if self.keep and self.last_good is not None:
            kept = (
                f"The weights of step {self.last_good_step} (the last check that passed) are in "
                "guard.last_good: flow_map.load_state_dict(guard.last_good)"
            )
        else:
            kept = "No good weights were kept"
        return (
            f"{kept}; lower the learning rate, or, from scratch, use an unweighted loss with "
            "most rows on the diagonal (flowmap.presets, e.g. build_loss('lsd'))."
        )


def _value(loss: Tensor | float) -> float:
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
