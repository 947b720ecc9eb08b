"""Callbacks: a checkpoint on interruption, the run config beside the checkpoints."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["InterruptCheckpoint", "ConfigBesideCheckpoints"]


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C (``KeyboardInterrupt``) or SIGTERM, save ``last.ckpt`` so that
    ``--ckpt_path last`` resumes the run. Any other exception (a non-finite loss, a bug) saves
    nothing, so the last good checkpoint stays as it was."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, err: BaseException):
        if isinstance(err, KeyboardInterrupt | SIGTERMException) and trainer.global_step > 0:
            dirpath = self.checkpoint.dirpath
            path = os.path.join(dirpath, self.checkpoint.CHECKPOINT_NAME_LAST + ".ckpt")
            trainer.save_checkpoint(path)


class ConfigBesideCheckpoints(SaveConfigCallback):
    """LightningCLI's config saver, which also writes ``config.yaml`` next to the checkpoints
    (overwriting it, so a second run into the same directory does not fail)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            os.makedirs(ckpt.dirpath, exist_ok=True)
            path = os.path.join(ckpt.dirpath, self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=True)

    def __getstate__(self) -> dict[str, Any]:  # the parser is not picklable (ddp_spawn)
        return {k: v for k, v in self.__dict__.items() if k not in ("parser",)}
