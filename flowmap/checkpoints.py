"""Safe checkpoint loading: ``weights_only=True`` always, and one clear sentence for each bad file.

``torch.load(..., weights_only=True)`` only rebuilds tensors and plain containers, so a checkpoint
carrying a pickle payload is refused without running it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "read_checkpoint", "load_module"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or of the wrong kind."""


def read_checkpoint(path: str | Path, expected_kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU with ``weights_only=True`` and check what it holds."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {str(p)!r} does not exist; check the path.")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refused to load {str(p)!r}: it holds objects other than tensors and plain data "
            f"({str(err).splitlines()[0][:160]}), and flowmap never unpickles such files; "
            "re-save it from a trusted source."
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"Could not read {str(p)!r}: the file is truncated or not a torch checkpoint "
            f"({type(err).__name__}); use an intact checkpoint."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{str(p)!r} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt file "
            "written by a flowmap fit."
        )
    kind = ckpt.get("flowmap_module")
    if expected_kind is not None and kind != expected_kind:
        found = f"a {kind} checkpoint" if kind else "not a flowmap checkpoint"
        raise CheckpointError(
            f"{str(p)!r} is {found}, but a {expected_kind} checkpoint is needed here."
        )
    return ckpt


def load_module(cls: type, path: str | Path, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path)`` after :func:`read_checkpoint` checked the file (CPU, eval)."""
    read_checkpoint(path, expected_kind=getattr(cls, "module_kind", None))
    module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **kwargs)
    return module.eval()
