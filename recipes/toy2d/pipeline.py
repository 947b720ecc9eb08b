"""Toy 2D end to end: teacher → Lagrangian, Eulerian, semigroup flow maps → W2-vs-steps report.

    python recipes/toy2d/pipeline.py --out runs/toy2d [--dataset moons]

Writes report.md, w2_vs_steps.png, results.json and samples.npz into --out.
"""

from pathlib import Path

from flowmap.apps.kit import run_command
from flowmap.apps.pipeline import recipe_parser, run_recipe
from flowmap.data.toy2d import TOY2D_NAMES

HERE = Path(__file__).resolve().parent
TINY = [
    "--model.net.width=32",
    "--model.net.depth=1",
    "--data.batch_size=128",
    "--trainer.val_check_interval=5",
    "--trainer.enable_progress_bar=false",
]


def main(argv=None):
    p = recipe_parser(__doc__)
    p.add_argument("--dataset", default="checkerboard", choices=TOY2D_NAMES)
    p.add_argument("--n-samples", type=int, default=10_000, help="samples per report row")
    args = p.parse_args(argv)
    return run_recipe(
        HERE,
        args,
        data_overrides=[f"--data.name={args.dataset}"],
        tiny_overrides=TINY,
        tiny_steps=(20, 10),
        report_args=["--n-samples", str(args.n_samples)],
        tiny_report_args=["--nfe", "1", "2", "4", "--groups", "4"],
        argv=argv,
    )


if __name__ == "__main__":
    run_command(main)  # a mistake the user can fix: one line, no traceback
