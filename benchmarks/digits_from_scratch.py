"""From scratch on digits with the U-Net, at the compute of teacher plus distillation.

The digits route of the recipes costs a CFM teacher (``recipes/digits/teacher.yaml``: 6000 steps)
plus a Lagrangian distillation (``recipes/digits/lagrangian.yaml``: 1500 steps), both at batch 128
with the recipe's U-Net. This script times one step of each and of the preset on this machine,
trains the preset from scratch (same U-Net, batch 128, AdamW at ``--lr`` with warm-up and cosine
decay, FlowMapModule's EMA, a DivergenceGuard) for as many steps as that compute buys, and measures
FID in the digits classifier's features (2000 samples, jackknife) at 1/2/4/8 jumps beside the
trained teacher's adaptive solve (``runs/digits/teacher``) on the same noise and evaluator.

    python benchmarks/digits_from_scratch.py --preset lsd --out benchmarks/results/digits-from-scratch
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from flowmap.apps.report.results import machine_description
from flowmap.data.digits import load_digits_split
from flowmap.flowmap import FlowMap
from flowmap.losses import LagrangianLoss, cfm_loss
from flowmap.metrics.evaluation import Evaluator
from flowmap.nets import UNet
from flowmap.ode import sample_flow_map, solve_adaptive
from flowmap.paths import AffinePath
from flowmap.presets import build_loss
from flowmap.training import DivergenceGuard, VelocityModule, load_module
from flowmap.training.base import EMAWithWarmup

TEACHER = Path("runs/digits/teacher/checkpoints/last.ckpt")
TEACHER_STEPS, DISTIL_STEPS, BATCH = 6000, 1500, 128


def unet() -> UNet:
    return UNet(image_size=8, in_channels=1, channels=32, channel_mult=[1, 2], num_res_blocks=1)


def ms_per_step(step, n: int = 10) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return 1000 * (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="lsd")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="cap (a smoke test)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/digits-from-scratch"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, _, _, _ = load_digits_split()
    g = torch.Generator().manual_seed(args.seed + 1)

    def batch():
        return x_train[torch.randint(len(x_train), (BATCH,), generator=g)]

    path = AffinePath("linear")
    # --- the cost of a step of each stage, timed here
    probe = FlowMap(unet())
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    frozen = copy.deepcopy(probe.net).requires_grad_(False)
    lagrangian, preset = LagrangianLoss(), build_loss(args.preset)

    def run(loss_of):
        def step():
            loss = loss_of(batch())
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    cost = {
        "cfm": ms_per_step(run(lambda x: cfm_loss(probe.velocity, x, path))),
        "distil": ms_per_step(
            run(lambda x: lagrangian(probe, x, lambda y, t: frozen(y, t, t))["loss"])
        ),
        "preset": ms_per_step(run(lambda x: preset(probe, x, None)["loss"])),
    }
    budget_ms = TEACHER_STEPS * cost["cfm"] + DISTIL_STEPS * cost["distil"]
    steps = int(budget_ms / cost["preset"])
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    print(
        f"ms per step {cost}; {steps} {args.preset} steps buy the teacher + distillation",
        flush=True,
    )
    # --- the preset from scratch
    torch.manual_seed(args.seed)
    fm = FlowMap(unet())
    loss = build_loss(args.preset)
    opt = torch.optim.AdamW([*fm.parameters(), *loss.parameters()], lr=args.lr)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, k / steps))),
    )
    ema = AveragedModel(fm.net, avg_fn=EMAWithWarmup(0.999))
    guard = DivergenceGuard(keep=False)
    start = time.perf_counter()
    diverged = None
    for k in range(steps):
        x1 = batch()
        out = loss(fm, x1, None, step=k)
        try:
            guard(fm, x1, step=k, loss=out["loss"])
        except Exception as err:  # DivergenceError: recorded, the run stops
            diverged = {"step": k, "why": str(err).split(". ")[0]}
            break
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        ema.update_parameters(fm.net)
        if k % 500 == 0:
            print(f"step {k}: loss {float(out['loss']):.4g}", flush=True)
    wall = time.perf_counter() - start
    # --- quality
    ref = ((x_train + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    evaluator = Evaluator(ref, groups=10)
    x0 = torch.randn(2000, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    sampler = FlowMap(ema.module)
    quality = {}
    with torch.no_grad():
        for n in (1, 2, 4, 8):
            x = sample_flow_map(sampler, x0, steps=n).x
            ok = bool(torch.isfinite(x).all())
            quality[str(n)] = (
                evaluator.measure(x.clamp(-1, 1)).estimates()["fid"].as_dict() if ok else None
            )
        teacher = load_module(VelocityModule, TEACHER)
        end = solve_adaptive(teacher, x0, rtol=1e-4, atol=1e-4)
        teacher_fid = evaluator.measure(end.x.clamp(-1, 1)).estimates()["fid"].as_dict()
    result = {
        "command": "python " + shlex.join(sys.argv),
        "machine": f"{machine_description()}, {torch.get_num_threads()} torch threads",
        "preset": args.preset,
        "ms_per_step": cost,
        "budget": f"{TEACHER_STEPS} CFM + {DISTIL_STEPS} Lagrangian steps at batch {BATCH}",
        "steps": steps,
        "wall_s": wall,
        "diverged": diverged,
        "quality": quality,
        "teacher_adaptive": teacher_fid,
        "teacher_adaptive_nfe": end.nfe,
        "ratio_1_jump": None
        if quality["1"] is None
        else quality["1"]["value"] / teacher_fid["value"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.preset}_s{args.seed}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
