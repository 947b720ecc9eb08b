r"""Flow-map distillation (and self-distillation) of :math:`X(s,t,x) = x + (t-s)\phi(x,s,t)`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.checkpoints import CheckpointError, load_module
from flowmap.flowmap import FlowMap
from flowmap.losses import LOSSES, LossWeighting, TimePairSampler, make_loss
from flowmap.modules.base import FlowModuleBase, fork_rng
from flowmap.modules.velocity import VelocityModule
from flowmap.sampling import Solution, sample_flow_map

__all__ = ["FlowMapModule"]


class FlowMapModule(FlowModuleBase):
    r"""Trains a flow map with the ``lagrangian``, ``eulerian`` or ``semigroup`` loss (DESIGN §4).

    With ``teacher_ckpt`` (a :class:`VelocityModule` checkpoint) it distils the teacher: the teacher
    is loaded frozen, in eval mode, with its EMA weights, and is never in the optimiser, the EMA
    or this module's checkpoint. With ``warm_start`` the student starts as a copy of the teacher.
    Without a teacher it self-distils: the teacher is the model's own diagonal
    :math:`\mathrm{sg}\,\phi(\cdot,t,t)`, trained jointly with CFM on the diagonal.

    ``loss_options`` go to the loss class (e.g. ``form``, ``tangent_norm``, ``tangent_warmup_steps``,
    ``split``, ``teacher_gap``, ``teacher_steps``); the pair arguments go to the shared
    :class:`~flowmap.losses.TimePairSampler`; ``weighting`` is ``none``, ``learned`` or ``adaptive``.
    """

    module_kind = "FlowMapModule"

    def __init__(
        self,
        net: nn.Module,
        teacher_ckpt: str | None = None,
        loss: str = "lagrangian",
        loss_options: dict[str, Any] | None = None,
        eta: float = 0.25,
        pair_distribution: str = "uniform",
        pair_loc: float = 0.0,
        pair_scale: float = 1.0,
        max_gap: float = 1.0,
        gap_start: float | None = None,
        gap_warmup_steps: int = 0,
        backward_fraction: float = 0.0,
        weighting: str = "none",
        weighting_p: float = 1.0,
        warm_start: bool = True,
        schedule: str = "linear",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        data_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"Unknown flow-map loss {loss!r}; choose one of {sorted(LOSSES)}.")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta (the diagonal fraction) must lie in [0, 1], got {eta}.")
        if teacher_ckpt is not None and not Path(teacher_ckpt).is_file():
            raise CheckpointError(
                f"Teacher checkpoint {teacher_ckpt!r} does not exist; train a teacher first "
                "(flowmap fit --config .../teacher.yaml) and pass its .ckpt path."
            )
        self.save_hyperparameters()
        pairs = TimePairSampler(
            pair_distribution,
            eta=eta,
            loc=pair_loc,
            scale=pair_scale,
            max_gap=max_gap,
            gap_start=gap_start,
            gap_warmup_steps=gap_warmup_steps,
            backward_fraction=backward_fraction,
        )
        self.loss_fn = make_loss(
            loss,
            pairs=pairs,
            weighting=LossWeighting(weighting, p=weighting_p),
            schedule=schedule,
            **(loss_options or {}),
        )
        self._setup_common(net, lr, weight_decay, warmup_steps, ema_decay, data_shape)
        object.__setattr__(self, "_teacher", None)  # not a submodule: outside optimiser/EMA/ckpt

    # ----------------------------------------------------------------- teacher
    @property
    def teacher(self) -> VelocityModule | None:
        return self._teacher

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.teacher_ckpt is None or self._teacher is not None:
            return
        teacher = load_module(VelocityModule, self.hparams.teacher_ckpt)
        teacher.requires_grad_(False)
        if (
            teacher.data_shape is not None
            and self.data_shape is not None
            and tuple(teacher.data_shape) != tuple(self.data_shape)
        ):
            raise ValueError(
                f"The teacher {self.hparams.teacher_ckpt!r} was trained on data of shape "
                f"{list(teacher.data_shape)} but this data has shape {list(self.data_shape)}; "
                "use the teacher trained on this dataset."
            )
        object.__setattr__(self, "_teacher", teacher)
        if self.hparams.warm_start and stage == "fit":
            try:
                self.net.load_state_dict(teacher.sampling_net.state_dict())
            except RuntimeError:
                raise ValueError(
                    "warm_start needs the student net to have the teacher's architecture, but "
                    "they differ; copy the teacher's `net` config or set warm_start: false."
                ) from None
            if self.ema is not None:
                self.ema.module.load_state_dict(self.net.state_dict())

    def _teacher_velocity(self, x: Tensor, t: Tensor) -> Tensor:
        teacher = self._teacher
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        with torch.no_grad():
            return teacher.velocity(x, t)

    # ----------------------------------------------------------------- training
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.net, self.loss_fn) for p in m.parameters() if p.requires_grad]

    @property
    def student(self) -> FlowMap:
        return FlowMap(self.net)

    @property
    def sampling_flow_map(self) -> FlowMap:
        """The EMA flow map (raw weights if EMA is off)."""
        return FlowMap(self.sampling_net)

    def _terms(self, flow_map: FlowMap, batch: Tensor, **kw: Any) -> dict[str, Tensor]:
        teacher = self._teacher_velocity if self.hparams.teacher_ckpt is not None else None
        if teacher is not None and self._teacher is None:
            raise RuntimeError("The teacher is loaded in setup(); run through a Trainer.")
        return self.loss_fn(flow_map, batch, teacher, step=self.global_step, **kw)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        terms = self._terms(self.student, batch)
        self.check_finite(terms)
        self.log_terms("train", terms)
        return terms["loss"]

    @fork_rng
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        g = torch.Generator(device=batch.device).manual_seed(batch_idx)
        x0 = torch.randn(batch.shape, generator=g, device=batch.device, dtype=batch.dtype)
        with torch.enable_grad():  # the JVP losses need autograd bookkeeping off the no_grad path
            terms = self._terms(self.sampling_flow_map, batch, x0=x0)
        self.log_terms("val", {k: v.detach() for k, v in terms.items()})

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, x0: Tensor, nfe: int = 1, method: str = "flowmap") -> Solution:
        """``nfe`` uniform jumps from noise ``x0`` at :math:`t=0` to data at :math:`t=1`."""
        return sample_flow_map(self.sampling_flow_map, x0, steps=self._check_nfe(nfe))

    @torch.no_grad()
    def invert(self, x1: Tensor, nfe: int = 1) -> Solution:
        """``nfe`` uniform jumps backwards, from data at :math:`t=1` to noise at :math:`t=0`."""
        return sample_flow_map(
            self.sampling_flow_map, x1, steps=self._check_nfe(nfe), t0=1.0, t1=0.0
        )
