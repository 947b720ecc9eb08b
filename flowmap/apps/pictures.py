"""Pictures (matplotlib): samples as 2D scatter plots or image tiles, and quality against steps.

``grid_picture`` draws one panel per (method, NFE) from the same noise, rows = methods, columns =
NFE; ``samples_picture`` draws one set. 2D/vector samples are scatter plots of the first two
coordinates; images ``(N, C, H, W)`` in ``[-1, 1]`` (or uint8) are tiled.

``quality_vs_steps_plot`` draws a report's headline metric (FID or W2) against NFE on a linear
axis scaled to the rows worth comparing (off-scale values are marked at the top edge with their
value written), beside the distance from the teacher's endpoint; every method keeps one colour
and marker in every picture (``METHOD_STYLES``, then a fallback hashed from the name).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from torch import Tensor

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

__all__ = [
    "METHOD_STYLES",
    "grid_picture",
    "method_style",
    "quality_vs_steps_plot",
    "class_grid_picture",
    "quality_vs_guidance_plot",
    "samples_picture",
    "tile_images",
]


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


def class_grid_picture(
    x: Tensor, y: Tensor, path: str | Path, title: str = "", names: Sequence[str] | None = None
) -> Path:
    """Class-conditional samples with one row per class: images side by side (up to 16 per row),
    or, for vectors, one scatter colour per class. ``names`` label the rows."""
    classes = sorted({int(c) for c in y.tolist()})
    if x.dim() == 4:
        per = min(16, min(int((y == c).sum()) for c in classes))
        rows = torch.cat([x[y == c][:per] for c in classes])
        fig, ax = plt.subplots(figsize=(0.5 * per + 1.0, 0.5 * len(classes) + 0.6))
        tile = tile_images(rows, columns=per)
        ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0, vmax=1)
        h = x.shape[-2] + 1
        ax.set_yticks([h * (i + 0.5) for i in range(len(classes))])
        ax.set_yticklabels([names[c] if names else str(c) for c in classes], fontsize=7)
        ax.set_xticks([])
    else:
        fig, ax = plt.subplots(figsize=(4, 4))
        for c in classes:
            pts = x[y == c].detach().cpu().float()
            label = names[c] if names else str(c)
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, label=label)
        ax.legend(fontsize=6, markerscale=4)
    if title:
        ax.set_title(title, fontsize=8)
    return _save(fig, path, dpi=120)


# --------------------------------------------------------------------------- quality vs steps
#: ``(colour, marker)`` of every method name a report writes, the same in every picture. Teacher
#: solvers are drawn dashed and flow maps solid; the adaptive solve (the teacher's reference) is a
#: star. A name not listed here gets a colour hashed from it (``method_style``), drawn from a
#: palette none of these use.
METHOD_STYLES: dict[str, tuple[str, str]] = {
    "teacher/euler": ("#9467bd", "P"),
    "teacher/midpoint": ("#8c564b", "h"),
    "teacher/heun": ("#ff7f0e", "p"),
    "teacher/rk4": ("#e377c2", "d"),
    "teacher/dopri5": ("#000000", "*"),
    "teacher/adaptive": ("#000000", "*"),
    "flowmap/lagrangian": ("#1f77b4", "o"),
    "flowmap/eulerian": ("#d62728", "s"),
    "flowmap/semigroup": ("#2ca02c", "D"),
}
_FALLBACK_COLOURS = (
    "#17becf",
    "#bcbd22",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#5254a3",
)
_FALLBACK_MARKERS = ("o", "s", "D", "X", "h", "8")
_ADAPTIVE = ("teacher/dopri5", "teacher/adaptive")
#: A fixed-step teacher solver's rows set the y-axis from the first NFE at which its value comes
#: within this factor of the adaptive reference; flow-map rows always do.
NEAR_TEACHER = 3.0
FLOOR_LABEL = "floor: held-out data vs data (noise level, not a bound)"
CODEC_FLOOR_LABEL = "codec floor: decode(encode(held-out data)) vs data"
CLIPPED_LABEL = "above the axis (true value written over it)"


def method_style(name: str) -> tuple[str, str]:
    """The ``(colour, marker)`` of a method: ``METHOD_STYLES`` by its full name (``flowmap/eulerian``)
    or bare name (``eulerian``), else one picked by a hash of the name, the same in every run."""
    if name in METHOD_STYLES:
        return METHOD_STYLES[name]
    for prefix in ("teacher/", "flowmap/"):
        if prefix + name in METHOD_STYLES:
            return METHOD_STYLES[prefix + name]
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    n = len(_FALLBACK_COLOURS)
    return _FALLBACK_COLOURS[h % n], _FALLBACK_MARKERS[(h // n) % len(_FALLBACK_MARKERS)]


def _finite(e: Mapping[str, Any]) -> bool:
    return all(math.isfinite(float(e[k])) for k in ("value", "ci_low", "ci_high"))


def _series(results: Mapping[str, Any], key: str) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """``method → [(nfe, estimate), …]`` sorted by NFE, in the order the rows name the methods."""
    out: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for r in results["rows"]:
        e = r["metrics"].get(key)
        if e is not None and _finite(e):
            out.setdefault(r["method"], []).append((int(r["nfe"]), e))
    return {m: sorted(pts, key=lambda p: p[0]) for m, pts in out.items()}


def _y_range(
    series: Mapping[str, list[tuple[int, dict[str, Any]]]], floor: Any
) -> tuple[float, float]:
    """From 0 (or below, if an interval is) to a margin above the rows worth comparing: every flow
    map, the adaptive reference, and each fixed-step teacher solver from the first NFE at which it
    comes within ``NEAR_TEACHER``× of the reference; the floor is kept in view."""
    every = [e for pts in series.values() for _, e in pts]
    adaptive = next((pts for m, pts in series.items() if m in _ADAPTIVE), None)
    ref = adaptive[0][1]["value"] if adaptive else min(e["value"] for e in every)
    kept: list[dict[str, Any]] = []
    for m, pts in series.items():
        if m.startswith("teacher/") and m not in _ADAPTIVE:
            near = [i for i, (_, e) in enumerate(pts) if e["value"] <= NEAR_TEACHER * ref]
            kept += [e for _, e in pts[near[0] :]] if near else []
        else:
            kept += [e for _, e in pts]
    kept = kept or every
    if floor is not None and _finite(floor):
        kept.append(floor)
    hi = max(max(e["value"], e["ci_high"]) for e in kept)
    lo = min(0.0, *(e["ci_low"] for e in kept))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi + 0.08 * (hi - lo)


def _nfe_axis(ax: plt.Axes, ticks: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.grid(True, alpha=0.3)


def _draw_series(
    panel: plt.Axes,
    series: dict[str, list[tuple[int, dict[str, Any]]]],
    dodge: dict[str, float],
    top: float | None,
    clipped: dict[int, list[tuple[float, str, float]]],
) -> None:
    """Each method's points with error bars (the adaptive solve as a star); on the metric's
    panel (``top`` given) points above ``top`` go into ``clipped``."""
    for m, pts in series.items():
        colour, marker = method_style(m)
        ys = np.array([e["value"] for _, e in pts])
        err = np.array([[e["value"] - e["ci_low"], e["ci_high"] - e["value"]] for _, e in pts]).T
        if m in _ADAPTIVE:
            n = pts[0][0]
            panel.errorbar(
                [n],
                ys,
                yerr=err,
                marker="*",
                ms=13,
                ls="none",
                capsize=3,
                color=colour,
                label=f"{m} (adaptive reference, NFE {n}; dotted line)",
            )
            if top is not None:  # the metric's panel
                panel.axhline(ys[0], color=colour, ls=":", lw=0.8, alpha=0.7)
            continue
        xs = np.array([n * 2.0 ** dodge.get(m, 0.0) for n, _ in pts])
        panel.errorbar(
            xs,
            ys,
            yerr=err,
            marker=marker,
            ms=6,
            capsize=3,
            color=colour,
            label=m,
            ls="--" if m.startswith("teacher/") else "-",
            lw=1.4,
        )
        if top is not None:
            for (n, _), x, y in zip(pts, xs, ys):
                if y > top:
                    clipped.setdefault(n, []).append((x, colour, y))


def _mark_clipped(
    ax: plt.Axes, clipped: dict[int, list[tuple[float, str, float]]], top: float
) -> None:
    """A triangle at the top edge, with its value, for every point above the axes."""
    for stack in clipped.values():
        for k, (x, colour, y) in enumerate(sorted(stack, key=lambda c: c[2])):
            ax.plot(
                [x],
                [top],
                marker="^",
                ms=9,
                color=colour,
                mec="white",
                ls="none",
                clip_on=False,
                zorder=6,
            )
            ax.annotate(
                f"{y:.0f}" if abs(y) >= 100 else f"{y:.3g}",
                xy=(x, top),
                xytext=(0, 7 + 10 * k),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7.5,
                color=colour,
                fontweight="bold",
                annotation_clip=False,
            )


def quality_vs_steps_figure(results: Mapping[str, Any]) -> tuple[plt.Figure, tuple[plt.Axes, ...]]:
    """The figure of ``quality_vs_steps_plot``, not yet saved: ``(figure, (metric axes, endpoint
    axes))``. ``results`` is a report's ``results.json``."""
    metric = results["metric"]
    quality = _series(results, metric)
    endpoint = _series(results, "endpoint")
    floor = results.get("floor")
    fixed = [m for m in quality if m not in _ADAPTIVE]
    dodge = {m: (i - (len(fixed) - 1) / 2) * 0.04 for i, m in enumerate(fixed)}  # in log2(NFE)
    fig, (ax, ax_end) = plt.subplots(1, 2, figsize=(13, 6.4))
    codec_floor = results.get("codec_floor")  # latent data: what the codec alone costs
    bottom, top = _y_range(quality, floor)
    if codec_floor is not None and _finite(codec_floor):
        top = max(top, codec_floor["ci_high"] * 1.05)
    clipped: dict[int, list[tuple[float, str, float]]] = {}  # nfe → (x, colour, value)

    for panel, series in ((ax, quality), (ax_end, endpoint)):
        _draw_series(panel, series, dodge, top if panel is ax else None, clipped)
    _mark_clipped(ax, clipped, top)

    handles, labels = ax.get_legend_handles_labels()
    floors = ((floor, "k", "--", FLOOR_LABEL), (codec_floor, "tab:brown", ":", CODEC_FLOOR_LABEL))
    for estimate, colour, style, label in floors:
        if estimate is not None and _finite(estimate):  # the value and its interval as a band
            band = ax.axhspan(
                estimate["ci_low"], estimate["ci_high"], color=colour, alpha=0.12, lw=0
            )
            ax.axhline(estimate["value"], color=colour, ls=style, lw=1)
            line = Line2D([], [], color=colour, ls=style, lw=1)
            handles.append((Patch(facecolor=band.get_facecolor(), edgecolor="none"), line))
            labels.append(label)
    if clipped:
        handles.append(Line2D([], [], marker="^", ms=9, color="0.4", ls="none"))
        labels.append(CLIPPED_LABEL)

    name = metric.upper()
    ax.set_ylim(bottom, top)
    ax.set_ylabel(f"{name} (linear; lower is better)")
    ax.set_title(f"{name} against NFE", fontsize=10, pad=30 if clipped else 6)
    ax_end.set_yscale("log")
    ax_end.set_ylabel("distance from the teacher's adaptive endpoint (log)")
    ax_end.set_title("distance from the teacher's endpoint, same noise", fontsize=10)
    ticks = sorted({n for s in quality.values() for n, _ in s})
    _nfe_axis(ax, ticks)
    _nfe_axis(ax_end, sorted({n for s in endpoint.values() for n, _ in s}) or ticks)
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.045), ncol=3, fontsize=8)
    groups, size = results.get("groups"), results.get("group_size")
    where = f" ({groups} groups of {size} samples)" if groups and size else ""
    fig.text(
        0.01,
        0.012,
        f"Error bars and grey band: 95% intervals{where}. Floor: held-out data measured against "
        "the reference like a method's samples: the metric's noise level at this sample size, "
        "not a lower bound (rows may sit below it).",
        fontsize=8,
        ha="left",
        va="bottom",
    )
    n = results.get("n_samples")
    fig.suptitle(
        f"{results.get('dataset', '')}: {name} vs sampling steps"
        + (f" (n={n} per row, 95% intervals)" if n else ""),
        fontsize=11,
    )
    rows = math.ceil(len(handles) / 3)
    fig.tight_layout(rect=(0, 0.06 + 0.033 * rows, 1, 1))
    return fig, (ax, ax_end)


def quality_vs_steps_plot(results: Mapping[str, Any], path: Path) -> Path:
    """A report's headline metric (FID, W2) against NFE with 95% error bars, beside the distance
    from the teacher's endpoint, written as a PNG.

    The metric's axis is linear, from 0 to a margin above the rows worth comparing (flow maps, the
    adaptive reference, and each fixed-step teacher solver once within ``NEAR_TEACHER``× of it);
    a value above the top is drawn as a triangle on the top edge with the value written over it.
    Colours and markers are fixed per method name (``method_style``). The floor (held-out data
    measured like a method) is a grey band, labelled as a noise level and not a bound.
    """
    fig, _ = quality_vs_steps_figure(results)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quality_vs_guidance_plot(results: Mapping[str, Any], path: Path) -> Path:
    """FID (and class accuracy, when measured) against the guidance scale: one line per method
    at 1, 2 and 4 network evaluations and the teacher's adaptive solve, 95% error bars."""
    rows = [r for r in results["rows"] if r["nfe"] in (1, 2, 4) or r["method"].endswith("dopri5")]
    panels = ["fid"] + (["class_accuracy"] if results.get("class_accuracy") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        nfe = 0 if r["method"].endswith("dopri5") else r["nfe"]
        series.setdefault((r["method"], nfe), []).append(r)
    for ax, metric in zip(axes[0], panels):
        for (method, nfe), pts in sorted(series.items()):
            pts = sorted(pts, key=lambda r: r["guidance"])
            est = [r["metrics"].get(metric) for r in pts]
            keep = [(r["guidance"], e) for r, e in zip(pts, est) if e and _finite(e)]
            if not keep:
                continue
            colour, marker = method_style(method)
            ws = [w for w, _ in keep]
            vals = [e["value"] for _, e in keep]
            err = [
                [e["value"] - e["ci_low"] for _, e in keep],
                [e["ci_high"] - e["value"] for _, e in keep],
            ]
            style = "--" if method.startswith("teacher/") else "-"
            alpha = {1: 1.0, 2: 0.75, 4: 0.5}.get(nfe, 1.0)
            label = f"{method} ({'adaptive' if nfe == 0 else f'{nfe} NFE'})"
            ax.errorbar(
                ws,
                vals,
                yerr=err,
                color=colour,
                marker=marker,
                ls=style,
                alpha=alpha,
                capsize=2,
                ms=4,
                label=label,
            )
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel(
            {"fid": "FID (log scale; lower is better)", "class_accuracy": "class accuracy"}[metric]
        )
        if metric == "fid":  # few-step teacher rows are 10-100x the rest
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(
        f"{results.get('dataset', '')}: quality against guidance (95% intervals; NFE = network "
        "evaluations, a guided teacher step costs 2)",
        fontsize=8,
    )
    return _save(fig, path, dpi=120)
