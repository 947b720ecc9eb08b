r"""The teacher: a velocity model :math:`v(x, t) = \mathrm{net}(x, t, t)` trained by conditional flow matching."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowmap.losses.cfm import cfm_loss
from flowmap.losses.pairs import TIME_DISTRIBUTIONS, TimeDistribution
from flowmap.ode import FIXED_STEP_METHODS, solve_adaptive, solve_ode
from flowmap.paths import AffinePath, as_time
from flowmap.protocols import Solution
from flowmap.training.base import FlowModuleBase, fork_rng

__all__ = ["VelocityModule"]


class VelocityModule(FlowModuleBase):
    r"""CFM teacher: minimises :math:`E\,\|\mathrm{net}(x_t, t, t) - \dot x_t\|^2` over
    :math:`t \sim` ``time_distribution`` (uniform or logit-normal(``time_loc``, ``time_scale``)).

    A :class:`~flowmap.protocols.Velocity` (``module(x, t)`` is :math:`b_t(x)` from the EMA net) and a
    :class:`~flowmap.protocols.Sampler` (``generate(x0, nfe, method)`` with a fixed-step solver or
    ``"dopri5"``). AdamW with linear LR warm-up over ``warmup_steps``, then ``lr_schedule``
    (``"constant"`` or ``"cosine"`` decay to 0 at ``trainer.max_steps``); gradient clipping comes from
    the Trainer (``gradient_clip_val``); EMA of the net with ``ema_decay`` (null disables it).
    ``VelocityModule.load_from_checkpoint(path)`` rebuilds it with no arguments.

    Args:
        net: the network, called as ``net(x, t, t)`` (the flow-map nets, on their diagonal).
        schedule: the path :math:`x_t = \alpha_t x_1 + \sigma_t x_0`: ``"linear"`` or ``"cosine"``.
        time_distribution: law of the training times: ``"uniform"`` or ``"logit_normal"``.
        time_loc: location of the logit-normal time law.
        time_scale: scale of the logit-normal time law.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, in steps.
        ema_decay: EMA of the net (null: none); the EMA samples, validates and teaches.
        data_shape: the shape of one sample (filled in from the data).
        lr_schedule: after the warm-up, ``"constant"`` or ``"cosine"`` decay to 0 at max_steps.
    """

    module_kind = "VelocityModule"
    methods = (*FIXED_STEP_METHODS, "dopri5")

    def __init__(
        self,
        net: nn.Module,
        schedule: str = "linear",
        time_distribution: TimeDistribution = "uniform",
        time_loc: float = 0.0,
        time_scale: float = 1.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        data_shape: Sequence[int] | None = None,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        if time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(
                f"Unknown time_distribution {time_distribution!r}; "
                f"choose one of {list(TIME_DISTRIBUTIONS)}."
            )
        self.save_hyperparameters()
        self.path = AffinePath(schedule)
        self._setup_common(net, lr, weight_decay, warmup_steps, ema_decay, data_shape, lr_schedule)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        r"""The teacher's :math:`b_t(x)` from the EMA net (the raw net when EMA is off)."""
        t = as_time(t, x)
        return self.sampling_net(x, t, t)

    def velocity(self, x: Tensor, t: Tensor | float) -> Tensor:
        r"""The teacher's :math:`b_t(x)` (same as calling the module)."""
        return self(x, t)

    def _train_velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t, t)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        hp = self.hparams
        loss = cfm_loss(
            self._train_velocity,
            batch,
            self.path,
            time_distribution=hp.time_distribution,
            loc=hp.time_loc,
            scale=hp.time_scale,
        )
        self.check_finite({"cfm": loss})
        self.log_terms("train", {"loss": loss})
        return loss

    @fork_rng
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        g = torch.Generator(device=batch.device).manual_seed(batch_idx)
        x0 = torch.randn(batch.shape, generator=g, device=batch.device, dtype=batch.dtype)
        t = torch.rand(batch.shape[0], generator=g, device=batch.device)
        self.log_terms("val", {"loss": cfm_loss(self, batch, self.path, x0=x0, t=t)})

    @torch.no_grad()
    def generate(
        self,
        x0: Tensor,
        nfe: int | None = None,
        method: str | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> Solution:
        """Samples from noise ``x0``: a fixed-step ``method`` (default Euler) at ``nfe``, or
        ``"dopri5"`` (adaptive to ``rtol``/``atol``, ``nfe`` ignored; the NFE used is returned)."""
        method = self._check_method(method)
        if method in FIXED_STEP_METHODS:
            return solve_ode(self, x0, method, nfe=self._check_nfe(nfe))
        return solve_adaptive(self, x0, method=method, rtol=rtol, atol=atol)
