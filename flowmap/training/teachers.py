"""Where a distillation's teacher comes from: one function for the flow-map module, the report and
``flowmap sample``.

A teacher is given as plain data (so a flow map's checkpoint records it):

* a :class:`~flowmap.training.VelocityModule` checkpoint (``.ckpt``), read with ``weights_only``;
* a foreign model: a diffusers folder, a ``.yaml``/``.json`` spec file or a ``{class_path,
  init_args}`` dict (:mod:`flowmap.teachers.spec`), weights by safetensors only.

Its identity is a SHA-256: of the checkpoint file, or of the spec with every file it names (and
the foreign model's weight and config files) replaced by their contents' SHA-256.

A distillation resolves its teacher once (:func:`resolve_teacher`) into a
:class:`ResolvedTeacher`: the frozen velocity :math:`b_t(x)` with its path, classes, data and
identity, and :func:`check_student` is the one check of a student against it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from flowmap.conditioning import Conditioning
from flowmap.data.base import dataset_identity, describe_dataset
from flowmap.io import file_sha256
from flowmap.losses import FlowMapLoss
from flowmap.paths import AffinePath
from flowmap.protocols import Velocity, declared_schedule
from flowmap.teachers import build_teacher
from flowmap.teachers.spec import is_spec
from flowmap.teachers.student import teacher_architecture
from flowmap.training.checkpoints import (
    CheckpointError,
    dataset_differences,
    load_module,
    read_checkpoint,
    refuse_run_folder,
)
from flowmap.training.velocity import VelocityModule

__all__ = [
    "FrozenMap",
    "ResolvedTeacher",
    "check_student",
    "is_module_checkpoint",
    "load_teacher",
    "missing_student_teacher",
    "resolve_teacher",
    "student_spec",
    "teacher_identity",
]

_SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def is_module_checkpoint(spec: Any) -> bool:
    """Whether a teacher spec names a flowmap checkpoint (a path that is not a folder or a spec file)."""
    if not isinstance(spec, str | Path):
        return False
    p = Path(spec)
    return not p.is_dir() and p.suffix.lower() not in _SPEC_SUFFIXES


def teacher_identity(spec: str | Mapping[str, Any], teacher: Any = None) -> str:
    """The SHA-256 that names a teacher: of a checkpoint file; else of what the teacher says
    defines it (``identity_facts()``: prediction, schedule, path, …) with the contents of every
    weight file it or its modules read, so a folder and a spec naming the same files agree; a
    teacher that says nothing is named by its spec, each file in it by content."""
    if is_module_checkpoint(spec):
        return file_sha256(spec)
    files = set(getattr(teacher, "weight_files", ()))
    if isinstance(teacher, nn.Module):
        for m in teacher.modules():
            files |= set(getattr(m, "weight_files", ()))
    facts = getattr(teacher, "identity_facts", None)
    if facts is not None:
        described: Any = facts()
    else:
        if not isinstance(spec, Mapping) and Path(spec).is_file():  # a spec file: its content
            import yaml

            spec = yaml.safe_load(Path(spec).read_text())

        def norm(v: Any) -> Any:
            if isinstance(v, Mapping):
                return {str(k): norm(x) for k, x in sorted(v.items())}
            if isinstance(v, list | tuple):
                return [norm(x) for x in v]
            if isinstance(v, str) and Path(v).is_file():
                return "sha256:" + file_sha256(v)
            return v

        described = norm(spec)
    hashes = sorted(file_sha256(f) for f in files)
    return hashlib.sha256(json.dumps([described, hashes], default=str).encode()).hexdigest()


class FrozenMap(nn.Module):
    r"""A distilled flow map as a teacher: ``flow_map`` is its frozen (EMA) map
    :math:`X_{\mathrm{ref}}`, the velocity its diagonal :math:`\phi(x, t, t)`, and its net is
    what a student warm-starts from (reward fine-tuning, :class:`~flowmap.steering.RewardLoss`)."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.flow_map = module.sampling_flow_map
        self.path, self.num_classes = self.flow_map.path, module.num_classes
        self.data_shape, self.hparams = module.data_shape, module.hparams
        self.trained_on = getattr(module, "trained_on", None)

    @property
    def sampling_net(self) -> nn.Module:
        return self.flow_map.net

    def forward(self, x: Any, t: Any, **cond: Any) -> Any:
        return self.flow_map.velocity(x, t, **cond)


def load_teacher(
    spec: str | Mapping[str, Any], map_module: type | None = None
) -> tuple[Velocity, str]:
    """The frozen teacher a spec names and its identity (one-sentence errors for a missing file);
    given ``map_module`` (the flow-map module class), a flow map's checkpoint is a
    :class:`FrozenMap`."""
    if is_module_checkpoint(spec):
        if not Path(spec).is_file():
            raise CheckpointError(
                f"Teacher checkpoint {str(spec)!r} does not exist; train a teacher first "
                "(flowmap fit --config .../teacher.yaml) and pass its .ckpt path, or give a "
                "diffusers folder or a class_path spec."
            )
        # read for its kind only where a map may be the teacher (else load_module checks it)
        if (
            map_module is not None
            and read_checkpoint(spec).get("flowmap_module") == "FlowMapModule"
        ):
            module = load_module(map_module, spec)
            if getattr(module, "adapter", None) is not None:
                module.merge_adapters()
            teacher: Any = FrozenMap(module)
        else:
            teacher = load_module(VelocityModule, spec)
    else:
        refuse_run_folder(spec)
        teacher = build_teacher(spec)
    if isinstance(teacher, nn.Module):
        teacher.requires_grad_(False)
    if not callable(teacher):
        raise ValueError(
            f"The teacher {type(teacher).__name__} is not a velocity b(x, t); wrap the model with "
            "flowmap.teachers.DiffusionTeacher."
        )
    return teacher, teacher_identity(spec, teacher)


def missing_student_teacher(net: Any, teacher: Any) -> dict[str, Any] | None:
    """The teacher architecture to write into ``net``, a ``DiffusionStudent`` spec (a dict or a
    parsed config) given its settings but not its teacher; ``None`` for any other net, or without
    a teacher."""
    if not isinstance(teacher, str | Path | Mapping):
        return None
    if not str(net.get("class_path", "")).endswith("DiffusionStudent"):
        return None
    if (net.get("init_args") or {}).get("teacher") is not None:
        return None
    return student_spec(teacher)["init_args"]["teacher"]


def student_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """The ``class_path`` spec of a student that is the teacher's own network (plain data, no
    weight files: the student's checkpoint rebuilds from it alone): a flowmap checkpoint's
    ``net`` config, or a foreign teacher's :class:`~flowmap.teachers.DiffusionStudent` of its
    architecture. Its weights come from the teacher at the warm start."""
    if is_module_checkpoint(spec):
        if not Path(spec).is_file():
            raise CheckpointError(
                f"Teacher checkpoint {str(spec)!r} does not exist; train a teacher first "
                "(flowmap fit --config .../teacher.yaml) and pass its .ckpt path."
            )
        net = read_checkpoint(spec)
        if net.get("flowmap_module") not in ("VelocityModule", "FlowMapModule"):
            read_checkpoint(spec, expected_kind="VelocityModule")  # its one-sentence error
        net = net.get("hyper_parameters", {}).get("net")
        if not is_spec(net):
            raise ValueError(
                f"The teacher checkpoint {str(spec)!r} does not say how its net was built; give "
                "the student a net (its config) explicitly."
            )
        return dict(net)
    refuse_run_folder(spec)
    return {
        "class_path": "flowmap.teachers.DiffusionStudent",
        "init_args": {"teacher": teacher_architecture(spec)},
    }


class ResolvedTeacher(nn.Module):
    r"""The teacher :math:`b_t(x)` of a distillation, resolved once (:func:`resolve_teacher`).

    A submodule of the flow-map module, so it follows it across devices and dtypes, but frozen:
    no gradients, always in eval mode, and never in a state dict (its weights are its own files;
    the student's checkpoint records its ``spec`` and ``identity`` instead).

    Attributes:
        velocity: the frozen velocity :math:`b_t(x)` (``b(x, t, y=, w=)`` if class-conditional).
        spec: what the checkpoint records: the path or spec dict given, or ``"python:<class>"``.
        name: the teacher in messages.
        path: the path :math:`x_t = \alpha_t x_1 + \sigma_t x_0` the distillation follows.
        num_classes: :math:`K` (``None``: unconditional).
        data_shape: the shape of one sample, if it says.
        label_dropout: its training label dropout, if known (0: it cannot guide).
        identity: its SHA-256 (``None`` for a Python teacher).
        trained_on: the hyperparameters of its training data, if recorded.
    """

    def __init__(
        self,
        velocity: Velocity,
        *,
        spec: Any,
        name: str,
        path: AffinePath,
        num_classes: int | None = None,
        data_shape: Sequence[int] | None = None,
        label_dropout: float | None = None,
        identity: str | None = None,
        trained_on: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.velocity = velocity  # an nn.Module is registered (moved with the module)
        self.spec, self.name, self.path = spec, name, path
        self.num_classes, self.label_dropout = num_classes, label_dropout
        self.data_shape = None if data_shape is None else tuple(int(d) for d in data_shape)
        self.identity, self.trained_on = identity, trained_on
        self.requires_grad_(False).train(False)
        self.register_state_dict_post_hook(_forget_own_keys)
        self.register_load_state_dict_pre_hook(_note_prefix)
        self.register_load_state_dict_post_hook(_forgive_own_keys)

    def train(self, mode: bool = True) -> ResolvedTeacher:
        """Always eval mode: a teacher never trains (its dropout stays off)."""
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, path={self.path.name!r}, num_classes={self.num_classes}"


def _forget_own_keys(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
    for k in [k for k in state if k.startswith(prefix)]:
        del state[k]


def _note_prefix(module: nn.Module, state: Any, prefix: str, *rest: Any) -> None:
    module._loading_prefix = prefix


def _forgive_own_keys(module: nn.Module, keys: Any) -> None:
    prefix = module.__dict__.pop("_loading_prefix", None)
    if prefix is not None:
        keys.missing_keys[:] = [k for k in keys.missing_keys if not k.startswith(prefix)]


def resolve_teacher(
    teacher: str | Mapping[str, Any] | Velocity,
    schedule: str | None = None,
    map_module: type | None = None,
) -> ResolvedTeacher:
    """The teacher a flow map distils, resolved once: a checkpoint path or spec is loaded
    (:func:`load_teacher`, a flow map's checkpoint with ``map_module``), a Python velocity taken
    as it is. The student follows the path the teacher declares (another ``schedule`` is an
    error), or ``schedule`` if it declares none."""
    if isinstance(teacher, str | Path) or is_spec(teacher):
        velocity, identity = load_teacher(teacher, map_module)
        spec: Any = str(teacher) if isinstance(teacher, Path) else teacher
        name = str(teacher) if not is_spec(teacher) else str(teacher["class_path"])
    else:
        velocity, identity = teacher, None
        spec, name = f"python:{type(teacher).__qualname__}", type(teacher).__name__
    declared = declared_schedule(velocity)
    if declared is None and schedule is None:
        raise ValueError(
            f"The teacher ({type(velocity).__name__}) declares no path (no .path attribute), so "
            "the student cannot know its schedule; pass schedule: linear or cosine, the one the "
            "teacher was trained on."
        )
    if declared is not None and schedule is not None and schedule != declared:
        raise ValueError(
            f"The teacher follows the {declared!r} schedule but schedule={schedule!r} was given; "
            "a distilled map takes the teacher's schedule, so drop the schedule argument."
        )
    hparams = getattr(velocity, "hparams", None)  # a flowmap teacher records its training
    return ResolvedTeacher(
        velocity,
        spec=spec,
        name=name,
        path=AffinePath(declared or schedule),
        num_classes=getattr(velocity, "num_classes", None),
        data_shape=getattr(velocity, "data_shape", None),
        label_dropout=None if hparams is None else hparams.get("label_dropout"),
        identity=identity,
        trained_on=getattr(velocity, "trained_on", None),
    )


def check_student(
    teacher: ResolvedTeacher | None,
    conditioning: Conditioning,
    loss: FlowMapLoss,
    data_shape: Sequence[int] | None = None,
    data: Mapping[str, Any] | None = None,
) -> None:
    r"""Every check of a student against its teacher, once before the first step (one sentence
    each): the loss takes this teacher (or self-distils with diagonal rows); the teacher was
    trained on this data (``data_shape``, and ``data``, the DataModule's hyperparameters) and on
    the student's classes; a guided map's :math:`b(\varnothing)` exists (the teacher's label
    dropout, or when self-distilling the map's own and its diagonal rows, ``pairs.eta > 0``)."""
    loss.check_teacher(teacher is not None)
    check_reference = getattr(loss, "check_reference", None)  # a loss that needs a map teacher
    if check_reference is not None and teacher is not None:
        check_reference(teacher.velocity)
    guided = conditioning.guided
    if teacher is None:
        if guided and not conditioning.null_trained:
            raise ValueError(
                "Self-distilling a guided map needs label_dropout > 0: its guided target "
                "takes the unconditional velocity from the map's own null-class diagonal."
            )
        if guided and float(getattr(loss.settings(False)[0], "eta", 1.0)) == 0:
            raise ValueError(
                "Self-distilling a guided map needs diagonal rows (pairs.eta > 0): its guided "
                "target takes the unconditional velocity from the map's own diagonal."
            )
        return
    name = teacher.name
    if teacher.data_shape is not None and data_shape is not None:
        if teacher.data_shape != tuple(data_shape):
            raise ValueError(
                f"The teacher {name!r} was trained on data of shape {list(teacher.data_shape)} "
                f"but this data has shape {list(data_shape)}; use the teacher trained on this "
                "dataset."
            )
    if dataset_differences(teacher.trained_on, data):
        raise ValueError(
            f"The teacher {name!r} was trained on "
            f"{describe_dataset(dataset_identity(teacher.trained_on))} but this fit's data is "
            f"{describe_dataset(dataset_identity(dict(data)))}; distil with the teacher trained "
            "on this data, or fit on the teacher's data."
        )
    mine, theirs = conditioning.num_classes, teacher.num_classes
    if theirs != mine:
        raise ValueError(
            f"The teacher has {theirs or 'no'} classes but the student net "
            f"{mine or 'none'}; build the student with the teacher's num_classes."
        )
    if guided and teacher.label_dropout == 0:
        raise ValueError(
            "The teacher was trained without label dropout (label_dropout 0), so it has no "
            "unconditional velocity to guide with; distil at guidance 1, or retrain the "
            "teacher with label_dropout > 0."
        )
