"""Training-step cost of every flow-map loss relative to a CFM step of the same network, and
Lightning's overhead over a plain PyTorch loop — ratios measured in one process.

    python benchmarks/throughput.py [--width 256 --depth 2 --batch 1024 --steps 30 --rounds 3]
        [--out benchmarks/results/throughput]

Each measurement is a full optimiser step (forward, backward, AdamW). Methods are timed in
interleaved rounds and the median per-step time is reported, so drifts in machine load hit all
methods alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from flowmap.data import Toy2DDataModule
from flowmap.flowmap import FlowMap
from flowmap.losses import (
    EulerianLoss,
    FlowMapLoss,
    LagrangianLoss,
    SemigroupLoss,
    TimePairSampler,
    cfm_loss,
)
from flowmap.losses.pairs import DEFAULT_ETA
from flowmap.nets import MLP
from flowmap.paths import AffinePath
from flowmap.training import VelocityModule

VARIANTS: dict[str, tuple[type[FlowMapLoss], dict]] = {
    "lagrangian (backprop, default)": (LagrangianLoss, {}),
    "lagrangian (backprop, eta 0.5: cheaper, worse on digits)": (
        LagrangianLoss,
        {"pairs": {"eta": 0.5}},
    ),
    "lagrangian (regression)": (LagrangianLoss, {"form": "regression"}),
    "eulerian (discrete, default: share 0.5 up to 0.125, 1 Heun)": (EulerianLoss, {}),
    "eulerian (regression)": (EulerianLoss, {"form": "regression"}),
    "eulerian (full)": (EulerianLoss, {"form": "full"}),
    "eulerian (sg_advective)": (EulerianLoss, {"form": "sg_advective"}),
    "semigroup (default: δ=0.25, 2 Heun)": (SemigroupLoss, {}),
    "semigroup (δ=0.25, 4 Heun: the old default)": (SemigroupLoss, {"teacher_steps": 4}),
}


def _timer(step: Callable[[], None], steps: int) -> float:
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def loss_steps(width: int, depth: int, batch: int, eta: float) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    data = torch.randn(batch, 2) * 1.5
    path = AffinePath("linear")
    teacher_net = MLP((2,), width, depth).eval().requires_grad_(False)

    def teacher(x, t):
        return teacher_net(x, t, t)

    def make(fn: Callable[[MLP], torch.Tensor]) -> Callable[[], None]:
        net = MLP((2,), width, depth)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            fn(net).backward()
            opt.step()

        return step

    steps = {"cfm": make(lambda net: cfm_loss(lambda x, t: net(x, t, t), data, path))}
    for label, (cls, opts) in VARIANTS.items():
        opts = dict(opts)
        loss = cls(pairs=TimePairSampler(**{"eta": eta, **opts.pop("pairs", {})}), **opts)
        steps[label] = make(lambda net, loss=loss: loss(FlowMap(net), data, teacher)["loss"])
    return steps


def lightning_overhead(width: int, depth: int, batch: int, steps: int) -> dict[str, float]:
    """Seconds per step of a VelocityModule fit through a Trainer vs the same loop by hand."""

    def plain() -> float:
        torch.manual_seed(0)
        net = MLP((2,), width, depth)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        dm = Toy2DDataModule(batch_size=batch)
        it = iter(dm.train_dataloader())
        path = AffinePath("linear")

        def step() -> None:
            x1 = next(it)
            opt.zero_grad(set_to_none=True)
            cfm_loss(lambda x, t: net(x, t, t), x1, path).backward()
            opt.step()

        return _timer(step, steps)

    def lightning() -> float:
        torch.manual_seed(0)
        module = VelocityModule(MLP((2,), width, depth), lr=1e-3, ema_decay=None)
        trainer = L.Trainer(
            max_steps=steps + 3,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        times: list[float] = []

        class Clock(L.Callback):
            def on_train_batch_start(self, *a):
                times.append(time.perf_counter())

        trainer.callbacks.append(Clock())
        trainer.fit(module, Toy2DDataModule(batch_size=batch))
        return (times[-1] - times[3]) / (len(times) - 4)

    rounds = [(plain(), lightning()) for _ in range(3)]
    p = statistics.median(r[0] for r in rounds)
    lt = statistics.median(r[1] for r in rounds)
    return {"plain_s_per_step": p, "lightning_s_per_step": lt, "overhead": lt / p - 1}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--eta", type=float, default=DEFAULT_ETA)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    steps = loss_steps(args.width, args.depth, args.batch, args.eta)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, step in steps.items():
            times[k].append(_timer(step, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "config": vars(args) | {"out": str(args.out)},
        "seconds_per_step": med,
        "ratio_to_cfm": {k: v / med["cfm"] for k, v in med.items()},
        "lightning": lightning_overhead(args.width, args.depth, args.batch, args.steps * 2),
    }
    lines = ["| step | s/step | × CFM |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.4f} | {result['ratio_to_cfm'][k]:.2f} |" for k in med]
    lt = result["lightning"]
    lines += [
        "",
        f"Lightning fit vs plain loop: {lt['lightning_s_per_step']:.4f} vs "
        f"{lt['plain_s_per_step']:.4f} s/step, overhead {100 * lt['overhead']:+.1f}%",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        (args.out / "report.md").write_text(
            f"# Training-step throughput\n\n- command: `{result['command']}`\n- machine: "
            f"{result['machine']}, torch {result['torch']}\n- MLP width {args.width}, depth "
            f"{args.depth}, batch {args.batch}, eta {args.eta}; median of {args.rounds} rounds "
            f"of {args.steps} steps\n\n{text}\n"
        )
    return result


if __name__ == "__main__":
    main()
