"""Steering the unconditional digits map by a reward, and inpainting, against network calls.

Models (``recipes/digits/pipeline.py`` and ``recipes/digits_guided/pipeline.py`` make them): the
unconditional U-Net teacher and its Lagrangian map, and the class-conditional guided map.

* **Steer to class k** (every k of 0–9): reward :math:`r(x) = \\log p(k \\mid x)` under the
  package's digits CNN (:class:`~flowmap.steering.ClassReward`); judged by a *different* model, an
  RBF support-vector classifier on the pixels of the training split. Rows at their network calls
  (forward and gradient calls, per sample): no guidance (the map's jumps); flow-map look-ahead
  guidance on the map's jumps; the denoiser's look-ahead on the same jumps and on the teacher's
  Euler steps; best-of-N and importance resampling (:math:`\\lambda = 1`, weights :math:`p(k \\mid
  x)`: Bayes' rule makes the tilt :math:`p(x \\mid k)`) over one-jump candidates; the one-jump
  map fine-tuned on the reward (``flowmap fit --config recipes/digits/reward.yaml``, one per
  class, with the KL penalty and with the distance penalty); the class-conditional map at one
  jump with guidance w = 1 and 2 (the reference).
* **Inpainting**: the bottom half of test digits is hidden; reward :math:`-\\|M \\odot (x - y)\\|^2`
  on the top half. Masked error on the hidden half, the judge's accuracy of the true digit, FID
  against all digits.

Every guided row is run at each guidance scale; the headline scale of a row is chosen on a
separate noise seed by what a user can see without the judge (class: the smallest scale within
one point of the best accuracy of the reward's own classifier; inpainting: the smallest error
on the observed half). Cells are (class, seed) pairs (inpainting: seeds); a value is the mean
over cells with a 95% t interval; paired differences and ratios are taken per cell.

    python benchmarks/steering.py run        # everything, into benchmarks/results/steering
    python benchmarks/steering.py report     # report.md from results.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.svm import SVC
from torch import Tensor

from flowmap.apps.lightning_cli import cli_main
from flowmap.apps.report.results import machine_description
from flowmap.data.base import to_uint8
from flowmap.data.digits import load_digits_split
from flowmap.metrics.extractors import FeatureExtractor
from flowmap.metrics.fid import fid_from_statistics, fid_statistics
from flowmap.metrics.intervals import t_interval
from flowmap.ode import sample_flow_map
from flowmap.steering import (
    ClassReward,
    ObservationReward,
    RewardGuidance,
    best_of_n,
    guided_sample,
    importance_resample,
)
from flowmap.training import FlowMapModule, VelocityModule, load_module

OUT = Path("benchmarks/results/steering")
TEACHER = "runs/digits/teacher/checkpoints/last.ckpt"
MAP = "runs/digits/lagrangian/checkpoints/last.ckpt"
CONDITIONAL = "runs/digits_guided/lagrangian/checkpoints/last.ckpt"
TUNE_SEED = 100
SCALES = (1.0, 2.0, 4.0)
INPAINT_SCALES = (1.0, 2.0, 4.0)
SHAPE = (1, 8, 8)


# ------------------------------------------------------------------------------- the setting
class Setting:
    def __init__(self, args: argparse.Namespace) -> None:
        self.teacher = load_module(VelocityModule, args.teacher).eval()
        self.map = load_module(FlowMapModule, args.flowmap).sampling_flow_map.eval()
        self.conditional = load_module(FlowMapModule, args.conditional).sampling_flow_map.eval()
        x_train, y_train, x_test, y_test = load_digits_split()
        self.x_test, self.y_test = x_test, y_test
        self.x_all, self.y_all = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
        self.judge = SVC(gamma="scale", C=10.0).fit(x_train.flatten(1).numpy(), y_train.numpy())
        self.judge_test_accuracy = float(
            (self.judge.predict(x_test.flatten(1).numpy()) == y_test.numpy()).mean()
        )
        top = SVC(gamma="scale", C=10.0).fit(x_train[:, :, :4].flatten(1).numpy(), y_train.numpy())
        self.top_half_accuracy = float(
            (top.predict(x_test[:, :, :4].flatten(1).numpy()) == y_test.numpy()).mean()
        )
        self.features = FeatureExtractor("flowmap-digits")
        self.real = {
            k: self.features(to_uint8(self.x_all[self.y_all == k].clamp(-1, 1))) for k in range(10)
        }
        self.real_stats = {k: fid_statistics(f) for k, f in self.real.items()}
        self.all_stats = fid_statistics(self.features(to_uint8(self.x_all)))
        self.rewards = {k: ClassReward(k) for k in range(10)}

    def judge_labels(self, x: Tensor) -> np.ndarray:
        return self.judge.predict(x.clamp(-1, 1).flatten(1).double().numpy())

    def fid(self, x: Tensor, stats: dict[str, np.ndarray]) -> float:
        return fid_from_statistics(fid_statistics(self.features(to_uint8(x.clamp(-1, 1)))), stats)


def noise(n: int, seed: int, cell: int, candidates: int = 1) -> Tensor:
    """Noise of one cell; candidate 0 of a search is the other rows' own noise."""
    g = torch.Generator().manual_seed(seed * 1000 + cell)
    z = torch.randn(n, *SHAPE, generator=g)
    if candidates == 1:
        return z
    more = torch.randn(n, candidates - 1, *SHAPE, generator=g)
    return torch.cat([z[:, None], more], dim=1)


def diversity(x: Tensor) -> float:
    """Mean pairwise L2 distance between samples."""
    d = torch.cdist(x.flatten(1).double(), x.flatten(1).double())
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


# ------------------------------------------------------------------------------- the methods
#: guided families: (name, sampler, look-ahead, gradient, the steps K to run, calls a step)
FAMILIES = (
    ("flowmap_lookahead", "map", "flow_map", "input", (1, 2), 3),
    ("flowmap_lookahead_endpoint", "map", "flow_map", "endpoint", (1, 2, 3, 4), 2),
    ("denoiser_lookahead_map", "map", "denoiser", "input", (1, 2), 3),
    ("denoiser_lookahead_map_endpoint", "map", "denoiser", "endpoint", (1, 2, 3, 4), 2),
    ("denoiser_lookahead_teacher", "teacher", "denoiser", "input", (1, 2, 3, 4), 2),
    ("denoiser_lookahead_teacher_endpoint", "teacher", "denoiser", "endpoint", (2, 4, 6, 8), 1),
)


def rows_for(s: Setting, scales: tuple[float, ...], extra: list[dict[str, Any]]) -> list[dict]:
    """Every row of a task: ``run(noise, reward, scale) -> samples``, its calls and scales."""
    fm = s.map
    rows: list[dict[str, Any]] = [
        dict(method="none", calls=j, run=lambda z, r, sc, j=j: jumps(fm, z, j))
        for j in (1, 2, 4, 8)
    ]
    for name, sampler, lookahead, gradient, ks, calls in FAMILIES:
        model = fm if sampler == "map" else s.teacher
        for k in ks:
            cost = calls * k
            rows.append(
                dict(
                    method=name,
                    calls=cost,
                    scales=scales,
                    run=lambda z, r, sc, m=model, la=lookahead, gr=gradient, k=k, c=cost: guided(
                        m, z, r, sc, la, k, gr, c
                    ),
                )
            )
    for n in (2, 4, 8):
        rows.append(
            dict(method="best_of_n", calls=n, search=n, run=lambda z, r, sc: best_of_n(fm, r, z).x)
        )
    return rows + extra


def class_rows(s: Setting, finetuned: dict[str, dict[int, Any]]) -> list[dict[str, Any]]:
    """The class task's rows: the shared ones, importance resampling (lam = 1), the fine-tuned
    maps and the class-conditional map."""
    fm = s.map
    extra: list[dict[str, Any]] = [
        dict(
            method="resample",
            calls=n,
            search=n,
            run=lambda z, r, sc: (
                importance_resample(fm, r, z, 1.0, generator=torch.Generator().manual_seed(0)).x
            ),
        )
        for n in (2, 4, 8)
    ]
    for name, maps in finetuned.items():
        extra.append(
            dict(method=name, calls=1, run=lambda z, r, sc, m=maps: jumps(m[r.target], z, 1))
        )
    for w in (1.0, 2.0):
        extra.append(
            dict(
                method=f"conditional_w{w:g}",
                calls=1,
                run=lambda z, r, sc, w=w: conditional(s.conditional, z, r.target, w),
            )
        )
    return rows_for(s, SCALES, extra)


@torch.no_grad()
def jumps(fm: Any, z: Tensor, n: int) -> Tensor:
    return sample_flow_map(fm, z, steps=n).x


def guided(
    model: Any,
    z: Tensor,
    reward: Any,
    scale: float,
    lookahead: str,
    steps: int,
    gradient: str,
    calls: int,
) -> Tensor:
    how = RewardGuidance(reward, scale, lookahead, gradient=gradient)
    sol = guided_sample(model, z, how, steps=steps)
    if sol.nfe != calls:
        raise RuntimeError(
            f"{lookahead}/{gradient} at {steps} steps took {sol.nfe} calls, not {calls}"
        )
    return sol.x


@torch.no_grad()
def conditional(fm: Any, z: Tensor, k: int, w: float) -> Tensor:
    y = torch.full((len(z),), k)
    return sample_flow_map(fm, z, steps=1, cond={"y": y, "w": torch.full((len(z),), w)}).x


def row_label(row: dict[str, Any], scale: float | None) -> str:
    return row["method"] + f"@{row['calls']}" + ("" if scale is None else f"/s{scale:g}")


# ------------------------------------------------------------------------------- fine-tuning
#: the fine-tuning variants: row name -> (run folder prefix, overrides of the recipe)
FINETUNES = {
    "finetuned_kl": ("reward-kl", []),  # the recipe: penalty kl
    "finetuned_distance": ("reward", ["--model.loss.init_args.penalty=distance"]),  # beta 0.1
}


def finetune(args: argparse.Namespace) -> dict[str, dict[int, Any]]:
    """Reward fine-tuned one-jump maps, one per class and variant, through ``flowmap fit``."""
    maps: dict[str, dict[int, Any]] = {}
    for name, (prefix, overrides) in FINETUNES.items():
        maps[name] = {}
        for k in args.classes:
            root = Path(args.runs) / f"{prefix}-{k}"
            ckpt = root / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                cli_main(
                    [
                        "fit",
                        "--config",
                        "recipes/digits/reward.yaml",
                        f"--model.teacher={args.flowmap}",
                        f"--model.loss.init_args.reward.init_args.target={k}",
                        *overrides,
                        f"--trainer.max_steps={args.finetune_steps}",
                        f"--trainer.default_root_dir={root}",
                        "--trainer.enable_progress_bar=false",
                    ]
                )
            maps[name][k] = load_module(FlowMapModule, ckpt).sampling_flow_map.eval()
    return maps


# ------------------------------------------------------------------------------- measuring
def measure_class(s: Setting, row: dict[str, Any], scale: float | None, seed: int, args) -> dict:
    cells = []
    for k in args.classes:
        z = noise(args.n, seed, k, row.get("search", 1))
        x = row["run"](z, s.rewards[k], scale)
        cell = {
            "class": k,
            "seed": seed,
            "reward_accuracy": float((s.rewards[k].classifier(x).argmax(1) == k).float().mean()),
            "reward": float(s.rewards[k](x).mean()),
        }
        if seed != TUNE_SEED:
            cell["judge_accuracy"] = float((s.judge_labels(x) == k).mean())
            cell["fid"] = s.fid(x, s.real_stats[k])
            cell["diversity"] = diversity(x) / diversity(s.x_all[s.y_all == k])
        cells.append(cell)
    return {
        "label": row_label(row, scale),
        "method": row["method"],
        "calls": row["calls"],
        "scale": scale,
        "seed": seed,
        "cells": cells,
    }


def inpaint_rows(s: Setting) -> list[dict[str, Any]]:
    return rows_for(s, INPAINT_SCALES, [])


def inpaint_task(s: Setting, n: int) -> tuple[Tensor, Tensor, ObservationReward]:
    truth, labels = s.x_test[:n], s.y_test[:n]
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1.0  # the top half is observed
    return truth, labels, ObservationReward(truth * mask, mask)


def measure_inpaint(s: Setting, row: dict[str, Any], scale: float | None, seed: int, args) -> dict:
    truth, labels, reward = inpaint_task(s, args.n_inpaint)
    z = noise(len(truth), seed, 99, row.get("search", 1))
    x = row["run"](z, reward, scale)
    observed = reward.mask.expand_as(x)
    cell = {
        "seed": seed,
        "observed_error": float(((x - truth) * observed).pow(2).sum() / observed.sum()),
        "masked_error": float(reward.masked_error(x, truth).mean()),
    }
    if seed != TUNE_SEED:
        cell["judge_accuracy"] = float((s.judge_labels(x) == labels.numpy()).mean())
        cell["fid"] = s.fid(x, s.all_stats)
    return {
        "label": row_label(row, scale),
        "method": row["method"],
        "calls": row["calls"],
        "scale": scale,
        "seed": seed,
        "cells": [cell],
    }


def sweep(rows, measure, seeds) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        for scale in row.get("scales") or (None,):
            for seed in seeds:
                t0 = time.time()
                with torch.no_grad():  # guided_sample turns gradients on where it needs them
                    record = measure(row, scale, seed)
                out.append({**record, "seconds": time.time() - t0})
                print(f"  {out[-1]['label']} seed {seed}: {out[-1]['seconds']:.1f} s", flush=True)
    return out


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    started = time.time()
    s = Setting(args)
    finetuned = finetune(args) if args.finetune_steps > 0 else {}
    seeds = [TUNE_SEED, *args.seeds]
    print("class steering", flush=True)
    classes = sweep(
        class_rows(s, finetuned), lambda r, sc, sd: measure_class(s, r, sc, sd, args), seeds
    )
    print("inpainting", flush=True)
    inpaint = sweep(inpaint_rows(s), lambda r, sc, sd: measure_inpaint(s, r, sc, sd, args), seeds)
    results = {
        "command": "python " + shlex.join(sys.argv),
        "machine": machine_description(),
        "seconds": time.time() - started,
        "judge": {
            "model": "sklearn SVC(rbf, C=10) on train-split pixels",
            "test_accuracy": s.judge_test_accuracy,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "out")},
        "top_half_accuracy": s.top_half_accuracy,
        "class_steering": classes,
        "inpainting": inpaint,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    pictures(s, finetuned, args)
    report(args)


# ------------------------------------------------------------------------------- the report
def chosen_scales(records: list[dict], key: str, better: str) -> dict[str, float]:
    """Per (method, calls): the headline scale, from the tuning seed only."""
    table: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in records:
        if r["seed"] == TUNE_SEED and r["scale"] is not None:
            value = float(np.mean([c[key] for c in r["cells"]]))
            table.setdefault((r["method"], r["calls"]), []).append((r["scale"], value))
    out = {}
    for (method, calls), pairs in table.items():
        pairs.sort()
        if better == "max":
            best = max(v for _, v in pairs)
            out[f"{method}@{calls}"] = next(sc for sc, v in pairs if v >= best - 0.01)
        else:
            out[f"{method}@{calls}"] = min(pairs, key=lambda p: p[1])[0]
    return out


def cells_of(records, label: str) -> list[dict]:
    return [
        c for r in records if r["label"] == label and r["seed"] != TUNE_SEED for c in r["cells"]
    ]


def estimate(cells: list[dict], key: str) -> Any:
    return t_interval([c[key] for c in cells])


def paired(a: list[dict], b: list[dict], key: str, ratio: bool = False) -> Any:
    index = {(c.get("class"), c["seed"]): c[key] for c in b}
    values = [
        (c[key] / index[(c.get("class"), c["seed"])])
        if ratio
        else c[key] - index[(c.get("class"), c["seed"])]
        for c in a
    ]
    return t_interval(values)


def scale_text(scale: float | None) -> str:
    return "" if scale is None else f"{scale:g}"


def fmt(e: Any, scale: float = 1.0, digits: str = ".3g") -> str:
    return f"{e.value * scale:{digits}} [{e.ci_low * scale:{digits}}, {e.ci_high * scale:{digits}}]"


#: paired comparisons at equal calls: (flow-map look-ahead row, denoiser look-ahead row)
PAIRS = (
    ("flowmap_lookahead@3", "denoiser_lookahead_map@3"),
    ("flowmap_lookahead@6", "denoiser_lookahead_map@6"),
    ("flowmap_lookahead@6", "denoiser_lookahead_teacher@6"),
    ("flowmap_lookahead_endpoint@2", "denoiser_lookahead_map_endpoint@2"),
    ("flowmap_lookahead_endpoint@4", "denoiser_lookahead_map_endpoint@4"),
    ("flowmap_lookahead_endpoint@8", "denoiser_lookahead_map_endpoint@8"),
    ("flowmap_lookahead_endpoint@2", "denoiser_lookahead_teacher_endpoint@2"),
    ("flowmap_lookahead_endpoint@8", "denoiser_lookahead_teacher_endpoint@8"),
)


def headline(records: list[dict], chosen: dict[str, float], key: str) -> str:
    """The label of row ``key`` (``method@calls``) at its chosen scale."""
    return f"{key}/s{chosen[key]:g}" if key in chosen else key


def table(records: list[dict], chosen: dict[str, float], columns: list[tuple[str, str, float]]):
    first = min(r["seed"] for r in records if r["seed"] != TUNE_SEED)
    lines = []
    for r in records:
        key = f"{r['method']}@{r['calls']}"
        if r["seed"] != first or (r["scale"] is not None and chosen.get(key) != r["scale"]):
            continue
        cells = cells_of(records, r["label"])
        values = [fmt(estimate(cells, c), scale) for _, c, scale in columns]
        lines.append(
            f"| {r['method']} | {r['calls']} | {scale_text(r['scale'])} | "
            + " | ".join(values)
            + " |"
        )
    head = "| row | calls | scale | " + " | ".join(name for name, _, _ in columns) + " |"
    return [head, "|---|---|---|" + "---|" * len(columns), *lines]


def compare(records, chosen, a: str, b: str, keys: list[tuple[str, bool, float]]) -> str:
    la, lb = headline(records, chosen, a), headline(records, chosen, b)
    ca, cb = cells_of(records, la), cells_of(records, lb)
    if not ca or not cb:
        return f"- `{la}` vs `{lb}`: not run"
    parts = []
    for key, ratio, scale in keys:
        what = "ratio" if ratio else "difference"
        parts.append(f"{key} {what} {fmt(paired(ca, cb, key, ratio=ratio), scale)}")
    return f"- `{la}` vs `{lb}`: " + "; ".join(parts)


def section(records, chosen, columns, paired_title: str, keys) -> list[str]:
    """A task's table at the chosen scales, then its paired comparisons (:data:`PAIRS`)."""
    return [
        *table(records, chosen, columns),
        "",
        paired_title,
        "",
        *(compare(records, chosen, a, b, keys) for a, b in PAIRS),
    ]


def every_scale(records: list[dict]) -> list[str]:
    """Judge accuracy and FID of every guided row at every scale (the chosen one and the rest)."""
    lines = [
        "",
        "### Every scale (judge accuracy %, FID)",
        "",
        "| row | calls | " + " | ".join(f"s={sc:g}" for sc in SCALES) + " |",
        "|---|---|" + "---|" * len(SCALES),
    ]
    seen = []
    for r in records:
        key = (r["method"], r["calls"])
        if r["scale"] is None or key in seen:
            continue
        seen.append(key)
        row = []
        for sc in SCALES:
            cells = cells_of(records, f"{r['method']}@{r['calls']}/s{sc:g}")
            judge = 100 * np.mean([c["judge_accuracy"] for c in cells]) if cells else float("nan")
            fid = np.mean([c["fid"] for c in cells]) if cells else float("nan")
            row.append(f"{judge:.1f}, {fid:.3g}")
        lines.append(f"| {r['method']} | {r['calls']} | " + " | ".join(row) + " |")
    return lines


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    res = json.loads((out / "results.json").read_text())
    cls, inp = res["class_steering"], res["inpainting"]
    cs = chosen_scales(cls, "reward_accuracy", "max")
    ins = chosen_scales(inp, "observed_error", "min")
    st = res["settings"]
    keys = [("judge_accuracy", False, 100), ("fid", True, 1)]
    lines = [
        "# Steering the digits map by a reward, and inpainting",
        "",
        f"- command: `{res['command']}`",
        f"- machine: {res['machine']}; wall time {res['seconds']:.0f} s",
        f"- judge: {res['judge']['model']}, test accuracy {res['judge']['test_accuracy']:.3f}",
        f"- settings: {json.dumps(st)}",
        "- calls: network evaluations per sample, forward and gradient (backward) calls alike; "
        "the reward's classifier is not counted. `_endpoint` rows take the reward's gradient at "
        "the look-ahead and apply it at x_t (no backward call through the network)",
        "- values: mean over cells with a 95% t interval; cells are (class, seed) pairs for the "
        "class task and seeds for inpainting; `scale`: each guided row's scale, chosen on the "
        "tuning seed without the judge",
        "- FID: in the digits CNN's features (the reward's own network), against all real images "
        f"of the class ({st['n']} samples a cell; biased upward at this size: compare rows "
        "only)",
        "",
        "## Steer to class k",
        "",
        *section(
            cls,
            cs,
            [
                ("judge accuracy (%)", "judge_accuracy", 100),
                ("reward-classifier accuracy (%)", "reward_accuracy", 100),
                ("FID vs class k", "fid", 1),
                ("diversity / real", "diversity", 1),
            ],
            "Paired per cell, flow-map look-ahead against the denoiser's (judge accuracy in points):",
            keys,
        ),
    ]
    for name in FINETUNES:
        ft = cells_of(cls, f"{name}@1")
        if not ft:
            continue
        lines += [
            "",
            f"Reward fine-tuned one-jump map, `{name}` (`recipes/digits/reward.yaml`):",
            "",
        ]
        for w in ("1", "2"):
            lines.append(compare(cls, cs, f"{name}@1", f"conditional_w{w}@1", keys))
        per = ", ".join(
            f"{k}: {100 * np.mean([c['judge_accuracy'] for c in ft if c['class'] == k]):.1f}"
            for k in sorted({c["class"] for c in ft})
        )
        lines.append(f"- judge accuracy per class (%): {per}")
    lines += every_scale(cls)
    lines += [
        "",
        "## Inpainting the bottom half",
        "",
        f"{st['n_inpaint']} test digits, the top half observed. How much the top half says: "
        f"an SVC of the same kind trained on top halves alone names {res['top_half_accuracy']:.3f} "
        "of the test digits.",
        "",
        *section(
            inp,
            ins,
            [
                ("masked error (hidden half, MSE)", "masked_error", 1),
                ("observed error", "observed_error", 1),
                ("judge accuracy of the true digit (%)", "judge_accuracy", 100),
                ("FID vs all digits", "fid", 1),
            ],
            "Paired per seed, flow-map look-ahead against the denoiser's:",
            [("masked_error", False, 1), ("judge_accuracy", False, 100)],
        ),
    ]
    lines += ["", "![class steering](steering.png)", "", "![inpainting](inpainting.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))


def pictures(s: Setting, finetuned: dict[str, dict[int, Any]], args: argparse.Namespace) -> None:
    """Class steering: one row per method (two samples of each class); inpainting: observed,
    truth and the look-aheads at about 8 calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    res = json.loads((out / "results.json").read_text())
    cs = chosen_scales(res["class_steering"], "reward_accuracy", "max")
    ins = chosen_scales(res["inpainting"], "observed_error", "min")
    show = [
        "none@1",
        "flowmap_lookahead@6",
        "flowmap_lookahead_endpoint@8",
        "denoiser_lookahead_map_endpoint@8",
        "denoiser_lookahead_teacher_endpoint@8",
        "best_of_n@8",
        "finetuned_kl@1",
        "finetuned_distance@1",
        "conditional_w1@1",
    ]

    def grid(rows: dict[str, dict], chosen: dict[str, float], keys: list[str], make) -> None:
        keys = [k for k in keys if k in rows]
        fig, axes = plt.subplots(len(keys), 1, figsize=(10, 1.3 * len(keys)))
        for ax, key in zip(np.atleast_1d(axes), keys):
            x = make(rows[key], chosen.get(key)).clamp(-1, 1)[:, 0]
            ax.imshow(torch.cat(list(x), dim=1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(key + (f" (scale {chosen[key]:g})" if key in chosen else ""), fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        return fig

    rows = {f"{r['method']}@{r['calls']}": r for r in class_rows(s, finetuned)}

    def classes(row, scale):
        return torch.cat(
            [
                row["run"](noise(2, args.seeds[0], k, row.get("search", 1)), s.rewards[k], scale)
                for k in args.classes
            ]
        )

    with torch.no_grad():
        fig = grid(rows, cs, show, classes)
    fig.savefig(out / "steering.png", dpi=120)
    plt.close(fig)
    truth, _, reward = inpaint_task(s, 12)
    rows = {f"{r['method']}@{r['calls']}": r for r in inpaint_rows(s)}
    rows["observed"] = dict(run=lambda z, r, sc: truth * reward.mask - (1 - reward.mask))
    rows["truth"] = dict(run=lambda z, r, sc: truth)
    keys = ["observed", "truth", *show[1:5], "best_of_n@8"]

    def inpainted(row, scale):
        return row["run"](noise(12, args.seeds[0], 99, row.get("search", 1)), reward, scale)

    with torch.no_grad():
        fig = grid(rows, ins, keys, inpainted)
    fig.savefig(out / "inpainting.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--teacher", default=TEACHER)
    r.add_argument("--flowmap", default=MAP)
    r.add_argument("--conditional", default=CONDITIONAL)
    r.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--n", type=int, default=200, help="samples per (class, seed) cell")
    r.add_argument("--n-inpaint", type=int, default=300)
    r.add_argument("--finetune-steps", type=int, default=300)
    r.add_argument("--runs", default="runs/steering")
    r.add_argument("--out", default=str(OUT))
    r.set_defaults(func=run)
    rep = sub.add_parser("report")
    rep.add_argument("--out", default=str(OUT))
    rep.set_defaults(func=report)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
