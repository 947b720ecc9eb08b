"""Digits end to end: teacher → Lagrangian, Eulerian, semigroup flow maps → FID-vs-steps report
(FID, KID, precision/recall in the shipped digits-CNN features, 10000 samples per row against the
whole train split, 95% intervals from 20 groups; floor = the test split against the train split).

    python recipes/digits/pipeline.py --out runs/digits
"""

from pathlib import Path

from flowmap.apps.pipeline import recipe_parser, run_recipe

HERE = Path(__file__).resolve().parent
TINY = [
    "--model.net.width=32",
    "--model.net.depth=1",
    "--data.batch_size=64",
    "--trainer.enable_progress_bar=false",
]


def main(argv=None):
    args = recipe_parser(__doc__).parse_args(argv)
    return run_recipe(
        HERE,
        args,
        tiny_overrides=TINY,
        tiny_steps=(10, 5),
        report_args=["--save-samples", "2000"],  # keeps the committed samples.npz small
        tiny_report_args=["--nfe", "1", "2", "--n-samples", "64", "--groups", "4"],
        argv=argv,
    )


if __name__ == "__main__":
    main()
