"""``flowmap sample``: draw samples from a teacher or a flow-map checkpoint with a given NFE.

    flowmap sample --ckpt last.ckpt --nfe 2 --n 1000 --out samples.npz [--method heun] [--seed 0]

Writes ``samples`` (data space) and ``noise`` into an ``.npz`` (no pickle), a picture beside it
(``samples.png``: a tile of up to 64 images, or a scatter plot of 2D samples) and prints the NFE
used.
A flow map can also run backwards: ``--invert --data-npz x.npz`` maps data to noise.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flowmap.apps.pictures import samples_picture
from flowmap.training import FlowMapModule, VelocityModule, load_module, read_checkpoint

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="flowmap sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--nfe", type=int, default=1)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument(
        "--method",
        default=None,
        help="sampling method (default: the model's own): a teacher's solver euler [default], "
        "midpoint, heun, rk4 or dopri5; a flow map's uniform jumps",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--invert", action="store_true", help="flow maps: data (--data-npz) → noise")
    p.add_argument("--data-npz", type=Path, default=None, help="npz whose 'samples' to invert")
    args = p.parse_args(argv)
    kind = read_checkpoint(args.ckpt).get("flowmap_module")
    cls = {"VelocityModule": VelocityModule, "FlowMapModule": FlowMapModule}.get(kind)
    if cls is None:
        raise SystemExit(f"flowmap sample: error: {args.ckpt} is not a flowmap checkpoint.")
    module = load_module(cls, args.ckpt)
    if module.data_shape is None:
        raise SystemExit(f"flowmap sample: error: {args.ckpt} does not record its data shape.")
    if args.invert:
        if not hasattr(module, "invert") or args.data_npz is None:
            raise SystemExit(
                "flowmap sample: error: --invert needs a flow-map --ckpt and --data-npz."
            )
        with np.load(args.data_npz, allow_pickle=False) as z:
            x1 = torch.as_tensor(z["samples"])
        sol = module.invert(x1, args.nfe)
        np.savez(args.out, noise=sol.x.numpy(), samples=x1.numpy())
    else:
        g = torch.Generator().manual_seed(args.seed)
        x0 = torch.randn(args.n, *module.data_shape, generator=g)
        sol = module.generate(x0, args.nfe, args.method)
        np.savez(args.out, samples=sol.x.numpy(), noise=x0.numpy())
    picture = samples_picture(
        sol.x, args.out.with_suffix(".png"), f"{Path(args.ckpt).name}: NFE {sol.nfe}"
    )
    print(f"{args.out}: {len(sol.x)} samples, NFE {sol.nfe}; picture {picture}")
    return args.out
