"""Toy 2D end to end: teacher → Lagrangian, Eulerian, semigroup flow maps → W2-vs-steps report.

    python recipes/toy2d/pipeline.py --out runs/toy2d [--dataset moons]

Writes report.md, fid_vs_steps.png, results.json and samples.npz into --out.
"""

import argparse
import sys
from pathlib import Path

from flowmap.data.toy2d import TOY2D_NAMES
from flowmap.pipeline import LOSSES, run_pipeline

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dataset", default="checkerboard", choices=TOY2D_NAMES)
    p.add_argument("--teacher-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--flowmap-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--n-samples", type=int, default=2000, help="samples per report row")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    args = p.parse_args(argv)
    data = [f"--data.name={args.dataset}"]
    teacher, flowmap, report = [], [], ["--n-samples", str(args.n_samples)]
    if args.tiny:
        net = [
            "--model.net.width=32",
            "--model.net.depth=1",
            "--data.batch_size=128",
            "--trainer.val_check_interval=5",
            "--trainer.enable_progress_bar=false",
        ]
        teacher, flowmap = [*net, "--trainer.max_steps=20"], [*net, "--trainer.max_steps=10"]
        report += ["--nfe", "1", "2", "4"]
    if args.teacher_steps:
        teacher.append(f"--trainer.max_steps={args.teacher_steps}")
    if args.flowmap_steps:
        flowmap.append(f"--trainer.max_steps={args.flowmap_steps}")
    return run_pipeline(
        HERE,
        args.out,
        data_overrides=data,
        teacher_overrides=teacher,
        flowmap_overrides=flowmap,
        losses=args.losses,
        report_args=report,
        argv=[sys.executable, *sys.argv] if argv is None else argv,
    )


if __name__ == "__main__":
    main()
