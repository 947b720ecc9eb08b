"""One loader for what ``flowmap sample`` and ``flowmap report`` read: a flowmap checkpoint (a
teacher or a flow map) or a teacher trained elsewhere (a diffusers folder or a ``.yaml``/``.json``
spec), each checked once (:mod:`flowmap.training.checkpoints`) and returned on the CPU in eval mode."""

from __future__ import annotations

from typing import Any, NamedTuple

from flowmap.training.checkpoints import CheckpointError, read_checkpoint, rebuild_module
from flowmap.training.flow_map import FlowMapModule
from flowmap.training.teachers import is_module_checkpoint, load_teacher
from flowmap.training.velocity import VelocityModule

__all__ = ["MODULES", "Loaded", "load_flowmap", "load_sampler"]

#: The flowmap module each checkpoint kind rebuilds.
MODULES = {"VelocityModule": VelocityModule, "FlowMapModule": FlowMapModule}


class Loaded(NamedTuple):
    """What :func:`load_sampler` read: the model, its kind (``VelocityModule``,
    ``FlowMapModule`` or a foreign teacher's class name), a foreign teacher's identity (SHA-256)
    and a flowmap checkpoint's contents (hyperparameters, data), each ``None`` for the other."""

    module: Any
    kind: str
    identity: str | None
    checkpoint: dict[str, Any] | None


def load_sampler(path: str, kind: str | None = None, need_shape: bool = True) -> Loaded:
    """The model ``path`` names (:class:`Loaded`), the file read once (a LoRA student's
    adapters merged, :meth:`~flowmap.training.FlowMapModule.merge_adapters`). ``kind`` refuses a
    checkpoint of another kind; ``need_shape`` a model that does not say its data shape."""
    if not is_module_checkpoint(path):
        module, sha = load_teacher(path)
        if need_shape and getattr(module, "data_shape", None) is None:
            raise ValueError(
                f"The teacher {path!r} does not say its data shape; give data_shape in its spec."
            )
        return Loaded(module, type(module).__name__, sha, None)
    ckpt = read_checkpoint(path, expected_kind=kind)
    cls = MODULES.get(ckpt.get("flowmap_module"))
    if cls is None:
        raise CheckpointError(
            f"{path!r} is a Lightning checkpoint but not a flowmap one; pass a .ckpt written "
            "by `flowmap fit`."
        )
    module = rebuild_module(cls, path)
    if isinstance(module, FlowMapModule):  # a LoRA student samples from merged weights
        module.merge_adapters()
    if need_shape and module.data_shape is None:
        raise CheckpointError(f"{path!r} does not record its data shape; retrain it.")
    return Loaded(module, ckpt["flowmap_module"], None, ckpt)


def load_flowmap(spec: str) -> tuple[str, str, Loaded]:
    """``label=path`` or ``path`` → (label, path, what :func:`load_sampler` read, a LoRA
    student merged); the label defaults to the loss's name."""
    label, path = spec.split("=", 1) if "=" in spec else ("", spec)
    loaded = load_sampler(path, "FlowMapModule", need_shape=False)
    return label or loaded.module.loss.name, path, loaded
