"""One loader for what ``flowmap sample`` and ``flowmap report`` read: a flowmap checkpoint (a
teacher or a flow map) or a teacher trained elsewhere (a diffusers folder or a ``.yaml``/``.json``
spec), each checked once (:mod:`flowmap.training.checkpoints`) and returned on the CPU in eval mode."""

from __future__ import annotations

from typing import Any

from flowmap.training.checkpoints import CheckpointError, load_module, read_checkpoint
from flowmap.training.flow_map import FlowMapModule
from flowmap.training.teachers import is_module_checkpoint, load_teacher
from flowmap.training.velocity import VelocityModule

__all__ = ["MODULES", "load_flowmap", "load_sampler"]

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
