r"""The teacher: a velocity model :math:`v(x, t) = \mathrm{net}(x, t, t)` trained by conditional flow matching."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flowmap.conditioning import Conditioning, guided_velocity
from flowmap.flowmap import FlowMap
from flowmap.losses.cfm import cfm_loss
from flowmap.losses.pairs import TIME_DISTRIBUTIONS, TimeDistribution
from flowmap.ode import FIXED_STEP_METHODS, solve_at_cost
from flowmap.paths import AffinePath, as_time
from flowmap.protocols import Solution
from flowmap.training.base import FlowModuleBase, fork_rng
from flowmap.training.checkpoints import load_module

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

    Class-conditional when its net is (``net.num_classes``): batches are ``(x, y)``, each label is
    replaced by the null class with probability ``label_dropout`` (so one net gives
    :math:`b(x, t \mid c)` and :math:`b(x, t \mid \varnothing)`), and ``module(x, t, y=c, w=w)`` is
    the guided velocity :math:`b^w = b(\varnothing) + w\,(b(c) - b(\varnothing))`, one batched call
    (:func:`~flowmap.conditioning.guided_velocity`).

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
        label_dropout: probability of training a label as the null class (class-conditional
            nets; 0 gives a teacher that cannot be guided). Default 0.1, as in CFG's paper.
        warm_start: a VelocityModule checkpoint whose (EMA) weights the net starts from, e.g. the
            teacher whose couplings a reflow trains on (:class:`~flowmap.data.CouplingDataModule`).

    A batch of couplings ``{"x0", "x1"[, "y"]}`` trains on its own noise: flow matching on the
    pairs :math:`(x_0, x_1)` of a teacher's ODE is reflow (:mod:`flowmap.reflow`).
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
        label_dropout: float = 0.1,
        warm_start: str | None = None,
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
        self.conditioning = Conditioning(self.num_classes, label_dropout)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor | int | None = None,
        w: Tensor | float | None = None,
    ) -> Tensor:
        r"""The teacher's :math:`b_t(x)` from the EMA net (the raw net when EMA is off); for a
        class-conditional net, :math:`b^w_t(x \mid y)` (``w=None``: the conditional, :math:`w = 1`)."""
        t = as_time(t, x)
        if self.num_classes is None and y is None and w is None:
            return self.sampling_net(x, t, t)
        y, w = self.condition(x, y, w)

        def branch(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return self.sampling_net(x, t, t, y=y)

        return guided_velocity(branch, x, t, y, w)

    def condition(
        self, x: Tensor, y: Tensor | int | None, w: Tensor | float | None
    ) -> tuple[Tensor, Tensor | None]:
        """Checked labels and scales ``(B,)`` for a batch ``x`` (1 on null rows), by the policy's
        :meth:`~flowmap.conditioning.Conditioning.velocity_condition`."""
        return self.conditioning.velocity_condition(y, w, x.shape[0], x.device, type(self).__name__)

    def velocity(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor | int | None = None,
        w: Tensor | float | None = None,
    ) -> Tensor:
        r"""The teacher's :math:`b^w_t(x \mid y)` (same as calling the module)."""
        return self(x, t, y=y, w=w)

    def _train_velocity(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self.net(x, t, t, **cond)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        start = self.hparams.get("warm_start")
        if start and stage == "fit" and self.global_step == 0 and not self._started:
            FlowMap(self.net).warm_start(load_module(VelocityModule, start))  # its EMA weights
            self._started = True  # the EMA copies the net at its first update

    _started = False

    def training_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> Tensor:
        hp = self.hparams
        x1, y = self.split_batch(batch)
        y = self.conditioning.drop(y)
        loss = cfm_loss(
            self._train_velocity,
            x1,
            self.path,
            x0=_coupled_noise(batch),
            time_distribution=hp.time_distribution,
            loc=hp.time_loc,
            scale=hp.time_scale,
            cond={} if y is None else {"y": y},
        )
        self.check_finite({"cfm": loss})
        self.log_terms("train", {"loss": loss})
        return loss

    @fork_rng
    def validation_step(self, batch: Tensor | dict[str, Tensor], batch_idx: int) -> None:
        x0 = _coupled_noise(batch)
        batch, y = self.split_batch(batch)
        g = torch.Generator(device=batch.device).manual_seed(batch_idx)
        if x0 is None:
            x0 = torch.randn(batch.shape, generator=g, device=batch.device, dtype=batch.dtype)
        t = torch.rand(batch.shape[0], generator=g, device=batch.device)
        cond = {} if y is None else {"y": y}
        self.log_terms("val", {"loss": cfm_loss(self, batch, self.path, x0=x0, t=t, cond=cond)})

    @torch.no_grad()
    def generate(
        self,
        x0: Tensor,
        nfe: int | None = None,
        method: str | None = None,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        y: Tensor | int | None = None,
        guidance: Tensor | float | None = None,
    ) -> Solution:
        """Samples from noise ``x0``: a fixed-step ``method`` (default Euler) at ``nfe``, or
        ``"dopri5"`` (adaptive to ``rtol``/``atol``, ``nfe`` ignored; the NFE used is returned).

        A class-conditional teacher needs labels ``y`` (an int or ``(B,)``; -1: no class) and
        follows the guided velocity at scale ``guidance`` (default 1: the conditional). The NFE
        counts network evaluations: a guided step evaluates both branches (one doubled batch),
        so it counts 2, and ``nfe`` must then be even."""
        method = self._check_method(method)
        cond: dict[str, Tensor] = {}
        cost = 1
        if self.num_classes is not None or y is not None or guidance is not None:
            y, w = self.condition(x0, y, guidance)
            cond = {"y": y} if w is None else {"y": y, "w": w}
            cost = self.conditioning.cost(w)
        if method in FIXED_STEP_METHODS:
            nfe = self._check_nfe(nfe)
        return solve_at_cost(self, x0, method, nfe, cost=cost, rtol=rtol, atol=atol, cond=cond)


def _coupled_noise(batch: Tensor | dict[str, Tensor] | object) -> Tensor | None:
    """The noise ``x0`` of a batch of couplings (``None``: draw fresh noise)."""
    return batch.get("x0") if isinstance(batch, dict) else None
