"""Class-conditional digits end to end: a guided teacher → guided Lagrangian, Eulerian and
semigroup flow maps (one student each for every w in [1, 4]) → a report of FID, KID,
precision/recall and class accuracy (the digits classifier) at w = 1, 2, 4 against the number of
network evaluations, with 95% intervals, against a class-balanced reference.

    python recipes/digits_guided/pipeline.py --out runs/digits_guided
"""

from pathlib import Path

from flowmap.apps.kit import run_command
from flowmap.apps.pipeline import recipe_parser, run_recipe

HERE = Path(__file__).resolve().parent
TINY = ["--model.net.channels=8", "--data.batch_size=32", "--trainer.enable_progress_bar=false"]


def main(argv=None):
    args = recipe_parser(__doc__).parse_args(argv)
    return run_recipe(
        HERE,
        args,
        tiny_overrides=TINY,
        tiny_steps=(10, 5),
        report_args=["--guidance", "1", "2", "4", "--nfe", "1", "2", "4", "8", "16", "32"],
        tiny_report_args=["--nfe", "1", "2", "4", "--n-samples", "100", "--groups", "4"],
        argv=argv,
    )


if __name__ == "__main__":
    run_command(main)  # a mistake the user can fix: one line, no traceback
