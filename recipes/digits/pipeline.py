"""Digits end to end: teacher → Lagrangian, Eulerian, semigroup flow maps → FID-vs-steps report
(FID in the shipped digits-CNN features, against the train split; floor = test vs train).

    python recipes/digits/pipeline.py --out runs/digits
"""

import argparse
import sys
from pathlib import Path

from flowmap.pipeline import LOSSES, run_pipeline

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--teacher-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--flowmap-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    args = p.parse_args(argv)
    teacher, flowmap, report = [], [], []
    if args.tiny:
        net = [
            "--model.net.width=32",
            "--model.net.depth=1",
            "--data.batch_size=64",
            "--trainer.enable_progress_bar=false",
        ]
        teacher, flowmap = [*net, "--trainer.max_steps=10"], [*net, "--trainer.max_steps=5"]
        report = ["--nfe", "1", "2", "--n-samples", "64"]
    if args.teacher_steps:
        teacher.append(f"--trainer.max_steps={args.teacher_steps}")
    if args.flowmap_steps:
        flowmap.append(f"--trainer.max_steps={args.flowmap_steps}")
    return run_pipeline(
        HERE,
        args.out,
        teacher_overrides=teacher,
        flowmap_overrides=flowmap,
        losses=args.losses,
        report_args=report,
        argv=[sys.executable, *sys.argv] if argv is None else argv,
    )


if __name__ == "__main__":
    main()
