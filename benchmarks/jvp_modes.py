"""Does a finite-difference JVP train like autodiff? The same preset on digits, each seed run once
with ``jvp: autodiff`` and once with ``jvp: finite_difference`` (same data, noise and pairs:
neither method draws random numbers), compared against the seed-to-seed spread.

    python benchmarks/jvp_modes.py --preset meanflow --net unet --steps 1500 --seeds 0 1 2 \
        --out benchmarks/results/jvp-modes

Reported: the training loss in windows of ``--window`` steps (mean per seed; the paired difference
finite difference − autodiff with its 95% t interval over seeds beside the interval of autodiff's
own seeds), the wall time per step, and FID at 1 and 2 jumps in the digits classifier's features
(2000 samples, jackknife interval) per run. The loop is benchmarks/self_distillation.py's: Adam,
no EMA, no schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from self_distillation import Data
from torch import nn

from flowmap.flowmap import FlowMap
from flowmap.metrics.intervals import t_interval
from flowmap.nets import MLP, UNet
from flowmap.ode import sample_consistency, sample_flow_map
from flowmap.presets import PRESETS

MODES = ("autodiff", "finite_difference")


def make_net(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLP((1, 8, 8), width=256, depth=4)
    return UNet(image_size=8, in_channels=1, channels=32, channel_mult=(1, 2), num_res_blocks=1)


def run(preset: str, mode: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training run: the per-step losses, the wall time and FID at 1 and 2 jumps."""
    spec = PRESETS[preset]
    config = {**spec.loss, "init_args": {**spec.loss.get("init_args", {}), "jvp": {"mode": mode}}}
    loss = dataclasses.replace(spec, loss=config).build_loss()
    data = Data("digits", args.batch, 0, seed)
    fm = FlowMap(make_net(args.net, seed))
    opt = torch.optim.Adam([*fm.parameters(), *loss.parameters()], lr=args.lr)
    torch.manual_seed(10_000 + seed)
    losses, start = [], time.perf_counter()
    for k in range(args.steps):
        value = loss(fm, data(), None, step=k)["loss"]
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(value.item())
    wall = time.perf_counter() - start
    x0 = torch.randn(2000, *data.shape, generator=torch.Generator().manual_seed(7))
    fid = {}
    with torch.no_grad():
        for nfe in (1, 2):
            if loss.pairs.one_time:  # re-noises between jumps
                g = torch.Generator().manual_seed(0)
                x = sample_consistency(fm, x0, fm.path, steps=nfe, generator=g).x
            else:
                x = sample_flow_map(fm, x0, steps=nfe).x
            x = x.clamp(-1, 1)
            fid[str(nfe)] = data.evaluator.measure(x).estimates()["fid"].as_dict()
    return {"losses": losses, "seconds_per_step": wall / args.steps, "fid": fid}


def _interval(values: list[float]) -> dict[str, float]:
    e = t_interval(values)
    return {"mean": e.value, "half_width": e.half_width}


def summarise(runs: dict[str, dict[int, dict]], seeds: list[int], window: int) -> dict[str, Any]:
    steps = len(runs[MODES[0]][seeds[0]]["losses"])
    windows = []
    for lo in range(0, steps, window):

        def mean_loss(mode: str, seed: int, lo: int = lo) -> float:
            return statistics.fmean(runs[mode][seed]["losses"][lo : lo + window])

        ad = [mean_loss("autodiff", s) for s in seeds]
        fd = [mean_loss("finite_difference", s) for s in seeds]
        windows.append(
            {
                "steps": [lo, min(lo + window, steps)],
                "autodiff": _interval(ad),
                "finite_difference": _interval(fd),
                "difference": _interval([f - a for f, a in zip(fd, ad)]),
            }
        )
    fid = {
        mode: {
            nfe: _interval([runs[mode][s]["fid"][nfe]["value"] for s in seeds])
            for nfe in ("1", "2")
        }
        for mode in MODES
    }
    fid["difference"] = {
        nfe: _interval(
            [
                runs["finite_difference"][s]["fid"][nfe]["value"]
                - runs["autodiff"][s]["fid"][nfe]["value"]
                for s in seeds
            ]
        )
        for nfe in ("1", "2")
    }
    speed = {
        mode: statistics.fmean(runs[mode][s]["seconds_per_step"] for s in seeds) for mode in MODES
    }
    return {"windows": windows, "fid": fid, "seconds_per_step": speed}


def _fmt(i: dict[str, float]) -> str:
    return f"{i['mean']:.4g} ± {i['half_width']:.2g}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset",
        default="meanflow",
        choices=[n for n, p in PRESETS.items() if not p.needs_teacher],
    )
    ap.add_argument("--net", choices=("mlp", "unet"), default="unet")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--window", type=int, default=250)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite the report from --out's runs"
    )
    args = ap.parse_args(argv)
    runs: dict[str, dict[int, dict]] = {m: {} for m in MODES}
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        runs = {m: {int(k): v for k, v in r.items()} for m, r in saved["runs"].items()}
        args = argparse.Namespace(**{**saved["config"], "out": args.out})
        command = saved["command"]  # the runs' command (this one only rewrote the report)
    for seed in args.seeds:
        for mode in MODES:
            if seed not in runs[mode]:
                runs[mode][seed] = run(args.preset, mode, seed, args)
                print(mode, seed, runs[mode][seed]["fid"], flush=True)
    summary = summarise(runs, args.seeds, args.window)
    lines = [
        "| steps | autodiff loss | finite difference loss | difference (paired) |",
        "|---|---|---|---|",
    ]
    for w in summary["windows"]:
        lines.append(
            f"| {w['steps'][0]}–{w['steps'][1]} | {_fmt(w['autodiff'])} | "
            f"{_fmt(w['finite_difference'])} | {_fmt(w['difference'])} |"
        )
    lines += ["", "| jvp | FID 1 jump | FID 2 jumps | s/step |", "|---|---|---|---|"]
    for mode in MODES:
        f = summary["fid"][mode]
        lines.append(
            f"| {mode} | {_fmt(f['1'])} | {_fmt(f['2'])} | {summary['seconds_per_step'][mode]:.4f} |"
        )
    f = summary["fid"]["difference"]
    lines.append(f"| difference (paired) | {_fmt(f['1'])} | {_fmt(f['2'])} | |")
    text = "\n".join(lines)
    print(text)
    result = {
        "command": command,
        "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "config": vars(args) | {"out": str(args.out)},
        "summary": summary,
        "runs": runs,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
        (args.out / "report.md").write_text(
            f"# Finite-difference against autodiff JVP: preset {args.preset}, digits, {args.net}\n\n"
            f"- command: `{result['command']}`\n- machine: {result['machine']}, torch "
            f"{result['torch']}\n- {args.steps} Adam steps at lr {args.lr}, batch {args.batch}, "
            f"seeds {args.seeds}; intervals: 95% t over seeds (FID: mean over seeds of each "
            f"run's value)\n\n{text}\n"
        )
    return result


if __name__ == "__main__":
    main()
