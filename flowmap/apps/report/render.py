"""A report's files from its results: ``report.md``, the pictures and ``results.json``; one
renderer for the steps report (quality against NFE) and one for the guidance axis (quality and
class accuracy against the scale :math:`w`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from flowmap.apps.pictures import (
    class_grid_picture,
    grid_picture,
    quality_vs_guidance_plot,
    quality_vs_steps_plot,
)
from flowmap.apps.report.config import ADAPTIVE, TARGET_HALF_WIDTH
from flowmap.apps.report.diagnostics import balanced_labels
from flowmap.apps.summary import plot_name

__all__ = [
    "cell",
    "guidance_markdown",
    "steps_markdown",
    "write_guidance_files",
    "write_steps_files",
]


def cell(e: dict[str, Any] | None, digits: str = ".4g", missing: str = "n/a") -> str:
    """An estimate as ``value ± half-width`` of its 95% interval."""
    if not e:
        return missing
    return f"{e['value']:{digits}} ± {0.5 * (e['ci_high'] - e['ci_low']):.2g}"


def _gcell(e: dict[str, Any] | None, digits: str = ".3g") -> str:
    return cell(e, digits, "—")


def _table(results: dict[str, Any], key: str, nfes: list[int], ratio: bool = False) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|" + "---|" * len(nfes),
    ]
    for m in dict.fromkeys(r["method"] for r in results["rows"]):
        if m == ADAPTIVE:
            continue
        by = {
            r["nfe"]: (r.get("ratio_to_teacher") if ratio else r["metrics"].get(key))
            for r in results["rows"]
            if r["method"] == m
        }
        if all(v is None for v in by.values()):
            continue
        lines.append(f"| {m} | " + " | ".join(cell(by.get(n)) for n in nfes) + " |")
    return lines


def _goal_lines(results: dict[str, Any]) -> list[str]:
    metric = results["metric"]
    target = TARGET_HALF_WIDTH.get(metric)
    if target is None:
        return []
    rel = [
        (f"{r['method']}@{r['nfe']}", 0.5 * (r["ci_high"] - r["ci_low"]) / abs(r["value"]))
        for r in results["rows"]
    ]
    met = [k for k, v in rel if v <= target]
    worst = max(rel, key=lambda kv: kv[1])
    return [
        f"- interval target: half-width ≤ {target:.0%} of the value — met by {len(met)} of "
        f"{len(rel)} rows (widest: {worst[0]} at {worst[1]:.1%})."
    ]


def _codec_floor_lines(results: dict[str, Any]) -> list[str]:
    """The codec floor of a latent report: what the codec alone costs."""
    coded = results.get("codec_floor")
    if coded is None:
        return []
    name = results["metric"].upper()
    return [
        f"- codec floor: the same held-out set through the codec, decode(encode(x)) with the "
        f"posterior mean, against the same reference: {name} {cell(coded)} — what the latent "
        "space alone costs; rows are decoded samples."
    ]


def steps_markdown(results: dict[str, Any], skipped: list[str]) -> str:
    metric = results["metric"]
    name = metric.upper()
    nfes = sorted({r["nfe"] for r in results["rows"] if r["method"] != ADAPTIVE})
    adaptive = next((r for r in results["rows"] if r["method"] == ADAPTIVE), None)
    fl = results["floor"]
    lines = [
        f"# {name} vs sampling steps: {results['dataset']}",
        "",
        f"- metric: {name} ({results['feature']}), {results['n_samples']} samples per row, the "
        "same noise for every method",
        f"- intervals: 95%, from {results['groups']} disjoint groups of "
        f"{results['group_size']} samples used as independent replicates — {results['interval_note']}",
        f"- floor: {results['floor_sets']}: {name} {cell(fl)}. Not a lower bound: a model can "
        "land below it; a row whose interval overlaps the floor's cannot be told from data here.",
        *_codec_floor_lines(results),
        *_goal_lines(results),
        f"- command: `{results['command']}`",
        f"- machine: {results['machine']}",
        f"- seed: {results['seed']}; wall time: {results.get('seconds', 0):.0f} s",
        f"- versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
        "",
        f"## {name} (value ± half-width of the 95% interval)",
        "",
        *_table(results, metric, nfes),
    ]
    if adaptive is not None:
        lines += [
            "",
            f"Adaptive reference `{ADAPTIVE}` (rtol {results['rtol']}, atol {results['atol']}): "
            f"{name} {cell(adaptive['metrics'][metric])} at NFE {adaptive['nfe']} (what the "
            "solver used).",
            "",
            f"## {name} relative to `{ADAPTIVE}` (per group, same noise)",
            "",
            *_table(results, metric, nfes, ratio=True),
            "",
            f"## Distance from `{ADAPTIVE}`'s endpoint for the same noise (mean per sample)",
            "",
            *_table(results, "endpoint", nfes),
        ]
    for key, title in (
        ("kid", "KID (unbiased MMD², cubic kernel, in the same features)"),
        ("precision", "Precision (share of samples on the data manifold, k = 3)"),
        ("recall", "Recall (share of data covered by the samples' manifold, k = 3)"),
    ):
        if any(key in r["metrics"] for r in results["rows"]):
            floor = (
                f" Floor: {cell(results['floor_metrics'].get(key))}."
                if key in results["floor_metrics"]
                else ""
            )
            lines += ["", f"## {title}", "", *_table(results, key, nfes), "", floor.strip()]
    lines += _round_trip_lines(results.get("round_trip"))
    if results.get("ddim_vs_euler"):
        gaps = results["ddim_vs_euler"]
        lines += [
            "",
            "## DDIM and Euler",
            "",
            "The teacher's DDIM, run in its own variables, against Euler of the converted velocity "
            "on DDIM's timestep grid, on the first 256 noises (largest coordinate difference; "
            "zero to rounding on the linear path, where they are one method; the `teacher/euler` "
            "rows use a grid uniform in t instead): "
            + ", ".join(f"NFE {k}: {v:.1e}" for k, v in gaps.items())
            + ".",
        ]
    lines += [
        "",
        "## Samples",
        "",
        "![samples: rows = methods, columns = NFE, same noise](samples_grid.png)",
        "",
        f"![{name} vs NFE]({plot_name(metric)})",
    ]
    if skipped:
        lines += ["", "Not run (below one step of the solver): " + "; ".join(skipped) + "."]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def _round_trip_lines(rt: dict[str, Any] | None) -> list[str]:
    if not rt or not (rt.get("rows") or rt.get("forward_only")):
        return []
    lines = [
        "",
        "## Inversion: round trip noise -> data -> noise (mean distance from the noise)",
        "",
    ]
    if rt.get("rows"):
        ref = rt["teacher"]
        lines += [
            f"The yardstick is the teacher's own fixed-step solve both ways, `{ref['method']}` at "
            f"NFE {ref['nfe']} each way: {cell(ref)}.",
            "",
            "| flow map | jumps each way | round-trip distance |",
            "|---|---|---|",
            *(f"| {r['method']} | {r['nfe']} | {cell(r)} |" for r in rt["rows"]),
        ]
    if rt.get("forward_only"):
        lines += [
            "",
            "Not inverted (trained forward only, `backward_fraction` 0): "
            + ", ".join(rt["forward_only"])
            + ".",
        ]
    return lines


def write_steps_files(
    out: Path,
    results: dict[str, Any],
    skipped: list[str],
    samples: dict[str, Tensor],
    entries: list[tuple[str, int, str, Any]],
    reference: Tensor,
) -> None:
    """``results.json``, ``report.md``, the quality-against-NFE plot and ``samples_grid.png``
    (every method and NFE from the same noise, beside the adaptive solve and the data)."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(steps_markdown(results, skipped))
    quality_vs_steps_plot(results, out / plot_name(results["metric"]))
    shown = 2000 if reference.dim() == 2 else 64
    panels: dict[str, dict[int, Tensor]] = {}
    refs: dict[str, Tensor] = {}
    for method, nfe, key, _ in entries:
        if method == ADAPTIVE:
            refs[f"{ADAPTIVE} (NFE {nfe})"] = samples[key][:shown]
        else:
            panels.setdefault(method, {})[nfe] = samples[key][:shown]
    refs["data"] = reference[:shown]
    grid_picture(
        panels,
        out / "samples_grid.png",
        refs,
        title=f"{results['dataset']}: same noise in every panel",
    )


def guidance_markdown(results: dict[str, Any]) -> str:
    """``report.md`` of a guidance report."""
    k = results["num_classes"]
    lines = [
        f"# {results.get('dataset', 'data')}: class-conditional sampling against the guidance "
        "scale",
        "",
        f"{results['n_samples']} samples per row, labels 0..{k - 1} in equal shares, the same "
        f"noise in every row; reference: {results['reference']}; features: "
        f"{results['feature']}. Intervals are 95%: FID by delete-a-group jackknife over "
        f"{results['groups']} groups, the other metrics mean ± Student-t over the groups. NFE "
        "counts network evaluations: a guided teacher step costs 2 (both branches), a flow-map "
        "jump 1. Class accuracy: "
        + (results["class_accuracy"] or "no classifier for this dataset")
        + ".",
        "",
        "![quality against guidance](quality_vs_guidance.png)",
        "",
    ]
    for w in results["guidance"]:
        lines += [
            f"## w = {w:g}",
            "",
            "| method | NFE | FID | ratio to dopri5 | KID | precision | recall | class accuracy "
            "| distance from the dopri5 endpoint |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["rows"]:
            if r["guidance"] != w:
                continue
            m = r["metrics"]
            lines.append(
                f"| {r['method']} | {r['nfe']} | {_gcell(m.get('fid'))} | "
                f"{_gcell(r.get('ratio_to_teacher'))} | {_gcell(m.get('kid'), '.2g')} | "
                f"{_gcell(m.get('precision'))} | {_gcell(m.get('recall'))} | "
                f"{_gcell(m.get('class_accuracy'))} | {_gcell(m.get('endpoint'))} |"
            )
        lines.append("")
    if results.get("goals"):
        lines += [
            "## Goals at 1 NFE",
            "",
            "| flow map | w | class accuracy vs dopri5 (points) | FID ratio | "
            "teacher at 16 evaluations (best FID) | beats it in FID | endpoint distance: map, "
            "teacher at 16 (best) | closer to the guided ODE |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g in results["goals"]:
            gap = g.get("class_accuracy_gap_points")
            sixteen = g.get("teacher_16_evaluations")
            lines.append(
                f"| {g['method']} | {g['guidance']:g} | "
                + (f"{gap:+.1f}" if gap is not None else "—")
                + f" | {_gcell(g.get('fid_ratio'))} | "
                + (f"{sixteen['method']} FID {sixteen['fid']:.3g}" if sixteen else "—")
                + f" | {g.get('beats_teacher_at_16_evaluations', '—')} | "
                + f"{_gcell(g.get('endpoint'))}, {_gcell(g.get('teacher_16_evaluations_endpoint'))}"
                + f" | {g.get('closer_to_the_guided_ode_than_teacher_at_16', '—')} |"
            )
        lines.append("")
    if results.get("skipped"):
        lines += ["Skipped: " + "; ".join(results["skipped"]) + ".", ""]
    lines += [
        f"Command: `{results.get('command', '')}`; machine: {results.get('machine', '')}; "
        f"{results.get('seconds', 0):.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write_guidance_files(
    out: Path, results: dict[str, Any], pictures: dict[float, dict[str, Tensor]]
) -> None:
    """``results.json``, ``report.md``, ``quality_vs_guidance.png`` and one class grid per scale
    and panel of ``pictures`` (``{w: {name: samples}}``, labels in :func:`balanced_labels` order)."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(guidance_markdown(results))
    quality_vs_guidance_plot(results, out / "quality_vs_guidance.png")
    k = results["num_classes"]
    yk = balanced_labels(16 * k, k)
    for w, panels in pictures.items():
        for name, x in panels.items():
            stem = name.split(" ")[0].replace("/", "-")
            class_grid_picture(
                x, yk[: len(x)], out / f"classes_w{w:g}_{stem}.png", f"{name}, w = {w:g}"
            )
