"""Where a distillation's teacher comes from: one function for the flow-map module, the report and
``flowmap sample``.

A teacher is given as plain data (so a flow map's checkpoint records it):

* a :class:`~flowmap.training.VelocityModule` checkpoint (``.ckpt``), read with ``weights_only``;
* a foreign model: a diffusers folder, a ``.yaml``/``.json`` spec file or a ``{class_path,
  init_args}`` dict (:mod:`flowmap.teachers.spec`), weights by safetensors only.

Its identity is a SHA-256: of the checkpoint file, or of the spec with every file it names (and
the foreign model's weight and config files) replaced by their contents' SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from flowmap.io import file_sha256
from flowmap.protocols import Velocity
from flowmap.teachers import build_teacher
from flowmap.teachers.spec import is_spec
from flowmap.teachers.student import teacher_architecture
from flowmap.training.checkpoints import (
    CheckpointError,
    load_module,
    read_checkpoint,
    refuse_run_folder,
)
from flowmap.training.velocity import VelocityModule

__all__ = [
    "is_module_checkpoint",
    "load_teacher",
    "missing_student_teacher",
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


def load_teacher(spec: str | Mapping[str, Any]) -> tuple[Velocity, str]:
    """The frozen teacher a spec names and its identity (one-sentence errors for a missing file)."""
    if is_module_checkpoint(spec):
        if not Path(spec).is_file():
            raise CheckpointError(
                f"Teacher checkpoint {str(spec)!r} does not exist; train a teacher first "
                "(flowmap fit --config .../teacher.yaml) and pass its .ckpt path, or give a "
                "diffusers folder or a class_path spec."
            )
        teacher: Any = load_module(VelocityModule, spec)
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
        net = read_checkpoint(spec, expected_kind="VelocityModule")
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
