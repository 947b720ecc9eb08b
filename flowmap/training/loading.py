"""One loader for what ``flowmap sample`` and ``flowmap report`` read: a flowmap checkpoint (a
teacher or a flow map) or a teacher trained elsewhere (a diffusers folder or a ``.yaml``/``.json``
spec), each checked once (:mod:`flowmap.training.checkpoints`) and returned on the CPU in eval mode."""

from __future__ import annotations

from typing import Any

from flowmap.data.base import dataset_identity, describe_dataset
from flowmap.io import file_sha256
from flowmap.training.base import dataset_differences
from flowmap.training.checkpoints import CheckpointError, load_module, read_checkpoint
from flowmap.training.flow_map import FlowMapModule
from flowmap.training.teachers import is_module_checkpoint, load_teacher
from flowmap.training.velocity import VelocityModule

__all__ = ["MODULES", "check_same_origin", "load_flowmap", "load_sampler"]

#: The flowmap module each checkpoint kind rebuilds.
MODULES = {"VelocityModule": VelocityModule, "FlowMapModule": FlowMapModule}


def load_sampler(
    path: str, kind: str | None = None, need_shape: bool = True
) -> tuple[Any, str, str | None]:
    """The model ``path`` names, its kind (``VelocityModule``, ``FlowMapModule`` or a foreign
    teacher's class name) and, for a foreign teacher, its identity (SHA-256). ``kind`` refuses a
    checkpoint of another kind; ``need_shape`` a model that does not say its data shape."""
    if not is_module_checkpoint(path):
        module, sha = load_teacher(path)
        if need_shape and getattr(module, "data_shape", None) is None:
            raise ValueError(
                f"The teacher {path!r} does not say its data shape; give data_shape in its spec."
            )
        return module, type(module).__name__, sha
    kind = read_checkpoint(path, expected_kind=kind).get("flowmap_module")
    cls = MODULES.get(kind)
    if cls is None:
        raise CheckpointError(
            f"{path!r} is a Lightning checkpoint but not a flowmap one; pass a .ckpt written "
            "by `flowmap fit`."
        )
    module = load_module(cls, path)
    if module.data_shape is None:
        raise CheckpointError(f"{path!r} does not record its data shape; retrain it.")
    return module, kind, None


def load_flowmap(spec: str) -> tuple[str, FlowMapModule, str]:
    """``label=path`` or ``path`` → (label, module, path); the label defaults to the loss's name."""
    label, path = spec.split("=", 1) if "=" in spec else ("", spec)
    module = load_module(FlowMapModule, path)
    return label or module.loss.name, module, path


def check_same_origin(
    teacher_path: str,
    teacher_ckpt: dict[str, Any],
    label: str,
    path: str,
    teacher_sha: str | None = None,
) -> None:
    """A flow map is reported only beside its own teacher: the same dataset, the same path and,
    when the map recorded its teacher's SHA-256, the very same teacher checkpoint (a teacher
    resumed or retrained since is another teacher). Anything else is a one-sentence error."""
    ck = read_checkpoint(path, expected_kind="FlowMapModule")
    want = dataset_identity(teacher_ckpt.get("datamodule_hyper_parameters"))
    got = dataset_identity(ck.get("datamodule_hyper_parameters"))
    if dataset_differences(want, got):
        raise ValueError(
            f"The flow map {label!r} ({path}) was trained on {describe_dataset(got)} but the "
            f"teacher {teacher_path} on {describe_dataset(want)}; report checkpoints of one dataset."
        )
    schedules = [
        c.get("hyper_parameters", {}).get("schedule") or "linear" for c in (teacher_ckpt, ck)
    ]
    if schedules[0] != schedules[1]:
        raise ValueError(
            f"The flow map {label!r} follows the {schedules[1]!r} path but the teacher the "
            f"{schedules[0]!r} one; report a flow map beside the teacher it was distilled from."
        )
    sha = ck.get("flowmap_teacher_sha256")
    if sha is not None and sha != (teacher_sha or file_sha256(teacher_path)):
        raise ValueError(
            f"The flow map {label!r} ({path}) was distilled from another teacher than "
            f"{teacher_path} (it recorded {ck.get('flowmap_teacher')}, SHA-256 {sha[:12]}…, "
            "which may have been resumed or retrained since); pass the teacher it was distilled "
            "from, or distil the map again."
        )
