"""What holds each loss back on digits: one flow map per knob setting, each distilled from the same
teacher with the recipe (``recipes/digits/<loss>.yaml``) and one change, all in one report
(FID in the digits CNN's features, endpoint distance to the teacher's adaptive solve, 95%
intervals; ``flowmap report``).

    python benchmarks/digits_ablation.py --teacher runs/digits/teacher/checkpoints/last.ckpt \\
        --out runs/digits-ablation [--baseline runs/digits] [--jobs 4] [--accelerator gpu] \\
        [--only lagrangian-lr1e-3 ...] [--deadline SECONDS]

The knobs: learning rate, share of diagonal rows (``eta``), adaptive weighting, training length,
EMA, the semigroup's teacher steps. Runs that finished are reused (each is a ``flowmap fit`` into
``<out>/<variant>`` and resumes if killed).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("lagrangian", "eulerian", "semigroup")

#: variant name -> (loss, overrides of the recipe); the bare loss name is the recipe itself
KNOBS: dict[str, list[str]] = {
    "lr1e-4": ["--model.lr=0.0001"],
    "lr1e-3": ["--model.lr=0.001"],
    "eta0.5": ["--model.loss.init_args.pairs.eta=0.5"],
    "adaptive": ["--model.loss.init_args.weighting.kind=adaptive"],
    "adaptive-p0.5": [
        "--model.loss.init_args.weighting.kind=adaptive",
        "--model.loss.init_args.weighting.p=0.5",
    ],
    "steps2x": ["--trainer.max_steps=3000"],
    "no-ema": ["--model.ema_decay=null"],
}
SEMIGROUP_KNOBS = {"teacher-steps4": ["--model.loss.init_args.teacher_steps=4"]}


def variants() -> dict[str, tuple[str, list[str]]]:
    out: dict[str, tuple[str, list[str]]] = {}
    for loss in LOSSES:
        out[loss] = (loss, [])
        knobs = {**KNOBS, **(SEMIGROUP_KNOBS if loss == "semigroup" else {})}
        for knob, overrides in knobs.items():
            out[f"{loss}-{knob}"] = (loss, overrides)
    return out


def fit(name: str, loss: str, overrides: list[str], args: argparse.Namespace) -> Path | None:
    """One ``flowmap fit`` of the recipe with ``overrides``; its ``last.ckpt`` (None if it failed)."""
    root = args.out / name
    ckpt = root / "checkpoints" / "last.ckpt"
    if (root / "done").exists():
        return ckpt
    if not overrides and args.baseline is not None:  # the recipe itself, trained by its pipeline
        return args.baseline / loss / "checkpoints" / "last.ckpt"
    cmd = [
        sys.executable, "-m", "flowmap.apps.cli", "fit",
        "--config", str(ROOT / "recipes" / "digits" / f"{loss}.yaml"),
        f"--model.teacher={args.teacher}",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        *overrides, *args.extra,
    ]  # fmt: skip
    if args.accelerator:
        cmd.append(f"--trainer.accelerator={args.accelerator}")
    if ckpt.exists():
        cmd += ["--ckpt_path", "last"]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fit.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=max(1.0, args.deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            print(f"{name}: stopped at the deadline; left out of the report")
            return None
    if code != 0:
        print(f"{name}: failed (exit {code}); see {root / 'fit.log'}")
        return None
    (root / "done").write_text("")
    print(f"{name}: done")
    return ckpt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--jobs", type=int, default=1, help="fits at a time (1 on a CPU: timings)")
    p.add_argument("--accelerator", default=None)
    p.add_argument("--only", nargs="+", default=None, help="variant names to run, in this order")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a digits pipeline's --out whose maps (same teacher) are the recipe rows",
    )
    p.add_argument("--nfe", nargs="+", default=["1", "2", "4", "8"])
    p.add_argument("--n-samples", default="10000", help="samples per report row")
    p.add_argument("--deadline", type=float, default=None, help="seconds for all fits")
    p.add_argument(
        "--extra", default="", help="overrides for every fit, one string: --extra='--a=1'"
    )
    args = p.parse_args(argv)
    args.extra = shlex.split(args.extra)
    args.deadline = time.time() + (args.deadline or float("inf"))
    every = variants()
    unknown = sorted(set(args.only or ()) - set(every))
    if unknown:
        raise SystemExit(f"Unknown variants {unknown}; choose from {sorted(every)}.")
    todo = every if args.only is None else {k: every[k] for k in args.only}
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(todo, pool.map(lambda kv: fit(kv[0], *kv[1], args), todo.items())))
    flowmaps = [a for k, c in done.items() if c is not None for a in ("--flowmap", f"{k}={c}")]
    cmd = [sys.executable, "-m", "flowmap.apps.cli", "report", "--teacher", str(args.teacher)]
    cmd += [*flowmaps, "--out", str(args.out / "report"), "--nfe", *args.nfe]
    cmd += ["--solvers", "euler", "--rtol", "1e-4", "--atol", "1e-4", "--n-samples", args.n_samples]
    subprocess.check_call(cmd)


if __name__ == "__main__":
    main()
