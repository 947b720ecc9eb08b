"""Step time of the recipes' networks at 1 and 2 torch threads, on an idle machine and beside one
busy process: the evidence behind ``flowmap.training.threads``.

    python benchmarks/threads.py [--steps 20 --rounds 5] [--out benchmarks/results/threads]

A step is a full CFM optimiser step (forward, backward, AdamW) of the recipe's teacher net at the
recipe's batch size. Thread counts are timed in interleaved rounds; each round gives a median
step time, and the table shows the median over rounds with the range of the rounds. "busy
(python)" runs a second process that spins on one core for the whole measurement; "busy (torch)"
one that trains the toy MLP with torch's default threads (another flowmap run beside this one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from flowmap.losses import cfm_loss
from flowmap.nets import MLP, UNet
from flowmap.paths import AffinePath

NETS = {
    "toy2d teacher MLP (256×2, batch 1024)": (lambda: MLP([2], width=256, depth=2), (2,), 1024),
    "toy2d MLP 64×1 (batch 1024)": (lambda: MLP([2], width=64, depth=1), (2,), 1024),
    "digits teacher U-Net (32 ch, batch 128)": (
        lambda: UNet(
            image_size=8, in_channels=1, channels=32, channel_mult=[1, 2], num_res_blocks=1
        ),
        (1, 8, 8),
        128,
    ),
    "digits U-Net 8 ch (batch 128)": (
        lambda: UNet(
            image_size=8, in_channels=1, channels=8, channel_mult=[1, 2], num_res_blocks=1
        ),
        (1, 8, 8),
        128,
    ),
}


def _spin(stop: mp.Event, kind: str) -> None:
    if kind == "python":
        while not stop.is_set():
            pass
        return
    net = MLP([2], width=256, depth=2)
    while not stop.is_set():
        _step_time(net, (2,), 1024, 5)


def _step_time(net: torch.nn.Module, shape: tuple[int, ...], batch: int, steps: int) -> float:
    path = AffinePath("linear")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x1 = torch.randn(batch, *shape)

    def step() -> None:
        opt.zero_grad()
        cfm_loss(lambda x, t: net(x, t, t), x1, path).backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="benchmarks/results/threads")
    args = parser.parse_args(argv)
    rows = []
    for load in ("idle", "busy (python)", "busy (torch)"):
        ctx = mp.get_context("spawn")  # a forked child of a torch process can hang in OpenMP
        stop = ctx.Event()
        kind = load[6:-1]
        spinner = ctx.Process(target=_spin, args=(stop, kind), daemon=True) if kind else None
        if spinner:
            spinner.start()
            time.sleep(5.0)  # its imports done, its work started
        try:
            for name, (make, shape, batch) in NETS.items():
                torch.manual_seed(0)
                net = make()
                params = sum(p.numel() for p in net.parameters())
                per_round: dict[int, list[float]] = {k: [] for k in args.threads}
                for _ in range(args.rounds):
                    for k in args.threads:
                        torch.set_num_threads(k)
                        per_round[k].append(_step_time(net, shape, batch, args.steps))
                row = {"net": name, "parameters": params, "load": load}
                for k, ts in per_round.items():
                    row[f"{k} threads (ms)"] = [
                        1e3 * statistics.median(ts),
                        1e3 * min(ts),
                        1e3 * max(ts),
                    ]
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if spinner:
                stop.set()
                spinner.join(timeout=30)
                if spinner.is_alive():
                    spinner.terminate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python "
        + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": f"{platform.node()} {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "torch": torch.__version__,
        "steps per round": args.steps,
        "rounds": args.rounds,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Step time against torch threads",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch {meta['torch']}. Median over "
        f"{args.rounds} interleaved rounds of the per-round median of {args.steps} steps "
        "[min, max over rounds], in ms.",
        "",
        "| net | parameters | load | " + " | ".join(f"{k} threads" for k in args.threads) + " |",
        "|---|---|---|" + "---|" * len(args.threads),
    ]
    for r in rows:
        cells = [
            f"{r[f'{k} threads (ms)'][0]:.1f} [{r[f'{k} threads (ms)'][1]:.1f}, "
            f"{r[f'{k} threads (ms)'][2]:.1f}]"
            for k in args.threads
        ]
        lines.append(
            f"| {r['net']} | {r['parameters']:,} | {r['load']} | " + " | ".join(cells) + " |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
