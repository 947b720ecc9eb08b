"""Inception-v3 (torch-fidelity's ``inception-v3-compat``) for FID on natural images, offline.

The weights (``weights-inception-2015-12-05-6726825d.pth``, the TF-1 FID network converted by
torch-fidelity) cannot be downloaded here, so the extractor registry
(:mod:`flowmap.metrics.extractors`) first calls :func:`verified_inception_weights`, which

1. resolves the file (:func:`resolve_inception_weights`): an explicit path, else the
   environment variable ``FLOWMAP_INCEPTION_WEIGHTS``, else the torch hub cache file
   ``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``; a missing file
   raises ``FileNotFoundError`` at once instead of a ``URLError`` deep inside torch;
2. checks that it is a plain tensor ``state_dict`` by loading it with
   :func:`flowmap.io.safe_load` (``torch.load(path, weights_only=True)``;
   :func:`check_weights_file`). This matters because torch-fidelity later loads the same
   file with ``torch.load(weights_only=False)``, which would execute any pickle payload in it.

The resolved path is then passed *explicitly* (``feature_extractor_weights_path``) to
torch-fidelity, so it never tries the network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from flowmap.io import UnsafeFileError, safe_load

__all__ = [
    "INCEPTION_ENV_VAR",
    "INCEPTION_FEATURE_EXTRACTOR_NAME",
    "INCEPTION_WEIGHTS_FILENAME",
    "check_weights_file",
    "resolve_inception_weights",
    "verified_inception_weights",
]

#: File name of torch-fidelity's Inception-v3 FID weights (also its torch hub cache name).
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
#: Environment variable that may point at the weights file.
INCEPTION_ENV_VAR = "FLOWMAP_INCEPTION_WEIGHTS"
#: torch-fidelity's registered name of the extractor.
INCEPTION_FEATURE_EXTRACTOR_NAME = "inception-v3-compat"

# (resolved path, size, mtime_ns) of files already checked in this process.
_CHECKED: set[tuple[str, int, int]] = set()


def _hub_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resolve_inception_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the Inception-v3 weights file; raise ``FileNotFoundError`` if it is absent.

    Order: ``path`` if given, else ``$FLOWMAP_INCEPTION_WEIGHTS`` if set, else the torch hub
    cache file. An explicit path or environment variable that names a missing file is an
    error (no silent fallback to another location).
    """
    hub = _hub_cache_path()
    if path is not None:
        candidate, origin = Path(path), "the path given"
    elif os.environ.get(INCEPTION_ENV_VAR):
        candidate, origin = Path(os.environ[INCEPTION_ENV_VAR]), f"${INCEPTION_ENV_VAR}"
    else:
        candidate, origin = hub, "the torch hub cache"
    candidate = candidate.expanduser()
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"Inception-v3 weights file {INCEPTION_WEIGHTS_FILENAME} not found at {candidate} "
        f"({origin}), and this machine is offline so it cannot be downloaded: copy it to {hub} "
        f"or point ${INCEPTION_ENV_VAR} (or the weights path argument) at a local copy."
    )


def check_weights_file(path: str | os.PathLike[str], what: str = "Inception-v3 weights") -> Path:
    """Verify that ``path`` holds a plain ``state_dict`` of tensors; return it as a ``Path``.

    Loads with :func:`flowmap.io.safe_load` (``torch.load(path, map_location="cpu",
    weights_only=True)``), whose restricted unpickler refuses arbitrary globals, so a pickle
    payload is rejected without being run; a missing, truncated or payload-carrying file raises
    :class:`flowmap.io.UnsafeFileError` (a ``ValueError``), and so does a file that is not a
    mapping of names to tensors. ``what`` names the file in the messages. Successful checks are
    remembered per (path, size, mtime) to avoid reloading a ~95 MB file on every call.
    """
    p = Path(path).expanduser().resolve()
    if p.is_file():
        st = p.stat()
        if (str(p), st.st_size, st.st_mtime_ns) in _CHECKED:
            return p
    state = safe_load(p, what)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise UnsafeFileError(
            f"Refused the {what} {str(p)!r}: it is not a state_dict of named tensors."
        )
    st = p.stat()
    _CHECKED.add((str(p), st.st_size, st.st_mtime_ns))
    return p


def verified_inception_weights(path: str | os.PathLike[str] | None = None) -> Path:
    """:func:`resolve_inception_weights` then :func:`check_weights_file`; call before building."""
    return check_weights_file(resolve_inception_weights(path))
