"""Callbacks: a checkpoint on interruption, the run config beside the checkpoints."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from flowmap.data.base import to_uint8
from flowmap.metrics.digits_extractor import DigitsFeatures
from flowmap.metrics.fid import make_torchmetrics_fid
from flowmap.metrics.two_d import wasserstein2
from flowmap.ode import STAGES
from flowmap.protocols import Sampler

__all__ = ["InterruptCheckpoint", "ConfigBesideCheckpoints", "SampleQuality"]


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


class SampleQuality(L.Callback):
    """At every validation, log sample quality at a few NFE: ``val/w2@<nfe>`` on 2D/vector data
    (exact W2 against ``n`` fresh test samples) or ``val/fid@<nfe>`` on 8×8 digits (torchmetrics
    FID in the shipped digits-CNN features, its states reduced across DDP ranks).

    Any :class:`~flowmap.protocols.Sampler` module works: one whose ``methods`` include ``solver``
    (a teacher) samples with it at each NFE, any other (a flow map) with its default method (that
    many jumps); both use their EMA weights and the same noise (seeded) at every validation.
    """

    def __init__(
        self, nfe: tuple[int, ...] = (1, 2, 4), n: int = 1000, solver: str = "euler", seed: int = 0
    ) -> None:
        if any(int(k) < 1 for k in nfe):
            raise ValueError(f"SampleQuality NFE values must be at least 1, got {list(nfe)}.")
        self.nfe, self.n, self.solver, self.seed = tuple(int(k) for k in nfe), n, solver, seed
        self._reference = None

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not isinstance(module, Sampler):
            return
        method = self.solver if self.solver in module.methods else None
        stages = STAGES.get(method, 1) if method else 1
        dm = trainer.datamodule
        if trainer.sanity_checking or dm is None or not hasattr(dm, "reference_samples"):
            return
        shape = tuple(dm.data_shape)
        image = bool(getattr(dm, "is_image", False))
        if image and shape != (1, 8, 8):
            return  # Inception FID is the report's job (it needs the weights file)
        world, rank = trainer.world_size, trainer.global_rank
        n = self.n - self.n % world if image else self.n
        g = torch.Generator().manual_seed(self.seed)
        x0 = torch.randn(n, *shape, generator=g)
        if image:
            x0 = x0.chunk(world)[rank]  # each rank generates its share; FID states are summed
        x0 = x0.to(module.device)
        if self._reference is None:
            self._reference = dm.reference_samples(min(n, self._max_reference(dm)), "test", 0)
        for nfe in self.nfe:
            if nfe % stages:  # not a whole number of solver steps
                continue
            x = module.generate(x0, nfe, method).x.float().cpu()
            if image:
                value = self._fid(x, trainer)
                module.log(f"val/fid@{nfe}", value, rank_zero_only=False, sync_dist=False)
            else:
                module.log(f"val/w2@{nfe}", wasserstein2(x, self._reference), sync_dist=False)

    @staticmethod
    def _max_reference(dm: Any) -> int:
        counter = getattr(dm, "num_samples", None)
        return counter("test") if counter else 10**9

    def _fid(self, x: Tensor, trainer: L.Trainer) -> float:
        metric = make_torchmetrics_fid(DigitsFeatures())
        real = self._reference.chunk(trainer.world_size)[trainer.global_rank]
        metric.update(to_uint8(real), real=True)
        metric.update(to_uint8(x.clamp(-1, 1)), real=False)
        return float(torch.as_tensor(metric.compute()))
