"""``flowmap couple``: a teacher's noise-to-sample couplings, the data of a reflow.

    flowmap couple --teacher runs/toy2d/teacher/checkpoints/last.ckpt --n 50000 --out couplings.safetensors

Each noise :math:`x_0` (seeded) is paired with the teacher's ODE endpoint (dopri5, ``--rtol``) and
written as safetensors (``x0``, ``x1``, and ``y`` for a class-conditional teacher, its classes in
equal shares) with the teacher's identity; ``flowmap fit`` with
``flowmap.data.CouplingDataModule`` then trains the rectified flow (``recipes/toy2d/teacher_reflow.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from flowmap.apps.kit import CommandParser, check_writable_file, positive_int
from flowmap.io import file_sha256
from flowmap.reflow import draw_couplings, euler_error, save_couplings, straightness
from flowmap.training.loading import load_sampler
from flowmap.training.threads import set_threads

__all__ = ["main", "parser"]


def parser() -> CommandParser:
    p = CommandParser(
        prog="flowmap couple",
        description="Pair seeded noise with a teacher's ODE endpoints (adaptive solve) and write "
        "the couplings as safetensors, the training data of a reflow.",
    )
    p.add_argument("--teacher", required=True, help="a teacher (VelocityModule) checkpoint")
    p.add_argument("--n", type=positive_int, default=50_000, help="number of couplings")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--batch", type=positive_int, default=4096, help="couplings solved at once")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5's tolerance (rtol = atol)")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Run ``flowmap couple``; returns the path written."""
    args = parser().parse_args(argv)
    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {str(args.out)!r} must end in .safetensors.")
    check_writable_file(args.out, "--out")
    set_threads()
    module, kind, _, _ = load_sampler(args.teacher, "VelocityModule")
    k = module.num_classes
    labels = None if k is None else torch.arange(args.n) * k // args.n
    couplings = draw_couplings(
        module,
        args.n,
        tuple(module.data_shape),
        batch=args.batch,
        seed=args.seed,
        labels=labels,
        rtol=args.rtol,
        atol=args.rtol,
    )
    identity = f"{Path(args.teacher).name} sha256:{file_sha256(args.teacher)}"
    save_couplings(args.out, couplings, teacher=identity, data=getattr(module, "trained_on", None))
    probe = couplings["x0"][:512]
    cond = None if labels is None else {"y": labels[:512]}
    err = euler_error(module, probe, couplings["x1"][:512], cond=cond)
    print(
        f"{args.out}: {args.n} couplings of {kind} {args.teacher}; its one-Euler-step error "
        f"{err:.4g}, straightness {straightness(module, probe, cond=cond):.4g} (first 512)"
    )
    return args.out
