"""Digits end to end: teacher → Lagrangian, Eulerian, semigroup flow maps → FID-vs-steps report
(FID in the shipped digits-CNN features, against the train split; floor = test vs train).

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
        tiny_report_args=["--nfe", "1", "2", "--n-samples", "64"],
        argv=argv,
    )


if __name__ == "__main__":
    main()
