"""Latent digits end to end, the shape of an SD3/FLUX distillation at toy size: a small
AutoencoderKL (``train_codec.py``) → a CFM teacher on its 2×4×4 latents → Lagrangian, Eulerian,
semigroup flow maps on the latents → the FID-vs-steps report on decoded pixels (the shipped
digits-CNN features, 10000 samples per row, 95% intervals from 20 groups), with the data floor
and the codec floor (the test split through decode(encode(·))) beside the rows.

    python recipes/digits_latent/pipeline.py --out runs/digits_latent
"""

import sys
from pathlib import Path

from flowmap.apps.kit import run_command
from flowmap.apps.pipeline import recipe_parser, run_recipe

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_codec import train  # noqa: E402

TINY_MAPS = ["--trainer.enable_progress_bar=false"]
TINY = ["--model.net.channels=8", *TINY_MAPS]  # the maps copy the teacher's net


def main(argv=None):
    p = recipe_parser(__doc__)
    p.add_argument("--codec-steps", type=int, default=2000, help="the autoencoder's steps")
    args = p.parse_args(argv)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    steps = 20 if args.tiny else args.codec_steps
    codec = train(args.out / "codec", steps, latent_channels=2, tiny=args.tiny, device=device)
    return run_recipe(
        HERE,
        args,
        data_overrides=[f"--data.init_args.codec={codec}"],
        tiny_overrides=TINY,
        tiny_flowmap_overrides=TINY_MAPS,
        tiny_steps=(10, 5),
        report_args=["--save-samples", "2000", "--nfe", "1", "2", "4", "8"]
        + ["--rtol", "1e-4", "--atol", "1e-4"],
        tiny_report_args=["--nfe", "1", "2", "--n-samples", "64", "--groups", "4"],
        argv=argv,
    )


if __name__ == "__main__":
    run_command(main)  # a mistake the user can fix: one line, no traceback
