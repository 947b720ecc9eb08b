"""Callbacks: a checkpoint on interruption, the run config beside the checkpoints, sample
quality during training, the float32 matmul precision of a run."""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from flowmap.codecs import codec_of, pixel_data
from flowmap.metrics.evaluation import W2_GROUP_SIZE, Evaluator
from flowmap.ode import STAGES
from flowmap.protocols import Sampler

__all__ = ["InterruptCheckpoint", "ConfigBesideCheckpoints", "SampleQuality", "MatmulPrecision"]


class InterruptCheckpoint(L.Callback):
    """Where the run's checkpoint is, said once at the end: after a fit, the path of
    ``last.ckpt`` and how to continue; on Ctrl-C (``KeyboardInterrupt``) or SIGTERM, ``last.ckpt``
    is saved first so that ``--ckpt_path last`` resumes the run. Any other exception (a non-finite
    loss, a bug) saves nothing, so the last good checkpoint stays as it was."""

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    @property
    def last_path(self) -> str:
        return os.path.join(self.checkpoint.dirpath, self.checkpoint.CHECKPOINT_NAME_LAST + ".ckpt")

    def _resume_hint(self) -> str:
        config = os.path.join(self.checkpoint.dirpath, "config.yaml")
        given = f"--config {config}" if os.path.isfile(config) else "the same --config"
        return f"`flowmap fit {given} --ckpt_path last`"

    @staticmethod
    def _say(trainer: L.Trainer, line: str) -> None:
        if trainer.is_global_zero:
            sys.stderr.write(f"flowmap: {line}\n")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if os.path.isfile(self.last_path):
            self._say(
                trainer,
                f"saved {self.last_path} at step {trainer.global_step}; train it further "
                f"with {self._resume_hint()} and a larger --trainer.max_steps.",
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, err: BaseException):
        if not isinstance(err, KeyboardInterrupt | SIGTERMException):
            return
        if trainer.global_step == 0:
            self._say(trainer, "interrupted before the first step; no checkpoint saved.")
            return
        # weights_only=False: save the optimiser and loop state too (not torch.load's flag)
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self._say(
            trainer,
            f"interrupted; saved {self.last_path} at step {trainer.global_step}; resume "
            f"with {self._resume_hint()}.",
        )


class ConfigBesideCheckpoints(SaveConfigCallback):
    """LightningCLI's config saver, which also writes ``config.yaml`` next to the checkpoints
    (overwriting it, so a second run into the same directory does not fail)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            os.makedirs(ckpt.dirpath, exist_ok=True)
            path = os.path.join(ckpt.dirpath, self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=True)

    def __getstate__(self) -> dict[str, Any]:
        """For ``ddp_spawn``: the parser is not picklable, so a spawned rank gets the config it
        would write, written out already (:class:`_WrittenConfig`)."""
        state = dict(self.__dict__)
        parser = state.pop("parser", None)
        if parser is not None and not isinstance(parser, _WrittenConfig):
            state["parser"] = _WrittenConfig(parser.dump(self.config, skip_none=False))
        return state


class _WrittenConfig:
    """Stands in for the CLI's parser in a spawned rank: ``save`` writes the config's YAML."""

    def __init__(self, text: str) -> None:
        self.text = text

    def save(self, cfg: Any, path: str, **kwargs: Any) -> None:
        with open(path, "w") as f:
            f.write(self.text)


class SampleQuality(L.Callback):
    """At every validation, log sample quality at a few NFE, measured by the report's own
    :class:`~flowmap.metrics.evaluation.Evaluator` against the same reference (the whole train
    split for images, ``n`` fresh train-split points for vector data): ``val/w2@<nfe>`` (vector
    data) or ``val/fid@<nfe>`` (images), and ``val/precision@<nfe>``, ``val/recall@<nfe>``
    (and ``val/kid@<nfe>`` on images) — the report's numbers at fewer samples.

    Any :class:`~flowmap.protocols.Sampler` module works: one whose ``methods`` include ``solver``
    (a teacher) samples with it at each NFE, any other (a flow map) with its default method (that
    many jumps); both use their EMA weights and the same noise (seeded) at every validation.
    Under DDP/FSDP every rank samples the same ``n`` points (FSDP needs every rank in the
    forward pass) and computes the same values. Images other than 8×8 digits need an
    Inception ``feature`` extractor's weights, so they are measured only when ``feature`` is set.
    A class-conditional module samples every class in equal shares at its default scale (the
    conditional teacher, a flow map's trained scale), against the same reference.
    """

    def __init__(
        self,
        nfe: tuple[int, ...] = (1, 2, 4),
        n: int | None = None,
        solver: str = "euler",
        seed: int = 0,
        groups: int = 5,
        feature: str | None = None,
    ) -> None:
        if any(int(k) < 1 for k in nfe):
            raise ValueError(f"SampleQuality NFE values must be at least 1, got {list(nfe)}.")
        self.nfe, self.n, self.solver, self.seed = tuple(int(k) for k in nfe), n, solver, seed
        self.groups, self.feature = groups, feature
        self._evaluator: Evaluator | None = None

    def sample_count(self, dm: Any) -> int:
        """``n``; unset, 1000 images, or for vector data ``groups`` groups of the report's
        :data:`~flowmap.metrics.evaluation.W2_GROUP_SIZE` points (exact W2 depends on the group
        size, so only then is ``val/w2`` the report's W2 at fewer groups)."""
        if self.n is not None:
            return int(self.n)
        return 1000 if getattr(dm, "is_image", False) else self.groups * W2_GROUP_SIZE

    def evaluator(self, dm: Any) -> Evaluator:
        """The evaluator for ``dm`` (built once): the one ``flowmap report`` builds."""
        if self._evaluator is None:
            n = self.sample_count(dm)
            if not getattr(dm, "is_image", False) and n // self.groups != W2_GROUP_SIZE:
                rank_zero_warn(
                    f"SampleQuality measures W2 over groups of {n // self.groups} points and "
                    f"`flowmap report` over groups of {W2_GROUP_SIZE}; exact W2 grows as groups "
                    "shrink, so the two do not compare (leave n unset to match the report)."
                )
            self._evaluator = Evaluator.for_datamodule(
                dm, n, groups=self.groups, split="train", seed=self.seed, feature=self.feature
            )
        return self._evaluator

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not isinstance(module, Sampler):
            return
        method = self.solver if self.solver in module.methods else None
        stages = STAGES.get(method, 1) if method else 1
        data = trainer.datamodule
        if trainer.sanity_checking or data is None or not hasattr(data, "reference_samples"):
            return
        dm, codec = pixel_data(data), codec_of(data)  # latents are measured decoded
        shape = tuple(dm.data_shape)
        if getattr(dm, "is_image", False) and shape != (1, 8, 8) and self.feature is None:
            return
        evaluator, n = self.evaluator(dm), self.sample_count(dm)
        g = torch.Generator().manual_seed(self.seed)
        x0 = torch.randn(n, *data.data_shape, generator=g).to(module.device)
        k = getattr(module, "num_classes", None)
        labels = {} if k is None else {"y": (torch.arange(n) % k).to(module.device)}
        for nfe in self.nfe:
            if nfe % stages:  # not a whole number of solver steps
                continue
            x = module.generate(x0, nfe, method, **labels).x
            x = (x if codec is None else data.decode(x)).float().cpu()
            for name, est in evaluator.measure(x).estimates().items():
                module.log(f"val/{name}@{nfe}", est.value, rank_zero_only=False, sync_dist=False)


class MatmulPrecision(L.Callback):
    """Sets ``torch.set_float32_matmul_precision`` for the run and restores it after: ``"high"``
    lets float32 matrix products run in TensorFloat-32 on GPUs that have it (about 10 bits of
    mantissa; convolutions already do by default), ``"highest"`` keeps full float32.

    Args:
        precision: ``"highest"``, ``"high"`` or ``"medium"``.
    """

    def __init__(self, precision: str = "high") -> None:
        if precision not in ("highest", "high", "medium"):
            raise ValueError(
                f"Unknown matmul precision {precision!r}; choose highest, high or medium."
            )
        self.precision = precision
        self._before: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.precision)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._before is not None:
            torch.set_float32_matmul_precision(self._before)
            self._before = None
