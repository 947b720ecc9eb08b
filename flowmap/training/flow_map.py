r"""Flow-map distillation (and self-distillation) of :math:`X(s,t,x) = x + (t-s)\phi(x,s,t)`."""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.conditioning import NULL_CLASS, Conditioning
from flowmap.flowmap import FlowMap
from flowmap.losses import FlowMapLoss, LagrangianLoss
from flowmap.nets.lora import LoRA, merge_lora
from flowmap.ode import sample_consistency, sample_flow_map
from flowmap.paths import AffinePath
from flowmap.protocols import Solution, Velocity
from flowmap.teachers import DiffusionStudent, DiffusionTeacher
from flowmap.teachers.spec import build_component, build_teacher, is_plain_data, is_spec
from flowmap.training.base import FlowModuleBase, fork_rng
from flowmap.training.checkpoints import refuse_run_folder
from flowmap.training.guard import DivergenceGuard
from flowmap.training.teachers import (
    ResolvedTeacher,
    check_student,
    missing_student_teacher,
    resolve_teacher,
    student_spec,
)

__all__ = ["FlowMapModule", "check_strategy", "fsdp_runs_jvp", "FSDP_JVP_TORCH"]

#: the first torch whose ``torch.func.jvp`` runs through FSDP (2.11 fails: pytorch#182641)
FSDP_JVP_TORCH = (2, 14)


def fsdp_runs_jvp(version: str = torch.__version__) -> bool:
    """Whether this torch (``"2.14.1+cu130"``) runs ``torch.func.jvp`` through FSDP."""
    return tuple(int(v) for v in version.split("+")[0].split(".")[:2]) >= FSDP_JVP_TORCH


def check_strategy(strategy: object, loss: FlowMapLoss, version: str = torch.__version__) -> None:
    """Refuse a sharded strategy (FSDP) with an autodiff-JVP loss on a torch that cannot run it."""
    sharded = type(strategy).__name__ in ("FSDPStrategy", "ModelParallelStrategy")
    if sharded and loss.autodiff_jvp and not fsdp_runs_jvp(version):
        raise ValueError(
            f"{type(loss).__name__} takes torch.func.jvp through the net, which FSDP supports "
            f"from torch {'.'.join(map(str, FSDP_JVP_TORCH))} on, not {version}; upgrade torch, "
            "use strategy ddp, or a stop-gradient loss (a regression form, MeanFlow) with "
            "jvp: {mode: finite_difference}."
        )


# The frozen teacher (and a DiffusionStudent's own label dropout) is in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start")


class FlowMapModule(FlowModuleBase):
    r"""Trains a flow map :math:`X(s,t,x) = x + (t-s)\phi(x,s,t)` with an injected :class:`FlowMapLoss`.

    Args:
        net: the network :math:`\phi(x, s, t)` (a module or its ``class_path`` spec). Unset, the
            student is the teacher's own network: a flowmap teacher's net config, or for a model
            trained elsewhere a :class:`~flowmap.teachers.DiffusionStudent` of its architecture
            (its time embedding given the gap :math:`t - s`); its weights are copied at the warm
            start, and the spec, plain data, goes in the checkpoint.
        loss: the loss component, e.g. ``LagrangianLoss(form="backprop")`` or in YAML
            ``{class_path: flowmap.losses.EulerianLoss, init_args: {pairs: {eta: 0.25}}}``
            (default: ``LagrangianLoss()``).
        teacher: the velocity to distil: a :class:`VelocityModule` checkpoint path (loaded frozen,
            in eval mode, with its EMA weights; never in the optimiser, the EMA or this module's
            checkpoint); a model trained elsewhere, as a diffusers folder, a spec file or a
            ``{class_path: flowmap.teachers.DiffusionTeacher, init_args: {model: ...,
            prediction: epsilon, schedule: ddpm_linear, clip: true}}`` component
            (:mod:`flowmap.training.teachers`); or, from Python, any
            :class:`~flowmap.protocols.Velocity`. ``None`` self-distils: the teacher is the
            model's own diagonal :math:`\mathrm{sg}\,\phi(\cdot,t,t)`. A flow map's checkpoint
            is the frozen reference (and the start) of reward fine-tuning (``RewardLoss``).
        warm_start: start the student as a copy of the teacher's network (same architecture
            needed), so that before training one jump is one Euler step of the teacher; a
            function teacher (no network) leaves the student as built.
        schedule: the path's schedule. A distilled map takes the teacher's (giving another is an
            error); self-distillation uses this, ``"linear"`` if unset.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, in steps.
        lr_schedule: after the warm-up, ``"cosine"`` decay to 0 at ``trainer.max_steps`` (default:
            with the EMA it cut the one-step endpoint error of an exact-teacher distillation
            2.3×, ``benchmarks/results/exact-teacher``) or ``"constant"``.
        ema_decay: EMA of the net (null: none); the EMA samples and validates.
        data_shape: the shape of one sample (filled in from the data).
        label_dropout: class-conditional nets: the probability of training a row as the null
            class (the unconditional map, and the :math:`\phi(\cdot \mid \varnothing)` that
            self-distillation's guided target needs).
        guidance: the guidance scale :math:`w` the map learns: one number (``guidance_law:
            fixed``), or ``[low, high]`` for a range a net with ``guidance_input: true`` serves.
            The map follows :math:`b^w = b(\varnothing) + w\,(b(c) - b(\varnothing))`.
        guidance_law: the training law of :math:`w`: ``"fixed"``, ``"uniform"`` or
            ``"log_uniform"`` on ``[low, high]`` (improved MeanFlow and TVM: log-uniform on
            [1, 8]).
        adapter: low-rank adapters, ``{class_path: flowmap.nets.LoRA, init_args: {rank: 8}}``
            (:class:`~flowmap.nets.LoRA`): the student is the warm-started copy of the teacher's
            network with its linear and convolution layers frozen and adapted,
            :math:`W' = W + (\alpha/r)\,BA`, and its gap branch trained in full. It needs a
            teacher with a network and ``warm_start``; the teacher is then loaded as the module
            is built (loading the student too: its checkpoint holds the adapters and the gap
            branch only, and rebuilds the rest from the teacher it names, which must be the
            very same file). :meth:`merge_adapters` folds them in for sampling.

        max_scale: stop once jumps outgrow the data's scale so many fold.

    A class-conditional map :math:`X(s, t, x \mid c, w)` trains on ``(x, y)`` batches; the
    losses pass the labels and scales to the map and the teacher and never differentiate in
    them. ``generate(x0, nfe, y=labels, guidance=w)`` samples it, one network evaluation a jump.
    """

    module_kind = "FlowMapModule"
    methods = ("jumps",)

    def __init__(
        self,
        net: nn.Module | dict[str, Any] | None = None,
        loss: FlowMapLoss | None = None,
        teacher: str | dict[str, Any] | Velocity | None = None,
        warm_start: bool = True,
        schedule: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = 0.999,
        data_shape: Sequence[int] | None = None,
        lr_schedule: str = "cosine",
        label_dropout: float = 0.1,
        guidance: float | Sequence[float] = 1.0,
        guidance_law: str = "fixed",
        adapter: LoRA | None = None,
        max_scale: float | None = 100.0,
    ) -> None:
        super().__init__()
        refuse_run_folder(teacher)  # a run's folder or config.yaml where its checkpoint belongs
        adapter = _check_adapter(adapter, teacher, warm_start)
        # a Python teacher is not a hyperparameter: checkpoints hold plain data only
        if is_spec(teacher) and not is_plain_data(teacher):  # built in Python: not a hyperparameter
            teacher = build_teacher(teacher)
        plain = teacher is None or isinstance(teacher, str) or is_spec(teacher)
        self.save_hyperparameters(ignore=[] if plain else ["teacher"])
        if adapter is not None and not is_plain_data(self.hparams.get("adapter")):
            self.hparams["adapter"] = adapter.spec()  # built in Python: its config, plain data
        net = self._student_net(net, teacher, plain)
        self.loss = loss if loss is not None else LagrangianLoss()
        if teacher is not None:  # without one it is checked in setup (a loaded map needs none)
            self.loss.check_teacher(True)
        resolved = None
        if adapter is not None:  # the frozen base is the teacher's: loaded and copied now
            resolved = resolve_teacher(teacher, schedule, self._map_class)
            net = _adapted(net, resolved, adapter)
        self._setup_common(net, lr, weight_decay, warmup_steps, ema_decay, data_shape, lr_schedule)
        #: the LoRA adapters (``None``: the net trains in full); ``merged``: folded in
        self.adapter, self.merged = adapter, False
        if adapter is not None:  # the base is the teacher's: no checkpoint holds it
            self.leave_frozen_out_of_state_dict()
        conditional = self.num_classes is not None
        self.conditioning = Conditioning.of(
            self.num_classes,
            label_dropout,
            guidance,
            guidance_law,
            scale_input=conditional and FlowMap(self.net).takes_scale,
        )
        self.path = AffinePath(schedule or "linear")
        #: the resolved teacher (None: self-distilling, or a spec not yet loaded, see setup)
        self._teacher: ResolvedTeacher | None = None
        self._guard = (
            None
            if max_scale is None
            else DivergenceGuard(max_scale, keep=False, advice=self._divergence_advice)
        )
        if resolved is not None:
            self._adopt(resolved)
        elif not plain:  # a Python teacher: nothing to load, resolved now
            self._adopt(resolve_teacher(teacher, schedule, self._map_class))

    def _student_net(
        self, net: nn.Module | dict[str, Any] | None, teacher: Any, plain: bool
    ) -> nn.Module:
        """The student network: ``net`` (built if a spec), else the teacher's own
        (:func:`~flowmap.training.teachers.student_spec`, recorded as the ``net`` hyperparameter)."""
        if net is None:
            if teacher is None:
                raise ValueError(
                    "A self-distilled map has no teacher whose network it could copy; give it a "
                    "net, e.g. net: {class_path: flowmap.nets.UNet, init_args: {...}}."
                )
            if not plain:
                if isinstance(teacher, DiffusionTeacher):
                    return DiffusionStudent(teacher)
                own = getattr(teacher, "net", None)
                if not isinstance(own, nn.Module):
                    raise ValueError(
                        f"A {type(teacher).__name__} teacher has no network to copy; give the "
                        "student a net (and warm_start: false)."
                    )
                return copy.deepcopy(own).requires_grad_(True)
            net = student_spec(teacher)
            self.hparams["net"] = net
        elif is_spec(net) and plain and (arch := missing_student_teacher(net, teacher)):
            # a DiffusionStudent given its settings (e.g. time_modules), not its teacher
            net = {
                "class_path": net["class_path"],
                "init_args": {**net["init_args"], "teacher": arch},
            }
            self.hparams["net"] = net
        if is_spec(net):
            net = build_component(net)
        return net

    # ----------------------------------------------------------------- conditioning
    @property
    def guidance_range(self) -> tuple[float, float]:
        """``(low, high)`` of the trained guidance scales."""
        return self.conditioning.guidance

    @property
    def _map_class(self) -> type | None:  # a flow map's checkpoint is a teacher for such a loss
        return FlowMapModule if self.loss.takes_map_teacher else None

    @property
    def guided(self) -> bool:
        """Whether the map follows a guided velocity (some training scale is not 1)."""
        return self.conditioning.guided

    # ----------------------------------------------------------------- teacher
    @property
    def teacher(self) -> Velocity | None:
        """The velocity being distilled (``None`` when self-distilling or not yet loaded)."""
        return None if self._teacher is None else self._teacher.velocity

    def _adopt(self, teacher: ResolvedTeacher) -> None:
        """Hold the resolved teacher (a frozen submodule, outside the optimiser, the EMA and the
        state dict) and follow its path."""
        self._teacher = teacher
        self.path = teacher.path
        self.hparams["schedule"] = teacher.path.name

    def setup(self, stage: str) -> None:
        super().setup(stage)
        spec = self.hparams.get("teacher")
        if (isinstance(spec, str) or is_spec(spec)) and self._teacher is None:
            # resolved here, not in __init__: a trained student loads (to sample) without its
            # teacher; its identity goes in the checkpoint
            self._adopt(resolve_teacher(spec, self.hparams.get("schedule"), self._map_class))
        if stage not in ("fit", "validate"):
            return
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(dm, "hparams", None)
        check_student(self._teacher, self.conditioning, self.loss, self.data_shape, data)
        if stage == "fit" and self.merged:
            raise ValueError(
                "This LoRA student's adapters were merged for sampling; load it again from its "
                "checkpoint to train it."
            )
        if stage == "fit" and self._trainer is not None:
            check_strategy(self._trainer.strategy, self.loss)
            if self.adapter is not None and _sharded(self._trainer.strategy):
                raise ValueError(
                    "A LoRA student shares its frozen base with its EMA, which sharding (FSDP) "
                    "cannot split; train it with strategy ddp (only the adapters are synced)."
                )
        teacher = self.teacher
        warm = self.hparams.warm_start and self.adapter is None  # an adapted net started warm
        if warm and stage == "fit" and teacher is not None:
            if self.student.has_net_to_copy(teacher):  # a function teacher has none: nothing to do
                self.student.warm_start(teacher)  # the EMA copies the net at its first update

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        guard = self._guard
        if guard is not None and guard.data_rms > 0 and self._trainer is not None:
            # a diverged map is never written over the last good checkpoint
            guard.check(self.student, self.global_step)
        super().on_save_checkpoint(checkpoint)
        teacher = self._teacher
        checkpoint["flowmap_teacher"] = (
            self.hparams.get("teacher") if teacher is None else teacher.spec
        )
        sha = teacher.identity if teacher is not None else None
        sha = sha or getattr(self, "_saved_teacher_sha", None)
        if sha is not None:  # the report refuses this map beside any other teacher
            checkpoint["flowmap_teacher_sha256"] = sha

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._saved_teacher = checkpoint.get("flowmap_teacher")
        self._saved_teacher_sha = checkpoint.get("flowmap_teacher_sha256")
        saved, teacher = self._saved_teacher_sha, self._teacher
        mine = None if teacher is None else teacher.identity
        if self.adapter is not None and saved and mine and saved != mine:
            raise ValueError(
                f"This LoRA student's adapters were trained on another teacher (SHA-256 "
                f"{saved[:12]}…) than {teacher.name!r} ({mine[:12]}…), whose weights would be "
                "its base; load it with the teacher it was distilled from."
            )

    # ----------------------------------------------------------------- LoRA
    def merge_adapters(self) -> FlowMapModule:
        r"""Fold the LoRA adapters into plain weights, :math:`W \leftarrow W + (\alpha/r)\,BA`,
        in the net and its EMA (:func:`~flowmap.nets.merge_lora`): for sampling only (one
        ordinary forward a layer); the merged module neither trains nor saves as a LoRA student.
        A no-op without adapters or once merged; returns the module."""
        if self.adapter is None or self.merged:
            return self
        self.net = merge_lora(self.net)
        if self.ema is not None:
            self.ema.module = merge_lora(self.ema.module)
        self._frozen, self.merged = (), True  # its state dict is now the whole network's
        return self

    def on_train_start(self) -> None:
        """Refuse to resume a distillation as a self-distillation: a Python teacher is not in the
        checkpoint, so it must be passed again."""
        saved = getattr(self, "_saved_teacher", None)
        if isinstance(saved, str) and saved.startswith("python:") and self._teacher is None:
            raise ValueError(
                f"This flow map was distilled from a Python teacher ({saved[7:]}), which its "
                "checkpoint cannot hold, and resuming without it would self-distil; build the "
                "module with teacher=... again before resuming."
            )

    def _teacher_on(self, device: torch.device) -> Velocity | None:
        """The teacher, on ``device`` (a submodule: the Trainer has moved it already)."""
        teacher = self.teacher
        first = next(teacher.parameters(), None) if isinstance(teacher, nn.Module) else None
        if first is not None and first.device != device:  # called outside a Trainer
            self._teacher.to(device)
        return teacher

    # ----------------------------------------------------------------- training
    def sharded_modules(self) -> list[nn.Module]:
        """The net, its EMA and a loss with parameters (a learned weighting)."""
        own = [self.loss] if any(True for _ in self.loss.parameters()) else []
        return super().sharded_modules() + own

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.net, self.loss) for p in m.parameters() if p.requires_grad]

    @property
    def student(self) -> FlowMap:
        """The flow map being trained (raw weights)."""
        return FlowMap(self.net, self.path, scale=self.guidance_range[0])

    @property
    def sampling_flow_map(self) -> FlowMap:
        """The EMA flow map (raw weights if EMA is off)."""
        return FlowMap(self.sampling_net, self.path, scale=self.guidance_range[0])

    def _terms(
        self, flow_map: FlowMap, batch: Any, guard: bool = False, **kw: Any
    ) -> dict[str, Tensor]:
        """The loss terms of ``batch``; with ``guard``, the divergence guard watches the map."""
        spec = self.hparams.get("teacher")
        if (isinstance(spec, str) or is_spec(spec)) and self._teacher is None:
            raise RuntimeError("The teacher is loaded in setup(); run through a Trainer.")
        x1, y = self.split_batch(batch)
        cond = self.conditioning.training_condition(y)
        teacher = self._teacher_on(x1.device)
        terms = self.loss(flow_map, x1, teacher, step=self.global_step, **cond, **kw)
        if guard and self._guard is not None:
            self._guard(flow_map, x1, self.global_step, y=y)
        labelled = cond["w"][cond["y"] != NULL_CLASS] if "w" in cond else None
        if labelled is not None and len(labelled):  # the scales the guidance law drew, logged
            terms["guidance"] = labelled.mean().detach()
        return terms

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        terms = self._terms(self.student, batch, guard=True)
        self.check_finite(terms)
        self.log_terms("train", terms)
        return terms["loss"]

    @fork_rng
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x1 = batch if isinstance(batch, Tensor) else batch[0]
        g = torch.Generator(device=x1.device).manual_seed(batch_idx)
        x0 = torch.randn(x1.shape, generator=g, device=x1.device, dtype=x1.dtype)
        with torch.enable_grad():  # the JVP losses need autograd bookkeeping off the no_grad path
            terms = self._terms(self.sampling_flow_map, batch, x0=x0)
        self.log_terms("val", {k: v.detach() for k, v in terms.items()})

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        x0: Tensor,
        nfe: int = 1,
        method: str | None = None,
        y: Tensor | int | None = None,
        guidance: Tensor | float | None = None,
    ) -> Solution:
        """``nfe`` uniform jumps from noise ``x0`` at :math:`t=0` to data at :math:`t=1`; a one-time
        map (trained on pairs :math:`(s, 1)` only) samples as a consistency model, re-noising
        between jumps (:func:`~flowmap.ode.sample_consistency`) with noise seeded by the content
        of ``x0``: reproducible, different for every batch, and never ``x0``'s own draw.

        A class-conditional map needs labels ``y`` (int or ``(B,)``; -1: no class) and jumps along
        the guided flow at scale ``guidance`` (default: its trained scale, or 1 inside a trained
        range), one network evaluation per jump at any scale."""
        self._check_method(method)
        steps = self._check_nfe(nfe)
        cond = self.conditioning.sampling_condition(y, guidance, x0.shape[0], x0.device)
        if self.one_time:
            seed = int.from_bytes(hashlib.sha256(x0.cpu().numpy().tobytes()).digest()[:8], "big")
            g = torch.Generator(device=x0.device).manual_seed(seed)
            return sample_consistency(
                self.sampling_flow_map, x0, self.path, steps=steps, generator=g, cond=cond
            )
        return sample_flow_map(self.sampling_flow_map, x0, steps=steps, cond=cond)

    @property
    def one_time(self) -> bool:
        r"""Whether the loss trains only the one-time map :math:`X(s, 1, \cdot)` (consistency models,
        :class:`~flowmap.losses.OneTimePairSampler`)."""
        return bool(getattr(getattr(self.loss, "pairs", None), "one_time", False))

    @property
    def trained_backward(self) -> bool:
        r"""Whether the loss drew pairs with :math:`s > t` (``pairs.backward_fraction > 0``), the
        only ones that train the backward jumps :meth:`invert` takes."""
        pairs = getattr(self.loss, "pairs", None)
        return float(getattr(pairs, "backward_fraction", 0.0)) > 0.0

    @torch.no_grad()
    def invert(
        self,
        x1: Tensor,
        nfe: int = 1,
        y: Tensor | int | None = None,
        guidance: Tensor | float | None = None,
    ) -> Solution:
        """``nfe`` uniform jumps backwards, from data at :math:`t=1` to noise at :math:`t=0`.

        Only a map trained on backward pairs can (``loss.pairs.backward_fraction > 0``, as in the
        toy recipes); any other refuses, since its jumps with :math:`s > t` were never trained
        (a forward-only checkerboard map missed the noise by 1.0 at 2 jumps)."""
        if self.one_time:
            raise ValueError(
                "This is a one-time map (a consistency model, trained on pairs (s, 1) only): it "
                "jumps to data and cannot run backwards; invert with the teacher's ODE instead."
            )
        if not self.trained_backward:
            raise ValueError(
                "This flow map was trained only forward (noise -> data, "
                "loss.pairs.backward_fraction = 0), so its backward jumps are untrained; retrain "
                "it with --model.loss.init_args.pairs.backward_fraction=0.5 to invert, or solve "
                "the teacher's ODE backwards."
            )
        cond = self.conditioning.sampling_condition(y, guidance, x1.shape[0], x1.device)
        return sample_flow_map(
            self.sampling_flow_map, x1, steps=self._check_nfe(nfe), t0=1.0, t1=0.0, cond=cond
        )


# --------------------------------------------------------------------------- LoRA students
def _sharded(strategy: object) -> bool:
    return type(strategy).__name__ in ("FSDPStrategy", "ModelParallelStrategy")


def _check_adapter(adapter: Any, teacher: Any, warm_start: bool) -> LoRA | None:
    """The adapter as a :class:`~flowmap.nets.LoRA` (:meth:`~flowmap.nets.LoRA.of`), checked
    against the module's settings before any work."""
    adapter = LoRA.of(adapter)
    if adapter is None:
        return None
    if teacher is None:
        raise ValueError(
            "LoRA adapters train on a copy of the teacher's network, and a self-distilled map has "
            "no teacher; give the module a teacher, or drop the adapter."
        )
    if not warm_start:
        raise ValueError(
            "LoRA adapters train on a warm-started copy of the teacher's network; set "
            "warm_start: true, or drop the adapter to train the net in full."
        )
    LoRA.check_available()
    return adapter


def _adapted(net: nn.Module, teacher: ResolvedTeacher, adapter: LoRA) -> nn.Module:
    """``net`` warm-started from ``teacher``, then given ``adapter``'s adapters."""
    student = FlowMap(net, teacher.path)
    if not student.has_net_to_copy(teacher.velocity):
        raise ValueError(
            f"LoRA adapters train on a copy of the teacher's network, and the teacher "
            f"{teacher.name!r} has none; drop the adapter and give the student a net of its own "
            "(warm_start: false)."
        )
    student.warm_start(teacher.velocity)
    return adapter.apply(net)
