"""Training-step cost of every flow-map loss and preset relative to a CFM step of the same network,
with peak memory, in fp32 and bf16 autocast; and Lightning's overhead over a plain loop (toy MLP).

    python benchmarks/throughput.py --net mlp [--width 256 --depth 2 --batch 1024]
    python benchmarks/throughput.py --net unet --scale digits --batch 128 --precision fp32
    python benchmarks/throughput.py --net dit --scale cifar10 --batch 128 --precision fp32 bf16
        [--steps 10 --rounds 3 --out benchmarks/results/throughput/<name>]

Each measurement is a full optimiser step (forward, backward, AdamW) on stand-in data of the
scale's shape (the cost does not depend on the pixels). Steps are timed in interleaved rounds and
the median per-step time is reported, so drifts in machine load hit all steps alike. Peak memory is
the step's own allocations: ``torch.cuda.max_memory_allocated`` on a GPU, the profiler's
allocation trace on the CPU (added to what the step holds before it: weights, optimiser state,
teacher, data). The teacher is a frozen copy of the same architecture.
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
from typing import Any

import lightning as L
import torch
from torch import nn

from flowmap.data import Toy2DDataModule
from flowmap.flowmap import FlowMap, JVPMethod
from flowmap.losses import EulerianLoss, LagrangianLoss, SemigroupLoss, TimePairSampler, cfm_loss
from flowmap.losses.pairs import DEFAULT_ETA
from flowmap.nets import MLP, DiT, UNet
from flowmap.paths import AffinePath
from flowmap.presets import PRESETS
from flowmap.training import VelocityModule

FD, CHUNKS, AUTOCAST = (
    JVPMethod("finite_difference"),
    JVPMethod(chunks=4),
    JVPMethod(precision="autocast"),
)

#: label: (loss class, options); the first of each class is its default
VARIANTS: dict[str, tuple[type, dict]] = {
    "lagrangian (backprop, default)": (LagrangianLoss, {}),
    "lagrangian (backprop, jvp in 4 checkpointed chunks)": (LagrangianLoss, {"jvp": CHUNKS}),
    "lagrangian (backprop, jvp in the autocast dtype)": (LagrangianLoss, {"jvp": AUTOCAST}),
    "lagrangian (regression)": (LagrangianLoss, {"form": "regression"}),
    "lagrangian (regression, finite difference)": (
        LagrangianLoss,
        {"form": "regression", "jvp": FD},
    ),
    "eulerian (discrete, default)": (EulerianLoss, {}),
    "eulerian (regression)": (EulerianLoss, {"form": "regression"}),
    "eulerian (regression, finite difference)": (EulerianLoss, {"form": "regression", "jvp": FD}),
    "eulerian (full)": (EulerianLoss, {"form": "full"}),
    "eulerian (sg_advective)": (EulerianLoss, {"form": "sg_advective"}),
    "semigroup (default: δ=0.25, 2 Heun)": (SemigroupLoss, {}),
}

#: the nets at each scale: (constructor, sample shape); digits: the recipes' teachers at 8×8,
#: cifar10: the CIFAR-10 recipe's U-Net (38.6M) and DiT-S/2 (32.6M)
NETS: dict[tuple[str, str], tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    ("unet", "digits"): (
        lambda: UNet(
            image_size=8, in_channels=1, channels=32, channel_mult=(1, 2), num_res_blocks=1
        ),
        (1, 8, 8),
    ),
    ("dit", "digits"): (
        lambda: DiT(image_size=8, in_channels=1, patch_size=2, width=128, depth=4, heads=4),
        (1, 8, 8),
    ),
    ("unet", "cifar10"): (
        lambda: UNet(
            image_size=32,
            in_channels=3,
            channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16,),
            dropout=0.1,
        ),
        (3, 32, 32),
    ),
    ("dit", "cifar10"): (
        lambda: DiT(image_size=32, in_channels=3, patch_size=2, size="S"),
        (3, 32, 32),
    ),
}


def _timer(step: Callable[[], None], steps: int) -> float:
    for _ in range(3):
        step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - t0) / steps


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of a step: what it holds before it (weights, optimiser state, teacher, data)
    plus the most it allocates during it."""
    step()  # the optimiser state exists before the measured step
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return step.held() + peak


def _group_norm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.GroupNorm) for m in net.modules())


def _randomised(net: nn.Module) -> nn.Module:
    """The net with its zero-initialised layers drawn at random (a trained net's are not zero)."""
    for p in net.parameters():
        if p.numel() and bool((p == 0).all()):
            p.data.normal_(0, 0.02)
    return net


def loss_steps(
    make_net: Callable[[], nn.Module],
    shape: tuple[int, ...],
    batch: int,
    eta: float,
    device: torch.device,
    precision: str,
) -> dict[str, Callable[[], None]]:
    """One optimiser step per variant and preset, each on its own copy of the net."""
    torch.manual_seed(0)
    data = torch.randn(batch, *shape, device=device)
    path = AffinePath("linear")
    teacher_net = _randomised(make_net()).to(device).eval().requires_grad_(False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def teacher(x, t, **cond):
        return teacher_net(x, t, t, **cond)

    def make(fn: Callable[[nn.Module], torch.Tensor], loss: nn.Module | None = None):
        net = _randomised(make_net()).to(device)
        params = list(net.parameters())
        if loss is not None:
            loss.to(device)
            params += list(loss.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast:
                value = fn(net)
            value.backward()
            opt.step()

        def held() -> int:
            state = [v for st in opt.state.values() for v in st.values()]
            return _bytes([*params, *state, *teacher_net.parameters(), data])

        step.held = held
        return step

    steps = {"cfm": make(lambda net: cfm_loss(lambda x, t: net(x, t, t), data, path))}
    if isinstance(teacher_net, UNet):

        def channels_last(net: nn.Module) -> torch.Tensor:
            if not net.channels_last:  # the UNet's channels_last option, set on this copy
                net.channels_last = True
                net.to(memory_format=torch.channels_last)
            return cfm_loss(lambda x, t: net(x, t, t), data, path)

        steps["cfm (channels_last)"] = make(channels_last)
    for label, (cls, opts) in VARIANTS.items():
        opts = dict(opts)
        if opts.get("jvp") is AUTOCAST and (precision == "fp32" or _group_norm(teacher_net)):
            continue  # fp32: the default step; GroupNorm: refused (FlowMap.jvp says why)
        loss = cls(pairs=TimePairSampler(**{"eta": eta, **opts.pop("pairs", {})}), **opts)
        steps[label] = make(lambda net, loss=loss: loss(FlowMap(net), data, teacher)["loss"], loss)
    for name, preset in PRESETS.items():
        loss = preset.build_loss()
        given = teacher if preset.needs_teacher else None
        label = f"preset {name}"
        steps[label] = make(
            lambda net, loss=loss, given=given: loss(FlowMap(net), data, given, step=10**6)["loss"],
            loss,
        )
    return steps


@torch.no_grad()
def jvp_errors(make_net: Callable[[], nn.Module], shape: tuple[int, ...], device: torch.device):
    """Relative error of the tangent ∂_t φ against float32 autodiff: the finite difference, and
    autodiff in bf16 autocast (on the randomised net, 64 rows)."""
    torch.manual_seed(0)
    fm = FlowMap(_randomised(make_net()).to(device))
    x = torch.randn(64, *shape, device=device)
    s = torch.rand(64, device=device) * 0.5
    t = s + torch.rand(64, device=device) * (1 - s)
    one = torch.ones_like(t)
    exact = fm.jvp(x, s, t, dt=one).dphi

    def error(method: JVPMethod) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            d = fm.jvp(x, s, t, dt=one, method=method).dphi
        return float((d - exact).norm() / exact.norm())

    low = None if _group_norm(fm.net) else error(AUTOCAST)
    return {"finite_difference": error(FD), "autodiff_bf16_autocast": low}


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


def _machine(device: torch.device) -> str:
    where = f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads"
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    return where


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Seconds per step, ratio to CFM and peak memory (with its ratio), per precision."""
    if args.net == "mlp":
        width, depth = args.width, args.depth
        make_net, shape = (lambda: MLP((2,), width, depth)), (2,)
    else:
        make_net, shape = NETS[(args.net, args.scale)]
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in make_net().parameters())}
    for precision in args.precision:
        steps = loss_steps(make_net, shape, args.batch, args.eta, device, precision)
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for k, step in steps.items():
                times[k].append(_timer(step, args.steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        memory = {k: peak_memory(step, device) for k, step in steps.items()}
        out[precision] = {
            "seconds_per_step": med,
            "ratio_to_cfm": {k: v / med["cfm"] for k, v in med.items()},
            "peak_bytes": memory,
            "memory_ratio_to_cfm": {k: v / memory["cfm"] for k, v in memory.items()},
        }
    if args.net != "mlp":
        out["jvp_relative_error"] = jvp_errors(make_net, shape, device)
    return out


def _table(result: dict[str, Any], precisions: list[str]) -> str:
    head = "| step | " + " | ".join(
        f"{p} s/step | {p} × CFM | {p} memory × CFM" for p in precisions
    )
    lines = [head + " |", "|---|" + "---|---|---|" * len(precisions)]
    for k in result[precisions[0]]["seconds_per_step"]:
        cells = []
        for p in precisions:
            r = result[p]
            if k not in r["seconds_per_step"]:
                cells += ["", "", ""]
                continue
            cells += [
                f"{r['seconds_per_step'][k]:.4f}",
                f"{r['ratio_to_cfm'][k]:.2f}",
                f"{r['memory_ratio_to_cfm'][k]:.2f}",
            ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", choices=("mlp", "unet", "dit"), default="mlp")
    ap.add_argument("--scale", choices=("digits", "cifar10"), default="digits")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    ap.add_argument("--width", type=int, default=256, help="the MLP's width")
    ap.add_argument("--depth", type=int, default=2, help="the MLP's depth")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--eta", type=float, default=DEFAULT_ETA)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": _machine(device),
        "torch": torch.__version__,
        "config": vars(args) | {"out": str(args.out)},
        **measure(args, device),
    }
    text = _table(result, args.precision)
    if args.net == "mlp":
        lt = result["lightning"] = lightning_overhead(args.width, args.depth, args.batch, 60)
        text += (
            f"\n\nLightning fit vs plain loop: {lt['lightning_s_per_step']:.4f} vs "
            f"{lt['plain_s_per_step']:.4f} s/step, overhead {100 * lt['overhead']:+.1f}%"
        )
    else:
        err = result["jvp_relative_error"]
        text += (
            f"\n\nRelative error of ∂_t φ against float32 autodiff: finite difference "
            f"{err['finite_difference']:.1e}, autodiff in bf16 autocast "
            + (
                "refused (GroupNorm)"
                if err["autodiff_bf16_autocast"] is None
                else f"{err['autodiff_bf16_autocast']:.1e}"
            )
        )
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        net = f"{args.net} at the {args.scale} scale" if args.net != "mlp" else "MLP"
        (args.out / "report.md").write_text(
            f"# Training-step throughput: {net}\n\n- command: `{result['command']}`\n- machine: "
            f"{result['machine']}, torch {result['torch']}\n- {result['parameters']:,} "
            f"parameters, batch {args.batch}, eta {args.eta}; median of {args.rounds} rounds of "
            f"{args.steps} steps; memory: the step's peak, weights, optimiser state and teacher "
            f"included\n\n{text}\n"
        )
    return result


if __name__ == "__main__":
    main()
