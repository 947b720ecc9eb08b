"""Input conversion shared by the metrics: tensors or arrays → float64 numpy arrays."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["ArrayLike", "as_float64_array"]

#: What the metrics accept for samples, features, means and covariances.
ArrayLike = Tensor | np.ndarray


def as_float64_array(x: ArrayLike, name: str, *, finite: bool = False) -> np.ndarray:
    """``x`` as a float64 numpy array (tensors are detached and moved to CPU first).

    Args:
        x: a ``torch.Tensor`` or ``numpy.ndarray``.
        name: the argument's name, for the error messages.
        finite: also require every entry to be finite.

    Raises:
        TypeError: ``x`` is neither a tensor nor an array.
        ValueError: ``finite`` is set and ``x`` contains NaN or infinite values.
    """
    if isinstance(x, Tensor):
        a = x.detach().cpu().to(torch.float64).numpy()
    elif isinstance(x, np.ndarray):
        a = x.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")
    if finite and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a
