r"""The report of a class-conditional teacher and its guided flow maps: quality and class accuracy
against the guidance scale :math:`w` and the number of network evaluations.

``flowmap report --teacher T.ckpt --flowmap L.ckpt --guidance 1 2 4 --out DIR`` (chosen
automatically when the teacher is class-conditional).

Protocol, at each scale :math:`w`:

* labels :math:`0..K-1` in equal shares and the same noise for every row (and every :math:`w`);
* rows: the guided teacher's fixed-step solvers, whose NFE counts *network evaluations* (a guided
  step evaluates the conditional and the unconditional branch, one doubled batch, so it costs 2;
  at :math:`w = 1` it costs 1), its adaptive solve (``teacher/dopri5``, the reference of the
  ratios) and every flow map at each ``--nfe`` up to 8 jumps (one evaluation each, at any
  :math:`w` of its training range);
* metrics: FID, KID and precision/recall against a **class-balanced** reference (every class
  equally often, so a sampler that follows its labels is not charged for the data's own class
  imbalance), with the report's 95% intervals (:class:`~flowmap.metrics.evaluation.Evaluator`);
  and **class accuracy**: the share of samples asked for class :math:`c` that the package's
  digits classifier labels :math:`c`, per group, mean ± Student-t 95% interval (digits only);
* the FID ratio of each row to ``teacher/dopri5`` at the same :math:`w`, per group on the same
  noise.

Files: ``report.md`` (one table per scale, the goals), ``quality_vs_guidance.png`` (FID and class
accuracy against :math:`w` at 1, 2, 4 evaluations), ``classes_w<w>.png`` (one row per class for
the teacher and each flow map at one jump), ``results.json``; finished rows are kept in
``DIR/rows/`` so a killed run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from flowmap.apps.report import _load_row, _save_row
from flowmap.conditioning import guidance_cost
from flowmap.data.base import to_uint8
from flowmap.metrics.evaluation import Evaluator, Measurement
from flowmap.metrics.intervals import Replicates
from flowmap.ode import STAGES
from flowmap.protocols import Solution
from flowmap.training import FlowMapModule, VelocityModule

__all__ = ["run_guidance_report", "class_accuracy_replicates", "balanced_labels"]

ADAPTIVE = "teacher/dopri5"
#: metrics shown in the tables, in order
COLUMNS = ("fid", "kid", "precision", "recall", "class_accuracy")


def balanced_labels(n: int, k: int) -> Tensor:
    """Labels ``0..k-1`` in equal shares (``n·c//k`` boundaries), interleaved so that every
    replicate group of the evaluator (contiguous blocks) holds every class equally."""
    return torch.arange(n) % k


def class_accuracy_replicates(
    classifier: torch.nn.Module, x: Tensor, y: Tensor, groups: int
) -> Replicates:
    """Per group, the share of samples whose predicted class is their asked-for label."""
    with torch.no_grad():
        pred = torch.cat([classifier(c.float()).argmax(1) for c in x.split(1000)])
    hit = (pred.cpu() == y.cpu()).double().numpy()
    return Replicates("replicates", np.array([g.mean() for g in np.array_split(hit, groups)]))


def _balanced_reference(dm: Any, split: str, seed: int) -> tuple[Tensor, Tensor]:
    """The largest class-balanced subset of ``split`` (``K`` times the smallest class)."""
    labels = dm.split_labels(split)
    counts = torch.bincount(labels, minlength=dm.num_classes)
    return dm.labelled_reference(int(counts.min()) * dm.num_classes, split, seed)


def _run_batched(run: Callable[[Tensor, Tensor], Solution], x0: Tensor, y: Tensor, batch: int):
    from flowmap.apps.report import sampling_device  # (report imports this module lazily)

    outs, nfe, device = [], 0, sampling_device()
    for xs, ys in zip(x0.split(batch), y.split(batch)):
        sol = run(xs.to(device), ys.to(device))
        outs.append(sol.x.cpu())
        nfe = max(nfe, sol.nfe)
    return torch.cat(outs), nfe


def _cell(e: dict[str, Any] | None, digits: str = ".3g") -> str:
    if not e:
        return "—"
    half = 0.5 * (e["ci_high"] - e["ci_low"])
    return f"{e['value']:{digits}} ± {half:.2g}"


def plan_guided_rows(
    teacher: VelocityModule,
    flowmaps: dict[str, tuple[FlowMapModule, str]],
    cfg: Any,
    w: float,
) -> tuple[list[tuple[str, int, Callable, str]], list[str]]:
    """``(method, nfe, run(x0, y), source)`` rows at scale ``w``, and the skipped ones."""
    rows, skipped = [], []
    cost = guidance_cost(w)
    for solver in cfg.solvers:
        per_step = STAGES[solver] * cost
        for nfe in cfg.nfe:
            if nfe % per_step:
                skipped.append(f"teacher/{solver} at NFE {nfe}, w={w:g} (a step costs {per_step})")
                continue
            rows.append(
                (
                    f"teacher/{solver}",
                    nfe,
                    lambda x, y, s=solver, n=nfe: teacher.generate(x, n, s, y=y, guidance=w),
                    cfg.teacher,
                )
            )
    rows.append(
        (
            ADAPTIVE,
            0,
            lambda x, y: teacher.generate(
                x, method="dopri5", rtol=cfg.rtol, atol=cfg.atol, y=y, guidance=w
            ),
            cfg.teacher,
        )
    )
    for label, (fm, path) in flowmaps.items():
        low, high = fm.guidance_range
        if not low - 1e-6 <= w <= high + 1e-6:
            skipped.append(f"flowmap/{label} at w={w:g} (trained at w in [{low:g}, {high:g}])")
            continue
        for nfe in cfg.nfe:
            if nfe > 8:
                continue
            rows.append(
                (
                    f"flowmap/{label}",
                    nfe,
                    lambda x, y, m=fm, n=nfe: m.generate(x, n, y=y, guidance=w),
                    path,
                )
            )
    return rows, skipped


def run_guidance_report(
    cfg: Any,
    teacher: VelocityModule,
    flowmaps: dict[str, tuple[FlowMapModule, str]],
    dm: Any,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Measure every row at every scale of ``cfg.guidance`` and write the files into ``cfg.out``."""
    start = time.time()
    k = teacher.num_classes
    for label, (fm, _) in flowmaps.items():
        if fm.num_classes != k:
            raise ValueError(
                f"The flow map {label!r} has {fm.num_classes or 'no'} classes but the teacher "
                f"{k}; report a flow map beside the teacher it was distilled from."
            )
    if not getattr(dm, "is_image", False) or not hasattr(dm, "labelled_reference"):
        raise ValueError(
            "The guidance report measures labelled image data (digits, CIFAR-10, image folders "
            "with labels: true); this teacher's data has no class-balanced reference."
        )
    scales = [float(w) for w in (cfg.guidance or [1.0])]
    for w in scales:
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"Guidance scales must be finite and >= 0, got {w}; fix --guidance.")
    out = Path(cfg.out)
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    n = int(cfg.n_samples or 10_000)
    groups = int(cfg.groups or 20)
    ref_x, ref_y = _balanced_reference(dm, cfg.reference_split, cfg.seed)
    kw: dict[str, Any] = {"groups": groups, "seed": cfg.seed, "feature": cfg.feature}
    kw["weights"] = cfg.inception_weights
    evaluator = Evaluator(to_uint8(ref_x), **kw)
    evaluator.check_sample_count(n)
    classifier = None
    if tuple(dm.data_shape) == (1, 8, 8) and k == 10:
        from flowmap.metrics.digits_extractor import load_digits_extractor

        classifier = load_digits_extractor()
    g = torch.Generator().manual_seed(cfg.seed)
    x0 = torch.randn(n, *dm.data_shape, generator=g)
    y = balanced_labels(n, k)

    def row_file(key: str, source: str) -> Path:
        stat = os.stat(source) if source else None
        ident = [source, stat and stat.st_size, stat and stat.st_mtime_ns, n, groups, cfg.seed]
        ident += [cfg.rtol, cfg.atol, evaluator.feature, cfg.reference_split, len(ref_x)]
        digest = hashlib.sha1(repr(ident).encode()).hexdigest()[:12]
        return rows_dir / f"{key.replace('/', '__')}-{digest}.npz"

    results_rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    pictures: dict[float, dict[str, Tensor]] = {}
    exact: dict[float, Tensor] = {}  # the adaptive solve's samples at each scale
    plans = {w: plan_guided_rows(teacher, flowmaps, cfg, w) for w in scales}
    total = sum(len(p[0]) for p in plans.values())
    with Progress(transient=False) as bar:
        task = bar.add_task("guidance report rows", total=total)
        for w in scales:
            rows, skip = plans[w]
            skipped += skip
            measured: dict[str, Measurement] = {}
            rows = sorted(rows, key=lambda r: r[0] != ADAPTIVE)
            for method, nfe, run, source in rows:
                key = f"{method}@{nfe}@w{w:g}" if nfe else f"{method}@w{w:g}"
                f = row_file(key, source)
                if f.exists():
                    x, used, meas = _load_row(f, groups)
                else:
                    sample, used = _run_batched(run, x0, y, cfg.batch_size)
                    if nfe and used != nfe:
                        raise RuntimeError(f"{key} used {used} NFE, not {nfe}.")
                    x = evaluator.prepare(sample)
                    meas = evaluator.measure(x)
                    if classifier is not None:
                        meas.replicates["class_accuracy"] = class_accuracy_replicates(
                            classifier, sample, y, groups
                        )
                    _save_row(f, x, used, meas)
                if method == ADAPTIVE:
                    exact[w] = x
                elif w in exact and "endpoint" not in meas.replicates:
                    meas.replicates["endpoint"] = evaluator.endpoint(x, exact[w])
                measured[key] = meas
                est = {m: e.as_dict() for m, e in meas.estimates().items()}
                row = {"method": method, "nfe": used, "guidance": w, **est["fid"], "metrics": est}
                ref = measured.get(f"{ADAPTIVE}@w{w:g}")
                if ref is not None and method != ADAPTIVE:
                    row["ratio_to_teacher"] = meas.ratio(ref, "fid").as_dict()
                results_rows.append(row)
                if (nfe == 1 and method.startswith("flowmap/")) or method == ADAPTIVE:
                    pictures.setdefault(w, {})[f"{method} (NFE {used})"] = x[: 16 * k]
                bar.update(task, advance=1, description=f"{key}: FID {est['fid']['value']:.3g}")
    results = {
        **meta,
        "kind": "guidance",
        "metric": "fid",
        "feature": evaluator.feature,
        "n_samples": n,
        "groups": groups,
        "num_classes": k,
        "guidance": scales,
        "reference": f"class-balanced {cfg.reference_split} split, {len(ref_x)} images "
        f"({len(ref_x) // k} per class)",
        "class_accuracy": "digits classifier (flowmap.metrics.digits_extractor)"
        if classifier is not None
        else None,
        "rows": results_rows,
        "skipped": skipped,
    }
    if cfg.save_samples is not None:
        results["skipped"].append(
            f"samples.npz (--save-samples): the guidance report keeps each row's samples in "
            f"{rows_dir}/ instead"
        )
    results["goals"] = guidance_goals(results)
    results["seconds"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(guidance_markdown(results))
    from flowmap.apps.pictures import class_grid_picture, quality_vs_guidance_plot

    quality_vs_guidance_plot(results, out / "quality_vs_guidance.png")
    yk = balanced_labels(16 * k, k)
    for w, panels in pictures.items():
        for name, x in panels.items():
            stem = name.split(" ")[0].replace("/", "-")
            class_grid_picture(
                x, yk[: len(x)], out / f"classes_w{w:g}_{stem}.png", f"{name}, w = {w:g}"
            )
    return results


def _find(rows: list[dict[str, Any]], method: str, nfe: int | None, w: float) -> dict | None:
    for r in rows:
        if r["method"] == method and r["guidance"] == w and (nfe is None or r["nfe"] == nfe):
            return r
    return None


def guidance_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals per flow map and scale, each with the measured values and a verdict: 1-NFE
    class accuracy at most 2 points below the teacher's adaptive solve, 1-NFE FID at most 1.3×
    the teacher's (the point ratio; its interval is kept beside it), and 1 NFE better than the
    guided teacher's best fixed-step solver at 16 evaluations (intervals disjoint), in FID and in
    distance from the guided ODE's endpoint (the adaptive solve on the same noise). Under
    guidance FID does not measure accuracy: a solver's error can weaken the guidance and bring
    its samples closer to the data than the exact guided ODE's, so both are given."""
    goals = []
    rows = results["rows"]
    for w in results["guidance"]:
        ref = _find(rows, ADAPTIVE, None, w)
        for r in rows:
            if r["guidance"] != w or r["nfe"] != 1 or not r["method"].startswith("flowmap/"):
                continue
            g: dict[str, Any] = {"method": r["method"], "guidance": w}
            acc, ref_acc = (x["metrics"].get("class_accuracy") if x else None for x in (r, ref))
            if acc and ref_acc:
                gap = 100 * (acc["value"] - ref_acc["value"])
                g["class_accuracy_gap_points"] = gap
                g["class_accuracy_within_2_points"] = gap >= -2.0
            ratio = r.get("ratio_to_teacher")
            if ratio:
                g["fid_ratio"] = ratio
                g["fid_within_1.3x"] = ratio["value"] <= 1.3
            sixteen = [
                x for x in rows if x["guidance"] == w and x["nfe"] == 16 and x["method"] != ADAPTIVE
            ]
            sixteen = [x for x in sixteen if x["method"].startswith("teacher/")]
            if sixteen:
                best = min(sixteen, key=lambda x: x["value"])
                g["teacher_16_evaluations"] = {"method": best["method"], "fid": best["value"]}
                g["beats_teacher_at_16_evaluations"] = r["ci_high"] < best["ci_low"]
                mine = r["metrics"].get("endpoint")
                theirs = [x["metrics"]["endpoint"] for x in sixteen if "endpoint" in x["metrics"]]
                if mine and theirs:
                    near = min(theirs, key=lambda e: e["value"])
                    g["endpoint"] = mine
                    g["teacher_16_evaluations_endpoint"] = near
                    g["closer_to_the_guided_ode_than_teacher_at_16"] = (
                        mine["ci_high"] < near["ci_low"]
                    )
            goals.append(g)
    return goals


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
                f"| {r['method']} | {r['nfe']} | {_cell(m.get('fid'))} | "
                f"{_cell(r.get('ratio_to_teacher'))} | {_cell(m.get('kid'), '.2g')} | "
                f"{_cell(m.get('precision'))} | {_cell(m.get('recall'))} | "
                f"{_cell(m.get('class_accuracy'))} | {_cell(m.get('endpoint'))} |"
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
                + f" | {_cell(g.get('fid_ratio'))} | "
                + (f"{sixteen['method']} FID {sixteen['fid']:.3g}" if sixteen else "—")
                + f" | {g.get('beats_teacher_at_16_evaluations', '—')} | "
                + f"{_cell(g.get('endpoint'))}, {_cell(g.get('teacher_16_evaluations_endpoint'))}"
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
