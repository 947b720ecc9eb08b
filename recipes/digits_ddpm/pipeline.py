"""Digits end to end from a teacher trained elsewhere: a DDPM-style diffusers UNet2DModel
(ε-prediction, DDPMScheduler's 1000 discrete timesteps, noise at t = 999; ``train_ddpm.py``) →
Lagrangian, Eulerian, semigroup flow maps in flowmap's convention → FID-vs-steps report beside the
teacher's own DDIM sampler (and its Euler/Heun/dopri5 solves of the converted velocity).

    python recipes/digits_ddpm/pipeline.py --out runs/digits_ddpm
"""

import sys
from pathlib import Path

from flowmap.apps.kit import run_command
from flowmap.apps.pipeline import recipe_parser, run_recipe

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_ddpm import train  # noqa: E402

TINY = ["--data.batch_size=32", "--trainer.enable_progress_bar=false"]  # the maps copy the UNet


def main(argv=None):
    args = recipe_parser(__doc__).parse_args(argv)

    def teacher_stage(root: Path) -> Path:
        steps = 20 if args.tiny else args.teacher_steps or 5000
        device = "cuda" if args.accelerator == "gpu" else "cpu"
        return train(root, steps, batch_size=128, lr=5e-4, seed=0, tiny=args.tiny, device=device)

    return run_recipe(
        HERE,
        args,
        tiny_overrides=TINY,
        tiny_steps=(20, 5),
        # dopri5 at the default 1e-5 did not finish in 24 min on this ε-model (stiff at its
        # clipped ends, 10 solves of 1000 samples); 1e-3 takes about 100 NFE per solve
        # Heun beside DDIM (= Euler on DDIM's grid, checked by the report)
        report_args=["--save-samples", "2000", "--nfe", "1", "2", "4", "8", "16"]
        + ["--rtol", "1e-3", "--atol", "1e-3", "--solvers", "heun"],
        tiny_report_args=["--nfe", "1", "2", "--n-samples", "64", "--groups", "4"],
        argv=argv,
        teacher_stage=teacher_stage,
    )


if __name__ == "__main__":
    run_command(main)  # a mistake the user can fix: one line, no traceback
