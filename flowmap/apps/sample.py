"""``flowmap sample``: draw samples from a teacher or a flow-map checkpoint with a given NFE.

    flowmap sample --ckpt last.ckpt --nfe 2 --n 1000 --out samples.npz [--method heun] [--seed 0]

Writes ``samples`` (data space) and ``noise`` into an ``.npz`` (no pickle) and a picture (a tile of
up to 64 images, or a scatter plot of 2D samples) beside it with the same stem: ``--out
samples.npz`` writes ``samples.npz`` and ``samples.png``; ``--out samples.png`` (or ``.jpg``,
``.pdf``, ``.svg``) writes that picture and ``samples.npz``. It prints both paths and the NFE used.
A flow map can also run backwards: ``--invert --data-npz x.npz`` maps data to noise.

A class-conditional model samples ``--class C`` (every sample of class C) or, without it, an equal
share of every class, drawn as a grid with one row per class; ``--guidance W`` sets the
classifier-free guidance scale (a guided teacher step costs 2 NFE, a flow-map jump 1). The labels
are saved as ``labels`` in the ``.npz``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowmap.apps.kit import CommandParser, check_writable_file, positive_int
from flowmap.codecs import LatentCodec, build_codec, trained_codec
from flowmap.io import read_npz
from flowmap.protocols import Solution
from flowmap.training.loading import load_sampler
from flowmap.training.threads import set_threads

__all__ = [
    "main",
    "output_paths",
    "writable_outputs",
    "parser",
    "read_samples",
    "run_label",
    "write_samples",
]

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def writable_outputs(out: Path) -> tuple[Path, Path]:
    """:func:`output_paths`, each checked writable before any work (one sentence if not)."""
    npz, picture = output_paths(out)
    check_writable_file(npz, "--out")
    check_writable_file(picture, "--out")
    return npz, picture


def output_paths(out: Path) -> tuple[Path, Path]:
    """``(samples .npz, picture)`` for ``--out``: an ``.npz`` gets a ``.png`` beside it, a picture
    (``.png``/``.jpg``/``.jpeg``/``.pdf``/``.svg``) an ``.npz`` beside it, both with one stem."""
    suffix = out.suffix.lower()
    if suffix == ".npz":
        return out, out.with_suffix(".png")
    if suffix in PICTURE_SUFFIXES:
        return out.with_suffix(".npz"), out
    raise ValueError(
        f"--out {str(out)!r} must end in .npz (the samples; the picture goes beside it as .png) or "
        f"in {'/'.join(PICTURE_SUFFIXES)} (the picture; the samples go beside it as .npz)."
    )


def parser() -> CommandParser:
    p = CommandParser(
        prog="flowmap sample",
        description="Draw samples from a teacher or a flow-map checkpoint with a given NFE; write "
        "them (and their noise) to an .npz and a picture beside it, and print both paths.",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint of a teacher (VelocityModule) or a flow map; or a teacher trained "
        "elsewhere: a diffusers folder or a .yaml spec (flowmap.teachers)",
    )
    p.add_argument(
        "--nfe",
        type=positive_int,
        default=1,
        help="network evaluations: a flow map's number of jumps, or a teacher solver's budget "
        "(a multiple of its evaluations per step)",
    )
    p.add_argument("--n", type=positive_int, default=1000, help="number of samples")
    p.add_argument(
        "--method",
        default=None,
        help="sampling method (None: the model's own): a teacher's solver euler, midpoint, "
        "heun, rk4 or dopri5 (adaptive; ignores --nfe), a diffusion teacher's ddim, or a flow "
        "map's jumps",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument(
        "--class",
        dest="label",
        type=int,
        default=None,
        help="class-conditional models: the class of every sample (-1: no class, the "
        "unconditional model); default: an equal share of every class, one grid row each",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="class-conditional models: the guidance scale w (0 unconditional, 1 conditional, >1 "
        "guided; default: a teacher's 1, a flow map's trained scale)",
    )
    p.add_argument(
        "--codec",
        default=None,
        help="latent models: decode samples with this codec (a diffusers AutoencoderKL folder); "
        "default: the codec of the checkpoint's training data, if any",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="samples.npz (the picture goes beside it as .png) or a picture .png/.jpg/.pdf/.svg "
        "(the samples go beside it as .npz with the same stem)",
    )
    p.add_argument(
        "--invert",
        action="store_true",
        help="run a flow map backwards: map the data in --data-npz to noise",
    )
    p.add_argument(
        "--data-npz",
        type=Path,
        default=None,
        help="with --invert: an .npz whose 'samples' array is the data to map to noise",
    )
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Run ``flowmap sample``; returns the path of the ``.npz`` written. A problem the user can fix
    raises :class:`ValueError` or :class:`~flowmap.training.CheckpointError` (one sentence)."""
    args = parser().parse_args(argv)
    npz, picture = writable_outputs(args.out)
    if args.invert and args.data_npz is None:
        raise ValueError("--invert needs --data-npz, the data to map to noise.")
    set_threads()
    module, kind, _, _ = load_sampler(args.ckpt)
    trained_on = getattr(module, "trained_on", None)  # a flowmap checkpoint's data
    codec = build_codec(args.codec) if args.codec else trained_codec(trained_on)
    if args.invert:
        if not hasattr(module, "invert"):
            raise ValueError(
                f"--invert needs a flow-map checkpoint, but {args.ckpt!r} is a {kind}."
            )
        x1, saved = read_samples(args.data_npz, tuple(module.data_shape), codec)
        labels = _labels(module, args.label, len(x1))
        if args.label is None and saved is not None and module.num_classes is not None:
            labels = saved  # each sample inverts under the class it was drawn for
        z1 = x1 if codec is None else codec.encode(x1, sample=False)
        sol = module.invert(z1, args.nfe, y=labels, guidance=args.guidance)
        arrays = {"noise": sol.x.numpy(), "samples": x1.numpy()}
    else:
        g = torch.Generator().manual_seed(args.seed)
        x0 = torch.randn(args.n, *module.data_shape, generator=g)
        labels = _labels(module, args.label, args.n)
        kw = {} if labels is None and args.guidance is None else {"y": labels}
        if args.guidance is not None:
            kw["guidance"] = args.guidance
        sol = module.generate(x0, args.nfe, args.method, **kw)
        arrays = {"samples": sol.x.numpy(), "noise": x0.numpy()}
        if codec is not None:  # latents kept; samples and picture in pixels
            arrays["latents"] = arrays["samples"]
            sol = Solution(codec.decode(sol.x), sol.nfe)
            arrays["samples"] = sol.x.numpy()
    what = "noise from the data" if args.invert else "samples"
    title = f"{run_label(args.ckpt)} ({kind}): NFE {sol.nfe}"
    if args.guidance is not None:
        title += f", guidance {args.guidance:g}"
    grid = labels is not None and not args.invert and args.label is None
    write_samples(npz, picture, arrays, sol.x, title, labels, grid)
    print(f"{npz}: {len(sol.x)} {what}, NFE {sol.nfe}; picture {picture}")
    return npz


def write_samples(
    npz: Path,
    picture: Path,
    arrays: dict[str, np.ndarray],
    x: torch.Tensor,
    title: str,
    labels: torch.Tensor | None = None,
    grid: bool = False,
) -> None:
    """Write ``arrays`` (and ``labels``, if any) to ``npz`` (no pickle) and the picture of ``x``
    (data space) to ``picture``: one grid row per class with ``grid`` (``labels`` in equal
    shares), otherwise a tile of up to 64 images or a scatter plot of 2D samples."""
    from flowmap.apps.pictures import class_grid_picture, samples_picture  # matplotlib here

    if labels is not None:
        arrays = {**arrays, "labels": labels.numpy()}
    npz.parent.mkdir(parents=True, exist_ok=True)
    with open(npz, "wb") as f:  # a file object: numpy adds no second suffix
        np.savez(f, **arrays)
    if grid and labels is not None:
        class_grid_picture(x, labels, picture, title)
    else:
        samples_picture(x, picture, title)


def run_label(ckpt: str) -> str:
    """What a picture calls a checkpoint: its run's folder with the file,
    ``runs/toy2d/lagrangian/checkpoints/last.ckpt`` → ``lagrangian/last.ckpt`` (a folder: its name)."""
    p = Path(ckpt).resolve()
    if p.is_dir():
        return p.name
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return f"{run.name}/{p.name}" if run.name else p.name


def _labels(module: Any, label: int | None, n: int) -> torch.Tensor | None:
    """The labels of ``n`` samples: ``label`` for all, or (a conditional model, no ``--class``)
    classes ``0..K-1`` in equal shares, one block per class; ``None`` for an unconditional model
    without ``--class`` (with it, the model's own one-sentence error)."""
    k = module.num_classes
    if label is not None:
        return torch.full((n,), label, dtype=torch.long)
    if k is None:
        return None
    return torch.arange(n) * k // n


def read_samples(
    path: Path, shape: tuple[int, ...], codec: LatentCodec | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``samples`` (checked against ``shape``, through ``codec`` for pixels of a latent model)
    and, if saved, their ``labels``."""
    z = read_npz(path, "--data-npz", "pass the .npz that `flowmap sample` wrote")
    with z:
        if "samples" not in z.files:
            raise ValueError(f"--data-npz {str(path)!r} has no 'samples' array to invert.")
        x1 = torch.as_tensor(z["samples"]).float()
        labels = torch.as_tensor(z["labels"]).long() if "labels" in z.files else None
    try:
        got = tuple(x1.shape[1:]) if codec is None else codec.latent_shape(x1.shape[1:])
    except ValueError:
        got = ()
    if got != shape:
        raise ValueError(
            f"--data-npz {str(path)!r} holds samples of shape {list(x1.shape[1:])}, but the "
            f"checkpoint's data have shape {list(shape)}"
            + (" (its latents; give the pixels its codec encodes)." if codec else ".")
        )
    return x1, labels
