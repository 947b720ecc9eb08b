"""Safe file loading: every torch file flowmap reads goes through :func:`safe_load`.

``torch.load(..., weights_only=True)`` rebuilds tensors and plain containers only, so a file that
carries a pickle payload is refused without running it. Each failure is one sentence that names
the file and what to do.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "UnsafeFileError",
    "PICKLE_SUFFIXES",
    "DIFFUSERS_WEIGHTS",
    "diffusers_weights",
    "file_sha256",
    "load_safetensors",
    "read_npz",
    "safe_load",
]

#: files that carry pickles (torch.save, pickle): never read from a foreign weights folder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: the weights file of a diffusers model folder (``save_pretrained``)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_weights(model_dir: Path, what: str = "model") -> Path:
    """``model_dir``'s :data:`DIFFUSERS_WEIGHTS`; a folder without it (pickle weights only, or
    none) is refused in one sentence."""
    weights = model_dir / DIFFUSERS_WEIGHTS
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    raise ValueError(
        f"The {what} folder {str(model_dir)!r} has no {DIFFUSERS_WEIGHTS}"
        + (
            f" but pickle weights ({', '.join(pickles)}), which flowmap never unpickles; re-save "
            f"the {what} with save_pretrained(safe_serialization=True)."
            if pickles
            else f"; save the {what} with save_pretrained."
        )
    )


class UnsafeFileError(ValueError):
    """A file is missing, unreadable, or holds objects other than tensors and plain data."""


def safe_load(path: str | os.PathLike[str], what: str = "file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-sentence errors.

    Args:
        path: the file to read.
        what: what the file is, for the message (``"checkpoint"``, ``"Inception-v3 weights"``).

    Raises:
        UnsafeFileError: the file is missing, truncated or not a torch file, or it holds a pickle
            payload (which is never unpickled).
    """
    p = Path(path)
    if not p.is_file():
        raise UnsafeFileError(f"The {what} {str(p)!r} does not exist; check the path.")
    with open(p, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip (torch.save) or pickle
        raise UnsafeFileError(
            f"Could not read the {what} {str(p)!r}: it is not a torch file (neither a zip archive "
            "nor a pickle stream); pass the .ckpt/.pt file itself."
        )
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeFileError(
            f"Refused to load the {what} {str(p)!r}: it holds objects other than tensors and "
            "plain data, and flowmap never unpickles such files (torch.load weights_only=True); "
            "re-save it from a trusted source as a state_dict."
        ) from None
    except (
        EOFError,
        RuntimeError,
        zipfile.BadZipFile,
        OSError,
        KeyError,
        IndexError,
        ValueError,
    ) as err:
        raise UnsafeFileError(
            f"Could not read the {what} {str(p)!r}: the file is truncated or not a torch file "
            f"({type(err).__name__}); use an intact copy."
        ) from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks): a file's identity by content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_safetensors(
    path: str | os.PathLike[str], what: str = "weights"
) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file (tensors only, no code runs). A pickle-format file
    (``.bin``, ``.pt``, …) or a folder holding only such files is refused with one sentence."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        pickles = sorted(q.name for q in p.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
        if len(found) != 1:
            raise UnsafeFileError(
                f"The {what} folder {str(p)!r} holds "
                + (
                    f"pickle files ({', '.join(pickles)}) and no .safetensors file; flowmap never "
                    "unpickles foreign weights, so convert them with safetensors.torch.save_file "
                    "from a trusted copy."
                    if pickles and not found
                    else "no .safetensors file; point at the weights file."
                    if not found
                    else f"{len(found)} .safetensors files; point at the one to load."
                )
            )
        p = found[0]
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileError(
            f"The {what} {str(p)!r} is a pickle file; flowmap never unpickles foreign weights, "
            "so convert it with safetensors.torch.save_file from a trusted copy."
        )
    if not p.is_file():
        raise UnsafeFileError(f"The {what} {str(p)!r} does not exist; check the path.")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as err:
        raise UnsafeFileError(
            f"Could not read the {what} {str(p)!r} as safetensors ({err}); use an intact "
            ".safetensors file."
        ) from None


def read_npz(path: str | os.PathLike[str], what: str, hint: str) -> Any:
    """``np.load(path, allow_pickle=False)`` of an ``.npz`` archive (an ``NpzFile``: use it in a
    ``with``), with one-sentence errors that name ``what`` it should be and ``hint`` (where a
    good one comes from); numpy's own advice to allow pickles is never passed on."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist; check the path.")
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise ValueError(
            f"{what} {str(p)!r} is not a readable .npz archive (damaged, or another kind of "
            f"file); {hint}."
        ) from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError(f"{what} {str(p)!r} is a single array, not an .npz archive; {hint}.")
    return z
