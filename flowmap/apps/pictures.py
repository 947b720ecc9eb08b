"""Pictures of samples (matplotlib): 2D scatter plots and image tiles, alone or as a grid.

``grid_picture`` draws one panel per (method, NFE) from the same noise, rows = methods, columns =
NFE; ``samples_picture`` draws one set. 2D/vector samples are scatter plots of the first two
coordinates; images ``(N, C, H, W)`` in ``[-1, 1]`` (or uint8) are tiled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import Tensor

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = ["grid_picture", "samples_picture", "tile_images"]


def tile_images(x: Tensor, columns: int | None = None) -> np.ndarray:
    """Images ``(N, C, H, W)`` (floats in ``[-1, 1]`` or uint8) as one ``(rows·H, cols·W[, 3])``
    array in ``[0, 1]``, one pixel of white between tiles."""
    x = x.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else ((x.float() + 1) / 2).clamp(0, 1)
    n, c, h, w = x.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = x[i]
    out = canvas.permute(1, 2, 0).numpy()
    return out[..., 0] if c == 1 else out


def _draw(ax: plt.Axes, x: Tensor, limits: tuple[float, float] | None) -> None:
    if x.dim() == 4:
        tile = tile_images(x[:64])
        ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=1)
    else:
        pts = x.detach().cpu().float().flatten(1).numpy()
        ax.scatter(pts[:, 0], pts[:, 1] if pts.shape[1] > 1 else np.zeros(len(pts)), s=1, alpha=0.4)
        if limits is not None:
            ax.set_xlim(*limits)
            ax.set_ylim(*limits)
        ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def _limits(sets: list[Tensor]) -> tuple[float, float] | None:
    if not sets or sets[0].dim() == 4:
        return None
    ref = torch.cat([s.detach().float().flatten(1)[:, :2] for s in sets])
    lo, hi = torch.quantile(ref, 0.005).item(), torch.quantile(ref, 0.995).item()
    pad = 0.1 * (hi - lo)
    return lo - pad, hi + pad


def _save(fig: plt.Figure, path: str | Path, dpi: int) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def grid_picture(
    panels: Mapping[str, Mapping[int, Tensor]],
    path: str | Path,
    references: Mapping[str, Tensor] | None = None,
    title: str = "",
) -> Path:
    """One panel per ``panels[method][nfe]`` (rows = methods, columns = NFE), then one row of
    ``references`` (e.g. the teacher's adaptive solve and the data); written as a PNG."""
    nfes = sorted({k for row in panels.values() for k in row})
    refs = dict(references or {})
    n_rows = len(panels) + (1 if refs else 0)
    n_cols = max(len(nfes), len(refs), 1)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.8 * n_cols + 1, 1.8 * n_rows + 0.6), squeeze=False
    )
    limits = _limits(list(refs.values()) or [x for row in panels.values() for x in row.values()])
    for ax in axes.flat:
        ax.axis("off")
    for r, (method, row) in enumerate(panels.items()):
        for c, nfe in enumerate(nfes):
            if nfe in row:
                ax = axes[r, c]
                ax.axis("on")
                _draw(ax, row[nfe], limits)
                ax.set_title(f"NFE {nfe}", fontsize=7)
        ax = axes[r, 0]
        if nfes and nfes[0] not in row:  # an empty first panel still carries the row's name
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        ax.set_ylabel(method, fontsize=7)
    for c, (name, x) in enumerate(refs.items()):
        ax = axes[-1, c]
        ax.axis("on")
        _draw(ax, x, limits)
        ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi=110)


def samples_picture(x: Tensor, path: str | Path, title: str = "") -> Path:
    """One set of samples as a PNG: a scatter plot (vectors) or a tile of up to 64 images."""
    fig, ax = plt.subplots(figsize=(4, 4))
    _draw(ax, x, _limits([x]))
    if title:
        ax.set_title(title, fontsize=8)
    return _save(fig, path, dpi=120)
