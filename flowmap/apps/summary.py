"""What a report says in a terminal: the headline table of its results and where its files are
(printed by ``flowmap report`` and at the end of a recipe pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from io import StringIO
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["guidance_headline", "headline", "plot_name"]


def plot_name(metric: str) -> str:
    """The file of the quality-against-steps plot: ``fid_vs_steps.png``, ``w2_vs_steps.png``."""
    return f"{metric}_vs_steps.png"


def _pm(e: dict[str, Any] | None, ratio: dict[str, Any] | None = None) -> str:
    if e is None:
        return "-"
    text = f"{e['value']:.3g} ± {0.5 * (e['ci_high'] - e['ci_low']):.2g}"
    if ratio is not None:
        text += f" ({ratio['value']:.2f}×)"
    return text


def guidance_headline(results: dict[str, Any], out: Path, stages: bool = False) -> str:
    """A guidance report's last words: per scale, the teacher's adaptive solve and each flow map
    at 1 NFE (FID and class accuracy, 95% intervals), and where the files are."""
    table = Table(
        title=f"FID and class accuracy on {results['dataset']} against the guidance scale "
        f"({results['n_samples']} samples per row, ± = half-width of the 95% interval)",
        title_justify="left",
    )
    table.add_column("w", justify="right")
    table.add_column("method")
    table.add_column("NFE", justify="right")
    table.add_column("FID", justify="right")
    table.add_column("class accuracy", justify="right")
    for r in results["rows"]:
        if r["method"].endswith("dopri5") or (r["method"].startswith("flowmap/") and r["nfe"] == 1):
            acc = r["metrics"].get("class_accuracy")
            table.add_row(
                f"{r['guidance']:g}",
                r["method"],
                str(r["nfe"]),
                _pm(r, r.get("ratio_to_teacher")),
                _pm(acc),
            )
    buf = StringIO()
    console = Console(file=buf, width=120, force_terminal=False)
    console.print(table)
    console.print(
        f"Files: {out / 'report.md'} (every row, metric and goal), "
        f"{out / 'quality_vs_guidance.png'}, {out}/classes_w*.png, {out / 'results.json'}"
        + (f"; checkpoints under {out}/<stage>/." if stages else ".")
    )
    return buf.getvalue()


def headline(
    results: dict[str, Any], out: Path, nfes: Sequence[int] = (1, 2, 4), stages: bool = False
) -> str:
    """The main job's last words: quality at 1, 2 and 4 steps per method with 95% intervals (and
    the ratio to the teacher's adaptive solve), the inversion round trip, and where the files are."""
    if results.get("kind") == "guidance":
        return guidance_headline(results, out, stages)
    table = Table(
        title=f"{results['metric'].upper()} on {results['dataset']} ({results['n_samples']} "
        f"samples per row in {results['groups']} groups of {results['group_size']}, ± = "
        "half-width of the 95% interval)",
        title_justify="left",
    )
    table.add_column("method")
    for n in nfes:
        table.add_column(f"{n} step{'s' if n > 1 else ''}", justify="right")
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results["rows"]:
        rows.setdefault(r["method"], {})[r["nfe"]] = r
    ref = next((r for m, by in rows.items() if m.endswith("dopri5") for r in by.values()), None)
    if ref is not None:
        table.add_row(f"teacher, adaptive solve (NFE {ref['nfe']})", _pm(ref), "", "")
    table.add_row("floor: held-out data (noise level)", _pm(results.get("floor")), "", "")
    if results.get("codec_floor") is not None:
        table.add_row("codec floor: decode(encode(held-out))", _pm(results["codec_floor"]), "", "")
    for method, by in rows.items():
        if (
            method.endswith("dopri5")
            or method not in ("teacher/euler",)
            and "flowmap/" not in method
        ):
            continue
        cells = [_pm(by.get(n), by.get(n, {}).get("ratio_to_teacher")) for n in nfes]
        table.add_row(
            method.replace("flowmap/", "flow map, ").replace("teacher/euler", "teacher, Euler"),
            *cells,
        )
    rt = results.get("round_trip") or {}
    buf = StringIO()
    console = Console(file=buf, width=120, force_terminal=False)
    console.print(table)
    if rt.get("rows"):
        two = {r["method"]: r for r in rt["rows"] if r["nfe"] == 2}
        console.print(
            "Inversion, round trip noise -> data -> noise at 2 jumps each way (mean distance): "
            + ", ".join(f"{m.split('/')[-1]} {_pm(r)}" for m, r in two.items())
            + f"; the teacher's {rt['teacher']['method']} at NFE {rt['teacher']['nfe']}: "
            + _pm(rt["teacher"])
        )
    console.print(
        f"Files: {out / 'report.md'} (every row and metric), {out / plot_name(results['metric'])}, "
        f"{out / 'samples_grid.png'}, {out / 'results.json'}"
        + (f"; checkpoints under {out}/<stage>/." if stages else ".")
    )
    return buf.getvalue()
