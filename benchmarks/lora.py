"""LoRA students against the full student: quality at 1, 2, 4 jumps and peak training memory.

Trains, from the same digits teacher and with the same recipe (Lagrangian, 1500 steps), the full
student (``recipes/digits/lagrangian.yaml``) and LoRA students (``recipes/digits/lora.yaml``, rank
3: under 10% of the U-Net trains) at each ``--lora-lr``; reports them side by side on the same
noise (``flowmap report``: FID in the digits-CNN features, 10 000 samples, 20 groups), with the
per-group ratio LoRA/full at each NFE; and measures the peak memory and time of one training step
of each, on the digits U-Net and on the CIFAR-10 U-Net (38.6M), where a frozen base matters.

    python benchmarks/lora.py --teacher runs/digits/teacher/checkpoints/last.ckpt \
        --out benchmarks/results/lora-digits [--lora-lr 3e-4 1e-3]
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
from throughput import _machine, _timer, peak_memory

from flowmap.apps.pipeline import fit_stage
from flowmap.apps.report import main as report_main
from flowmap.apps.report.rows import RowCache
from flowmap.flowmap import FlowMap
from flowmap.losses import LagrangianLoss, TimePairSampler
from flowmap.nets import LoRA, UNet, trainable_fraction
from flowmap.paths import AffinePath

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "digits"
NETS = {  # the recipes' U-Nets: digits (0.73M) and CIFAR-10 (38.6M)
    "digits": (dict(image_size=8, in_channels=1, channels=32, channel_mult=[1, 2], num_res_blocks=1), 128),
    "cifar10": (
        dict(image_size=32, in_channels=3, channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
             attention_resolutions=[16], dropout=0.1),
        16,
    ),
}  # fmt: skip


def train(
    teacher: str, out: Path, lrs: list[float], steps: int | None, variants: list[str]
) -> dict[str, str]:
    """The full student, one LoRA student per learning rate and one per variant
    (``label=overrides`` of ``lora.yaml``), each reused when already trained."""
    extra = [f"--trainer.max_steps={steps}"] if steps else []
    runs = {"full": (RECIPES / "lagrangian.yaml", [])}
    for lr in lrs:
        runs[f"lora-lr{lr:g}"] = (RECIPES / "lora.yaml", [f"--model.lr={lr}"])
    for variant in variants:
        label, _, overrides = variant.partition("=")
        runs[label] = (RECIPES / "lora.yaml", shlex.split(overrides))
    ckpts = {}
    for label, (config, overrides) in runs.items():
        over = [f"--model.teacher={teacher}", "--trainer.enable_progress_bar=false", *overrides]
        ckpts[label] = str(fit_stage(config, out / label, [*over, *extra], teacher=Path(teacher)))
    return ckpts


def step_cost(scale: str, rank: int, rounds: int) -> dict[str, Any]:
    """Peak memory and median time of one Lagrangian (backprop) optimiser step, full vs LoRA,
    on random stand-in data (the cost does not depend on the pixels); memory counts the EMA as
    FlowMapModule keeps it."""
    kwargs, batch = NETS[scale]
    torch.manual_seed(0)
    teacher_net = UNet(**kwargs).eval().requires_grad_(False)
    data = torch.randn(batch, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])

    def teacher(x, t, **cond):
        return teacher_net(x, t, t, **cond)

    def make(lora: bool):
        net = copy.deepcopy(teacher_net).requires_grad_(True).train()
        if lora:
            net = LoRA(rank=rank).apply(net)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        loss = LagrangianLoss(form="backprop", pairs=TimePairSampler(eta=0.25))
        flow_map = FlowMap(net, AffinePath("linear"))

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss(flow_map, data, teacher)["loss"].backward()
            opt.step()

        def held() -> int:
            """Weights (a LoRA net's include its frozen base), their EMA (FlowMapModule's: of
            the trainable weights only, the frozen base shared), optimiser state, teacher, data."""
            state = [v for st in opt.state.values() for v in st.values()]
            tensors = [*net.parameters(), *params, *state, *teacher_net.parameters(), data]
            return sum(t.numel() * t.element_size() for t in tensors)

        step.held = held
        return step, trainable_fraction(net)

    out: dict[str, Any] = {
        "batch": batch,
        "parameters": sum(p.numel() for p in teacher_net.parameters()),
    }
    for label, lora in (("full", False), ("lora", True)):
        step, fraction = make(lora)
        out[label] = {
            "trainable_fraction": fraction,
            "peak_bytes": peak_memory(step, torch.device("cpu")),
            "seconds_per_step": _timer(step, rounds),
        }
    out["memory_ratio"] = out["lora"]["peak_bytes"] / out["full"]["peak_bytes"]
    out["time_ratio"] = out["lora"]["seconds_per_step"] / out["full"]["seconds_per_step"]
    return out


def ratios(out: Path, labels: list[str], nfes: list[int]) -> dict[str, dict[int, dict]]:
    """Per-group FID ratio of each LoRA row to the full student's at the same NFE (same noise)."""
    rows = RowCache(out / "rows", [], 20)

    def measurement(label: str, nfe: int):
        found = sorted((out / "rows").glob(f"flowmap__{label}@{nfe}-*.npz"))
        return rows.load(found[-1])[2]

    result: dict[str, dict[int, dict]] = {}
    for label in labels:
        result[label] = {}
        for nfe in nfes:
            est = measurement(label, nfe).ratio(measurement("full", nfe), "fid")
            result[label][nfe] = {"value": est.value, "ci_low": est.ci_low, "ci_high": est.ci_high}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lora-lr", type=float, nargs="+", default=[3e-4, 1e-3])
    p.add_argument("--steps", type=int, default=None, help="override the recipes' max_steps")
    p.add_argument(
        "--variant",
        nargs="*",
        default=[],
        help="more LoRA students, each LABEL='--model.lr=3e-3 --model.adapter.init_args.bias=all'",
    )
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per cost measurement")
    p.add_argument("--n-samples", type=int, default=10000)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    ckpts = train(args.teacher, args.out, args.lora_lr, args.steps, args.variant)
    seconds = {k: json.loads((args.out / k / "done.json").read_text())["seconds"] for k in ckpts}
    nfes = [1, 2, 4]
    report = report_main(
        [
            "--teacher",
            args.teacher,
            *(a for k, v in ckpts.items() for a in ("--flowmap", f"{k}={v}")),
        ]
        + ["--out", str(args.out), "--nfe", *map(str, nfes), "--solvers", "euler"]
        + ["--n-samples", str(args.n_samples), "--rtol", "1e-4", "--atol", "1e-4"],
        quiet=True,
    )
    loras = [k for k in ckpts if k != "full"]
    result = {
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else ["benchmarks/lora.py", *argv])]),
        "machine": _machine(torch.device("cpu")),
        "rank": args.rank,
        "fid": [
            {k: r[k] for k in ("method", "nfe", "value", "ci_low", "ci_high")}
            for r in report["rows"]
            if r["method"].startswith("flowmap/") or r["method"] == "teacher/dopri5"
        ],
        "ratio_to_full": ratios(args.out, loras, nfes),
        "train_seconds": seconds,
        "step_cost": {scale: step_cost(scale, args.rank, args.rounds) for scale in NETS},
        "seconds": time.time() - start,
    }  # fmt: skip
    (args.out / "lora.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("ratio_to_full", "step_cost")}, indent=2))
    return result


if __name__ == "__main__":
    main()
