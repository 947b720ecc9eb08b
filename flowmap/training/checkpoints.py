"""Checkpoints of the flowmap modules: read through :func:`flowmap.io.safe_load` (``weights_only=True``)
and checked for what they hold before Lightning rebuilds a module from them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowmap.io import UnsafeFileError, safe_load

__all__ = ["CheckpointError", "load_module", "read_checkpoint", "refuse_run_folder"]


#: The layout of flowmap's checkpoints. 2: the gap embedding g(t - s) - g(0) and the loss as an
#: injected component (flowmap 0.2); a checkpoint of another format computes another function.
CHECKPOINT_FORMAT = 2


class CheckpointError(UnsafeFileError):
    """A checkpoint is missing, unreadable, unsafe or of the wrong kind."""


def refuse_run_folder(path: Any) -> None:
    """A flowmap run folder, or its ``config.yaml``, given where a checkpoint belongs: one
    sentence naming the checkpoint meant (``<run>/checkpoints/last.ckpt``)."""
    if isinstance(path, Mapping) and {"model", "trainer"} <= set(path):  # a run's config.yaml,
        root = (path.get("trainer") or {}).get("default_root_dir")  # read in by the parser
        meant = Path(root or ".") / "checkpoints" / "last.ckpt"
        raise CheckpointError(
            "The teacher given is a flowmap run's config (config.yaml), not a checkpoint; "
            + (f"did you mean {str(meant)!r}?" if meant.is_file() else "pass its last.ckpt.")
        )
    if not isinstance(path, str | Path):
        return
    p = Path(path)
    if p.is_dir():
        places = [p / "checkpoints" / "last.ckpt", p / "last.ckpt"]
    elif p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        places = [p.parent / "last.ckpt", p.parent / "checkpoints" / "last.ckpt"]
    else:
        return
    meant = next((c for c in places if c.is_file()), None)
    if meant is not None:
        what = "folder" if p.is_dir() else "config"
        raise CheckpointError(
            f"{str(p)!r} is a flowmap run's {what}, not a checkpoint; did you mean {str(meant)!r}?"
        )


def read_checkpoint(path: str | Path, expected_kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU with ``weights_only=True`` and check what it holds."""
    refuse_run_folder(path)
    try:
        ckpt = safe_load(path, "checkpoint")
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None
    p = str(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{p!r} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt file "
            "written by a flowmap fit."
        )
    kind = ckpt.get("flowmap_module")
    if kind is not None and ckpt.get("flowmap_format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{p!r} was written by an older flowmap (checkpoint format "
            f"{ckpt.get('flowmap_format', 1)}, this version reads {CHECKPOINT_FORMAT}), whose "
            "networks compute another function; retrain it with this version."
        )
    if expected_kind is not None and kind != expected_kind:
        found = f"a {kind} checkpoint" if kind else "not a flowmap checkpoint"
        raise CheckpointError(f"{p!r} is {found}, but a {expected_kind} checkpoint is needed here.")
    return ckpt


def load_module(cls: type, path: str | Path, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path)`` after :func:`read_checkpoint` checked the file (CPU, eval)."""
    read_checkpoint(path, expected_kind=getattr(cls, "module_kind", None))
    module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **kwargs)
    return module.eval()
