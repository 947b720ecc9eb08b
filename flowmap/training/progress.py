"""The progress bar ``flowmap fit`` shows: the stage's name, optimiser steps out of
``trainer.max_steps`` and the loss, e.g.

    teacher ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 1200/3000 0:00:41 • 0:01:02 loss: 0.912

Lightning's own bar counts batches of the current epoch against ``max_epochs`` (``Epoch 0/-2`` when
a run is bounded by ``max_steps`` alone), which says nothing about how far a flowmap stage is.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn

__all__ = ["FlowmapProgressBar", "stage_label"]


def stage_label(pl_module: L.LightningModule, stage: str | None = None) -> str:
    """The stage's name (``"teacher"``, ``"lagrangian"``: the run directory's), else the model
    and its loss (``"FlowMapModule/eulerian"``): short, so the bar fits 80 columns."""
    if stage:
        return stage
    model = type(pl_module).__name__
    loss = getattr(getattr(pl_module, "loss", None), "name", None)
    return f"{model}/{loss}" if isinstance(loss, str) else model


class FlowmapProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled by stage and counting optimiser steps.

    Args:
        stage: the name shown first (``flowmap fit`` passes the last part of
            ``trainer.default_root_dir``, e.g. ``teacher``); ``None`` shows the model alone.
        refresh_rate: redraws per second (0 hides the bar).
        leave: keep the finished bar on the screen.
    """

    def __init__(self, stage: str | None = None, refresh_rate: int = 4, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.stage = stage

    def total_steps(self, trainer: L.Trainer) -> int | None:
        """``trainer.max_steps``, else the steps of ``max_epochs`` epochs, else unknown (None)."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        per_epoch = trainer.num_training_batches
        if trainer.max_epochs and trainer.max_epochs > 0 and math.isfinite(per_epoch):
            steps = math.ceil(per_epoch / max(1, trainer.accumulate_grad_batches))
            return steps * trainer.max_epochs
        return None

    def _train_task(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is None or self.train_progress_bar_id is not None:
            return
        self.train_progress_bar_id = self._add_task(
            self.total_steps(trainer), stage_label(pl_module, self.stage)
        )
        self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled:
            return
        self._train_task(trainer, pl_module)  # one bar for the whole run, not one per epoch
        self.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._train_task(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def configure_columns(self, trainer: L.Trainer) -> list:
        """Lightning's columns without the speed one: the line fits 80 columns with the loss."""
        return [
            c
            for c in super().configure_columns(trainer)
            if not isinstance(c, ProcessingSpeedColumn)
        ]

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The training loss alone, short (the logger's version number and the validation terms
        are in the run's logs)."""
        items = super().get_metrics(trainer, pl_module)
        loss = items.get("train/loss")
        return {} if loss is None else {"loss": f"{float(loss):.3g}"}
