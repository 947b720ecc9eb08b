"""Reflow beside distillation, from one teacher at equal compute.

For each seed: a CFM teacher (checkerboard: trained here; digits: the U-Net of
``runs/digits/teacher``, ``flowmap fit --config recipes/digits/teacher.yaml``), then

* ``reflow``: ``--couplings`` noise–sample pairs from the teacher's adaptive ODE
  (:func:`flowmap.reflow.draw_couplings`) and the 1-rectified flow, flow matching on them from the
  teacher's weights (``--reflow-steps``);
* ``distilled``: a Lagrangian flow map (``LagrangianLoss()``) distilled from the same teacher, from
  its weights, for as long (wall clock) as the reflow took, couplings included;
* ``distilled_reflow``: the same distillation from the 1-rectified flow instead (as many steps).

Measured: W2 (2D, 4000 samples in 5 groups) or FID in the digits classifier's features (2000
samples, jackknife) of the teachers' Euler steps, adaptive solves and the maps' jumps at 1/2/4/8
NFE, and the straightness and one-Euler-step error of both teachers (2000 noises, each against its
own adaptive endpoint). Cells are means over seeds with a 95% t interval (one seed: its own).

    python benchmarks/reflow.py run --target checkerboard --seeds 0 1 2
    python benchmarks/reflow.py run --target digits --seeds 0
    python benchmarks/reflow.py report
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.apps.report.results import machine_description
from flowmap.data.digits import load_digits_split
from flowmap.data.toy2d import toy2d_sample
from flowmap.flowmap import FlowMap
from flowmap.losses import LagrangianLoss, cfm_loss
from flowmap.metrics.evaluation import Evaluator
from flowmap.metrics.intervals import t_interval
from flowmap.nets import MLP
from flowmap.ode import sample_flow_map, solve_adaptive, solve_ode
from flowmap.paths import AffinePath
from flowmap.reflow import draw_couplings, euler_error, straightness
from flowmap.training import VelocityModule, load_module

NFES = (1, 2, 4, 8)
OUT = Path("benchmarks/results/reflow")
DIGITS_TEACHER = Path("runs/digits/teacher/checkpoints/last.ckpt")
PATH = AffinePath("linear")


class Setup:
    """Data, evaluator, net and budgets of one target."""

    def __init__(self, target: str, seed: int) -> None:
        self.target, self.seed, self.image = target, seed, target == "digits"
        self.g = torch.Generator().manual_seed(seed + 1)
        if self.image:
            self.train, _, _, _ = load_digits_split()
            self.shape = tuple(self.train.shape[1:])
            ref = ((self.train + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            self.evaluator, self.metric, self.n_eval = Evaluator(ref, groups=10), "fid", 2000
            self.batch = 128
        else:
            self.shape = (2,)
            ref = toy2d_sample(target, 4000, torch.Generator().manual_seed(10_000 + seed))
            self.evaluator, self.metric, self.n_eval = Evaluator(ref, groups=5), "w2", 4000
            self.batch = 1024

    def data(self) -> Tensor:
        if self.image:
            return self.train[torch.randint(len(self.train), (self.batch,), generator=self.g)]
        return toy2d_sample(self.target, self.batch, self.g)

    def measure(self, x: Tensor) -> dict[str, Any] | None:
        if not torch.isfinite(x).all():
            return None
        x = x.clamp(-1, 1) if self.image else x
        return self.evaluator.measure(x).estimates()[self.metric].as_dict()


def velocity_of(net: nn.Module):
    return lambda x, t, **c: net(x, t, t, **c)


def cfm(net: nn.Module, setup: Setup, steps: int, lr: float, couplings: dict | None = None):
    """``steps`` Adam steps of flow matching: on fresh data and noise, or on couplings."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    v = velocity_of(net)
    for _ in range(steps):
        if couplings is None:
            loss = cfm_loss(v, setup.data(), PATH)
        else:
            i = torch.randint(len(couplings["x0"]), (setup.batch,), generator=setup.g)
            loss = cfm_loss(v, couplings["x1"][i], PATH, x0=couplings["x0"][i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def distil(
    net: nn.Module,
    teacher: nn.Module,
    setup: Setup,
    lr: float,
    seconds: float | None,
    steps: int | None,
):
    """Lagrangian distillation of ``teacher``'s velocity into ``net`` (warm: a copy of it), for
    ``seconds`` of wall clock or ``steps`` steps; returns the steps taken."""
    fm, loss = FlowMap(net), LagrangianLoss()
    frozen = copy.deepcopy(teacher).requires_grad_(False)
    b = velocity_of(frozen)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    start, k = time.perf_counter(), 0
    while (steps is not None and k < steps) or (
        seconds is not None and time.perf_counter() - start < seconds
    ):
        out = loss(fm, setup.data(), b, step=k)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        k += 1
    return fm, k


@torch.no_grad()
def teacher_rows(net: nn.Module, setup: Setup, x0: Tensor, rtol: float) -> dict[str, Any]:
    v = velocity_of(net)
    row = {str(n): setup.measure(solve_ode(v, x0, "euler", nfe=n).x) for n in NFES}
    end = solve_adaptive(v, x0, rtol=rtol, atol=rtol)
    row["adaptive"], row["adaptive_nfe"] = setup.measure(end.x), end.nfe
    probe = x0[:2000]
    row["euler_error"] = euler_error(v, probe, end.x[:2000])
    row["straightness"] = straightness(v, probe)
    return row


@torch.no_grad()
def map_rows(fm: FlowMap, setup: Setup, x0: Tensor) -> dict[str, Any]:
    return {str(n): setup.measure(sample_flow_map(fm, x0, steps=n).x) for n in NFES}


def make_net(setup: Setup, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(setup.shape, width=256, depth=4)


def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    (args.out / "rows").mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        file = args.out / "rows" / f"{args.target}__s{seed}.json"
        if file.is_file():
            print(f"{file}: done, skipped")
            continue
        setup = Setup(args.target, seed)
        x0 = torch.randn(setup.n_eval, *setup.shape, generator=torch.Generator().manual_seed(7))
        row: dict[str, Any] = {"target": args.target, "seed": seed, "metric": setup.metric}
        clock = time.perf_counter
        if setup.image:
            teacher = load_module(VelocityModule, DIGITS_TEACHER).sampling_net
            row["teacher_source"] = str(DIGITS_TEACHER)
        else:
            teacher = make_net(setup, seed)
            t0 = clock()
            cfm(teacher, setup, args.teacher_steps, args.lr)
            row["teacher_s"] = clock() - t0
        teacher.requires_grad_(False)
        row["teacher"] = teacher_rows(teacher, setup, x0, args.rtol)
        t0 = clock()
        tol = {"rtol": args.rtol, "atol": args.rtol}
        pairs = draw_couplings(
            velocity_of(teacher), args.couplings, setup.shape, seed=100 + seed, batch=2000, **tol
        )
        row["couplings_s"] = clock() - t0
        reflowed = copy.deepcopy(teacher).requires_grad_(True)
        t1 = clock()
        cfm(reflowed, setup, args.reflow_steps, args.lr, pairs)
        row["reflow_train_s"] = clock() - t1
        row["reflow_s"] = clock() - t0
        reflowed.requires_grad_(False)
        row["reflow"] = teacher_rows(reflowed, setup, x0, args.rtol)
        fm, k = distil(
            copy.deepcopy(teacher).requires_grad_(True),
            teacher,
            setup,
            args.distil_lr,
            row["reflow_s"],
            None,
        )
        row["distilled"], row["distilled_steps"] = map_rows(fm, setup, x0), k
        fm_r, _ = distil(
            copy.deepcopy(reflowed).requires_grad_(True), reflowed, setup, args.distil_lr, None, k
        )
        row["distilled_reflow"] = map_rows(fm_r, setup, x0)
        row.update(
            command="python " + shlex.join(sys.argv),
            machine=f"{machine_description()}, {torch.get_num_threads()} torch threads",
            couplings=args.couplings,
            reflow_steps=args.reflow_steps,
            rtol=args.rtol,
            teacher_steps=None if setup.image else args.teacher_steps,
            lr=args.lr,
            distil_lr=args.distil_lr,
            batch=setup.batch,
        )
        file.write_text(json.dumps(row, indent=1))
        print(
            json.dumps(
                {
                    k: row[k]
                    for k in ("target", "seed", "couplings_s", "reflow_s", "distilled_steps")
                }
            )
        )
        print(
            "teacher",
            {k: row["teacher"][k] for k in ("euler_error", "straightness")},
            "reflow",
            {k: row["reflow"][k] for k in ("euler_error", "straightness")},
            flush=True,
        )


def _cell(values: list[dict | None]) -> dict | None:
    if any(v is None for v in values):
        return None
    if len(values) == 1:
        return values[0]
    return t_interval([v["value"] for v in values]).as_dict()


def _fmt(e: dict | None) -> str:
    return (
        "non-finite" if e is None else f"{e['value']:.3g} ± {(e['ci_high'] - e['ci_low']) / 2:.2g}"
    )


def _scalar(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3g}"
    e = t_interval(values)
    return f"{e.value:.3g} ± {e.half_width:.2g}"


def cmd_report(args: argparse.Namespace) -> None:
    rows = [json.loads(p.read_text()) for p in sorted((args.out / "rows").glob("*.json"))]
    meta = [{"command": r["command"], "machine": r["machine"]} for r in rows]
    lines = [
        "# Reflow beside distillation, from one teacher at equal compute",
        "",
        "- commands: "
        + "; ".join(dict.fromkeys(f"`{m['command']}`" for m in meta))
        + "; then `python benchmarks/reflow.py report`",
        f"- machine: {meta[-1]['machine']} (another benchmark shared the second core; the "
        "distillation's wall-clock budget is measured in the same process, right after the reflow)",
        "- cells: mean over seeds ± the half-width of the 95% t interval over them (one seed: its "
        "own interval over sample groups). Euler error: E|x0 + b_0(x0) - x1| against the same "
        "ODE's adaptive endpoint; straightness: ∫ E|(x1 - x0) - b_t(x_t)|² dt along the flow "
        "(Liu et al.), both on 2000 noises.",
        "",
    ]
    summary: dict[str, Any] = {}
    for target in sorted({r["target"] for r in rows}):
        sel = [r for r in rows if r["target"] == target]
        r0, metric = sel[0], sel[0]["metric"].upper()
        lines += [f"## {target}", ""]
        budget = (
            f"teacher {r0['teacher_steps']} CFM steps (batch {r0['batch']}, lr {r0['lr']})"
            if r0.get("teacher_steps")
            else f"teacher `{r0['teacher_source']}`"
        )
        lines += [
            f"{len(sel)} seed(s); {budget}; reflow: {r0['couplings']} couplings (dopri5, rtol "
            f"{r0.get('rtol', 1e-5):g}) and "
            f"{r0['reflow_steps']} flow-matching steps from the teacher's weights; distillation: "
            "LagrangianLoss() from the teacher's weights for the reflow's wall clock (couplings "
            f"included): {_scalar([r['distilled_steps'] for r in sel])} steps at lr "
            f"{r0['distil_lr']}; reflow took {_scalar([r['reflow_s'] for r in sel])} s, of which "
            f"couplings {_scalar([r['couplings_s'] for r in sel])} s.",
            "",
            f"| model | sampler | {metric} 1 NFE | 2 NFE | 4 NFE | 8 NFE | adaptive (NFE) | "
            "Euler error | straightness |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        summary[target] = {}
        for key, label, sampler in (
            ("teacher", "CFM teacher", "Euler"),
            ("reflow", "1-rectified flow", "Euler"),
            ("distilled", "Lagrangian map of the teacher", "jumps"),
            ("distilled_reflow", "Lagrangian map of the rectified flow", "jumps"),
        ):
            cells = {str(n): _cell([r[key][str(n)] for r in sel]) for n in NFES}
            extra = ["", "", ""]
            if "adaptive" in r0[key]:
                cells["adaptive"] = _cell([r[key]["adaptive"] for r in sel])
                nfe = sum(r[key]["adaptive_nfe"] for r in sel) / len(sel)
                extra = [
                    f"{_fmt(cells['adaptive'])} ({nfe:.0f})",
                    _scalar([r[key]["euler_error"] for r in sel]),
                    _scalar([r[key]["straightness"] for r in sel]),
                ]
            summary[target][key] = cells
            lines.append(
                f"| {label} | {sampler} | "
                + " | ".join(_fmt(cells[str(n)]) for n in NFES)
                + " | "
                + " | ".join(extra)
                + " |"
            )
        ratios = [r["reflow"]["euler_error"] / r["teacher"]["euler_error"] for r in sel]
        lines += [
            "",
            f"Goal: the 1-rectified flow's one-Euler-step error over the teacher's: "
            f"{_scalar(ratios)} (≤ 0.5 to meet it).",
            "",
        ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1)
    )
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument(
        "--target",
        default="checkerboard",
        choices=["checkerboard", "8gaussians", "moons", "digits"],
    )
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--teacher-steps", type=int, default=3000)
    run.add_argument("--couplings", type=int, default=50_000)
    run.add_argument("--reflow-steps", type=int, default=2000)
    run.add_argument("--rtol", type=float, default=1e-5, help="dopri5's tolerance (= atol)")
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--distil-lr", type=float, default=1e-4)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--out", type=Path, default=OUT)
    run.set_defaults(fn=cmd_run)
    rep = sub.add_parser("report")
    rep.add_argument("--out", type=Path, default=OUT)
    rep.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
