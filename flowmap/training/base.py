"""What the teacher and flow-map LightningModules share: EMA, optimiser, guards, data shape."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from flowmap.conditioning import Conditioning
from flowmap.training.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    last_checkpoint,
    resume_differences,
    resume_message,
)
from flowmap.training.guard import DivergenceError

__all__ = [
    "FlowModuleBase",
    "NonFiniteLossError",
    "build",
    "fork_rng",
    "lr_factor",
    "LR_SCHEDULES",
]

#: learning-rate schedules after the linear warm-up (:func:`lr_factor`)
LR_SCHEDULES = ("constant", "cosine")

#: Lightning's (allow-listed) instantiator: a checkpoint whose hyperparameters name it is rebuilt
#: from its config by ``load_from_checkpoint(path)``, with no arguments.
_CONFIG_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"

# Nets are constructor arguments on purpose: the CLI records their config (not the object) in the
# hyperparameters, which is what lets `load_from_checkpoint(path)` rebuild them with no arguments.
warnings.filterwarnings("ignore", message=r"Attribute '(net|loss)' is an instance of `nn.Module`")
# A fresh fit into a directory that holds checkpoints is refused (check_fit_directory), so
# Lightning's warning about it is noise; it also fired on a fresh run, for the saved config.yaml.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class NonFiniteLossError(DivergenceError):
    """A loss term became NaN or Inf; raised before the optimiser step, so no weight is spoiled."""


def build(cls: type[L.LightningModule], config: Mapping[str, Any]) -> L.LightningModule:
    """Instantiate ``cls`` from a plain config, as the CLI does, e.g.
    ``build(FlowMapModule, {"net": {"class_path": "flowmap.nets.MLP", "init_args": {...}},
    "loss": {"class_path": "flowmap.losses.EulerianLoss"}})``.

    The module's hyperparameters then hold the config (plain data, defaults filled in), not live
    objects, so its checkpoints load with ``weights_only=True`` and rebuild with no arguments.
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "module", fail_untyped=False)
    cfg = parser.parse_object({"module": dict(config)})
    full = yaml.safe_load(parser.dump(cfg, skip_none=False))["module"]  # defaults filled in
    module = parser.instantiate_classes(cfg).module
    module.save_hyperparameters({**full, "_instantiator": _CONFIG_INSTANTIATOR})
    return module


def lr_factor(step: int, warmup: int, total: int | None, schedule: str = "constant") -> float:
    r"""Learning-rate multiplier at optimiser step ``step`` (0-based): a linear warm-up
    :math:`\min(1, (k+1)/W)` over ``warmup`` steps, then ``"constant"`` 1 or ``"cosine"``
    :math:`\tfrac12(1 + \cos(\pi\,(k - W)/(T - W)))` decaying to 0 at ``total`` steps :math:`T`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"Unknown lr_schedule {schedule!r}; choose one of {list(LR_SCHEDULES)}.")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or not total or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / (total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * frac))


class EMAWithWarmup:
    r"""``avg_fn`` for :class:`~torch.optim.swa_utils.AveragedModel`: EMA with decay warm-up
    :math:`\beta_n = \min(\beta, (1 + n)/(10 + n))` (as in Meta's flow_matching), so that short runs
    are not dominated by the initial weights. A class, not a closure, so modules pickle (ddp_spawn)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        if averaged.data_ptr() == current.data_ptr():  # a frozen parameter the EMA shares
            return averaged
        n = float(num_averaged)
        beta = min(self.decay, (1.0 + n) / (10.0 + n))
        return beta * averaged + (1.0 - beta) * current


def _ema_of(net: nn.Module, decay: float) -> AveragedModel:
    """The EMA of ``net``: a copy of its trainable parameters and buffers; its frozen parameters
    (a LoRA student's base) are ``net``'s own objects, never copied, and stay bit-exact
    (:class:`EMAWithWarmup` leaves a shared tensor as it is)."""
    ema = AveragedModel(nn.Module(), avg_fn=EMAWithWarmup(decay), use_buffers=True)
    shared: dict[int, Any] = {id(p): p for p in net.parameters() if not p.requires_grad}
    ema.module = copy.deepcopy(net, memo=shared)  # the memo hands back the frozen ones
    ema.requires_grad_(False)
    return ema


def _drop_frozen(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    for key in module._frozen_keys():
        state.pop(prefix + key, None)


def _note_load_prefix(module: nn.Module, state: Any, prefix: str, *rest: Any) -> None:
    module._frozen_loading_prefix = prefix


def _forgive_frozen(module: nn.Module, keys: Any) -> None:
    prefix = module.__dict__.pop("_frozen_loading_prefix", None)
    if prefix is not None:
        frozen = {prefix + k for k in module._frozen_keys()}
        keys.missing_keys[:] = [k for k in keys.missing_keys if k not in frozen]


def fork_rng(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` seeded by its batch index inside :func:`torch.random.fork_rng`: validation is
    reproducible and leaves the training RNG untouched (so resumed runs replay exactly)."""

    @functools.wraps(fn)
    def wrapped(self: Any, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_idx)
            return fn(self, batch, batch_idx, *args, **kwargs)

    return wrapped


class FlowModuleBase(L.LightningModule):
    """Holds ``self.net`` and its EMA copy (``torch.optim.swa_utils.AveragedModel``).

    The EMA covers the trained net only (never a frozen teacher, and a net's frozen parameters,
    a LoRA student's base, are shared with it, not copied); it is updated after every
    optimiser step, saved in the checkpoint's ``state_dict`` (so resume is exact) and used for
    validation, sampling and as a teacher.
    """

    module_kind = "base"
    #: sampling methods of :meth:`generate`, its default first (the :class:`~flowmap.protocols.Sampler` protocol)
    methods: tuple[str, ...] = ()

    def _setup_common(
        self,
        net: nn.Module,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        ema_decay: float | None,
        data_shape: Sequence[int] | None,
        lr_schedule: str = "constant",
    ) -> None:
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"The learning rate must be a positive number, got {lr}.")
        lr_factor(0, 0, None, lr_schedule)  # the one check of the schedule's name, raised early
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(
                f"ema_decay must lie in [0, 1) (or be null for no EMA), got {ema_decay}."
            )
        self.net = net
        self.ema = None
        if ema_decay is not None:
            self.ema = _ema_of(net, ema_decay)
        #: names of the net's frozen parameters kept out of the state dict (see below)
        self._frozen: tuple[str, ...] = ()
        self.data_shape = tuple(data_shape) if data_shape is not None else None

    def leave_frozen_out_of_state_dict(self) -> None:
        """From now on, the net's frozen parameters (and the EMA's, the same objects) are left
        out of this module's state dict and not missing when one is loaded: a LoRA student's
        base, which its module rebuilds from the teacher."""
        self._frozen = tuple(n for n, p in self.net.named_parameters() if not p.requires_grad)
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_note_load_prefix)
        self.register_load_state_dict_post_hook(_forgive_frozen)

    def _frozen_keys(self) -> list[str]:
        """The state-dict keys of the frozen parameters left out, in the net and its EMA."""
        keys = [f"net.{n}" for n in self._frozen]
        return keys + ([f"ema.module.{n}" for n in self._frozen] if self.ema is not None else [])

    # ----------------------------------------------------------------- EMA and sampling net
    @property
    def sampling_net(self) -> nn.Module:
        """The EMA net if there is one (and it has been updated), else the raw net."""
        if self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return self.net

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update — before any callback can checkpoint the step."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    # ----------------------------------------------------------------- sharding (FSDP2)
    def sharded_modules(self) -> list[nn.Module]:
        """The modules :meth:`configure_model` shards: the net and its EMA (a frozen teacher
        stays whole on every rank)."""
        return [self.net] + ([self.ema.module] if self.ema is not None else [])

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2), shard by data: each of
        :meth:`sharded_modules` becomes one ``fully_shard`` unit over the data-parallel mesh."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "flowmap shards by data only; give ModelParallelStrategy "
                "data_parallel_size=<devices> and tensor_parallel_size=1."
            )
        data = mesh["data_parallel"] if "data_parallel" in names else mesh
        for module in self.sharded_modules():
            if not isinstance(module, FSDPModule):
                fully_shard(module, mesh=data)

    # ----------------------------------------------------------------- classes
    @property
    def num_classes(self) -> int | None:
        """The number of classes of a class-conditional net (``None``: unconditional)."""
        condition = getattr(self.net, "condition", None)  # flowmap's nets; a DiffusionStudent says
        return getattr(condition, "num_classes", getattr(self.net, "num_classes", None))

    #: the conditioning policy (classes, label dropout, guidance), set by each module
    conditioning: Conditioning

    def split_batch(self, batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """A batch ``x``, ``(x, y)`` or couplings ``{"x1", "x0"[, "y"]}`` → ``(x, y)``, with the
        labels checked by the policy."""
        if isinstance(batch, Tensor):
            x, y = batch, None
        elif isinstance(batch, dict):
            x, y = batch["x1"], batch.get("y")
        else:
            x, y = batch[0], batch[1]
        if self.num_classes is None:
            return x, None  # a labelled dataset is refused in setup; here labels are ignored
        if y is None:
            raise ValueError(
                f"This {type(self).__name__} is class-conditional ({self.num_classes} classes) "
                "but its batches carry no labels; use data with labels: true."
            )
        return x, self.conditioning.check(y, None, x.shape[0], x.device, type(self).__name__)[0]

    # ----------------------------------------------------------------- data shape
    def setup(self, stage: str) -> None:
        try:
            dm = getattr(self.trainer, "datamodule", None)
        except RuntimeError:  # not attached to a Trainer
            dm = None
        if dm is not None and stage == "fit" and hasattr(dm, "num_classes"):
            self._check_data_classes(dm.num_classes)  # a flowmap DataModule says its classes
        shape = getattr(dm, "data_shape", None)
        if shape is not None:
            shape = tuple(int(d) for d in shape)
            if self.data_shape is not None and self.data_shape != shape:
                raise ValueError(
                    f"This {type(self).__name__} was built for data of shape {list(self.data_shape)} "
                    f"but the data has shape {list(shape)}; use matching data or a new model."
                )
            self.data_shape = shape
            self.hparams["data_shape"] = list(shape)

    def _check_data_classes(self, data_classes: int | None) -> None:
        """A conditional net needs labelled data with its number of classes, and an
        unconditional one unlabelled data: one sentence each, before the first step."""
        mine = self.num_classes
        if mine is None and data_classes is not None:
            raise ValueError(
                f"The data yields labels ({data_classes} classes) but the net is unconditional; "
                "set the net's num_classes to train a class-conditional model, or labels: false."
            )
        if mine is not None and data_classes is None:
            raise ValueError(
                f"The net is class-conditional ({mine} classes) but the data yields no labels; "
                "set the data's labels: true."
            )
        if mine is not None and mine != data_classes:
            raise ValueError(
                f"The net was built for {mine} classes but the data has {data_classes}; set the "
                f"net's num_classes: {data_classes}."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["flowmap_module"] = self.module_kind
        checkpoint["flowmap_format"] = CHECKPOINT_FORMAT
        # the RNG state drives the noise and times of the next step: saving it makes resume exact
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng_state = checkpoint.get("torch_rng_state")
        #: the hyperparameters of the data this module was trained on (``None``: not recorded)
        self.trained_on = checkpoint.get("datamodule_hyper_parameters")
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":
            self._check_resume(checkpoint, trainer)

    def _check_resume(self, checkpoint: dict[str, Any], trainer: L.Trainer) -> None:
        """``trainer.fit(model, ckpt_path=...)`` from Python under another model config or
        dataset is an error (the CLI checks the same before it writes anything)."""
        dm = getattr(trainer, "datamodule", None)
        data = dict(dm.hparams) if dm is not None else None
        diffs = resume_differences(checkpoint, dict(self.hparams), data)
        if diffs:
            raise CheckpointError(resume_message(trainer.ckpt_path, diffs))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        state = getattr(self, "_pending_rng_state", None)
        if state is not None:  # restored here, after the data loaders have drawn their seeds
            torch.set_rng_state(state)
            self._pending_rng_state = None

    def teardown(self, stage: str) -> None:
        """A rank started by ``ddp_spawn`` leaves its process group before its process exits: a
        gloo group still alive at interpreter exit can abort the rank ("terminate called without
        an active exception") after a successful run. Lightning destroys only NCCL groups."""
        super().teardown(stage)
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        spawned = isinstance(launcher, _MultiProcessingLauncher)
        if spawned and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ----------------------------------------------------------------- guards and optimiser
    def check_finite(self, terms: Mapping[str, Tensor]) -> None:
        """Raise :class:`NonFiniteLossError` naming the step and the terms that are NaN/Inf."""
        bad = {k: float(v) for k, v in terms.items() if not torch.isfinite(v).all()}
        if bad:
            raise NonFiniteLossError(
                f"Non-finite loss at step {self.global_step}: {bad}; training stopped before the "
                f"optimiser step. {self._divergence_advice()}"
            )

    def _divergence_advice(self) -> str:
        """Where the last good weights are and what to change, as far as the trainer says."""
        trainer = self._trainer
        ckpt = getattr(getattr(trainer, "checkpoint_callback", None), "dirpath", None)
        last = last_checkpoint(ckpt)
        clip = getattr(trainer, "gradient_clip_val", None)
        where = (
            f"The last good checkpoint is {last}" if last else "No checkpoint was saved before it"
        )
        fresh = "lower --model.lr in a new run (another --trainer.default_root_dir)"
        if clip:
            return f"{where}; {fresh} (gradient clipping at {clip:g} is already on)."
        if last:
            return (
                f"{where}; resume it with --ckpt_path last --trainer.gradient_clip_val=1.0, or "
                f"{fresh}."
            )
        return f"{where}; set --trainer.gradient_clip_val=1.0 or {fresh}."

    def log_terms(self, prefix: str, terms: Mapping[str, Tensor], **kw: Any) -> None:
        for k, v in terms.items():
            self.log(f"{prefix}/{k}", v, prog_bar=(k == "loss"), sync_dist=prefix == "val", **kw)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warm = max(int(hp.warmup_steps), 0)
        schedule = hp.get("lr_schedule", "constant")
        total = None
        if schedule != "constant":
            total = self.trainer.max_steps
            if total is None or total < 1:  # an epoch-bounded run: Lightning's estimate
                total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(lr_factor, warmup=warm, total=total, schedule=schedule)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @staticmethod
    def _check_nfe(nfe: int | None) -> int:
        if nfe is None or not math.isfinite(nfe) or int(nfe) < 1:
            raise ValueError(f"NFE must be at least 1, got {nfe}.")
        return int(nfe)

    def _check_method(self, method: str | None) -> str:
        """``method``, or this sampler's default (the first of ``methods``) when ``None``."""
        methods = self.methods
        if method is None:
            return methods[0]
        if method not in methods:
            raise ValueError(
                f"A {type(self).__name__} samples with {list(methods)}, not {method!r}."
            )
        return method
