"""``flowmap report``: its options and its entry point (``benchmarks/fid_vs_steps.py`` too)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowmap.apps.kit import CommandParser, check_writable_dir, positive_int
from flowmap.apps.report.config import DEFAULT_SIZES, ReportConfig
from flowmap.apps.report.engine import run_report
from flowmap.apps.summary import headline as headline_table
from flowmap.data.base import REFERENCE_SPLITS
from flowmap.metrics.evaluation import W2_GROUP_SIZE
from flowmap.ode import STAGES

__all__ = ["main", "parser"]

#: the one set of defaults: the options show those of :class:`ReportConfig`
_D = ReportConfig(teacher=None, out="")


def parser() -> argparse.ArgumentParser:
    """``flowmap report``'s options: what to report and where to write it; how to measure it
    (:func:`_measurement`)."""
    p = CommandParser(
        prog="flowmap report",
        description="FID (images) or W2 (2D data) against the number of sampling steps, with 95% "
        "intervals: the teacher's solvers, its adaptive solve, every flow map and the data's own "
        "floor, measured on the same noise. Writes report.md, fid_vs_steps.png (w2_vs_steps.png on "
        "2D data), samples_grid.png "
        "and results.json into --out; a killed run resumes from --out/rows/.",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="the teacher: a checkpoint (a VelocityModule from `flowmap fit`), whose data module "
        "gives the reference data; or a model trained elsewhere (a diffusers folder or a "
        ".yaml spec with class_path), whose data come from its first --flowmap. Needed unless "
        "--from-samples",
    )
    p.add_argument(
        "--flowmap",
        action="append",
        default=[],
        dest="flowmaps",
        metavar="[LABEL=]CKPT",
        help="a flow map's checkpoint (FlowMapModule), optionally labelled; repeat for several "
        "(the label defaults to the loss's name)",
    )
    p.add_argument(
        "--out", required=True, help="output directory (created; an existing one is resumed)"
    )
    p.add_argument(
        "--save-samples",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="N",
        help="write samples.npz (every row, the reference, the floor set); with N, only the "
        "first N samples of each row (a report recomputed from it then measures N samples); "
        "None: no samples.npz",
    )
    p.add_argument(
        "--from-samples",
        default=None,
        metavar="NPZ",
        help="recompute the report from a samples.npz alone (no checkpoints needed)",
    )
    _measurement(p)
    return p


def _measurement(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nfe",
        type=int,
        nargs="+",
        default=list(_D.nfe),
        help="NFE grid: network evaluations per sample, each a multiple of every solver's "
        "evaluations per step",
    )
    p.add_argument(
        "--solvers",
        nargs="+",
        default=list(_D.solvers),
        choices=[*STAGES, "ddim"],
        help="the teacher's fixed-step solvers, one row each per NFE (a diffusion teacher also "
        "gets its DDIM sampler)",
    )
    p.add_argument(
        "--n-samples",
        type=positive_int,
        default=None,
        help=f"samples per row (None: {DEFAULT_SIZES['image'][0]})",
    )
    p.add_argument(
        "--groups",
        type=positive_int,
        default=None,
        help="disjoint groups of samples used as replicates for the 95%% intervals (None: "
        f"{DEFAULT_SIZES['image'][1]} on images; on vector data groups of {W2_GROUP_SIZE} points, "
        "at least 2, since exact W2 depends on the group size)",
    )
    p.add_argument(
        "--reference-split",
        default=_D.reference_split,
        help=f"the data every row is compared with: {' or '.join(REFERENCE_SPLITS)} (the floor "
        "uses the other split)",
    )
    p.add_argument(
        "--seed", type=int, default=_D.seed, help="seed of the noise and of the reference draw"
    )
    p.add_argument("--rtol", type=float, default=_D.rtol, help="dopri5 relative tolerance")
    p.add_argument("--atol", type=float, default=_D.atol, help="dopri5 absolute tolerance")
    p.add_argument(
        "--batch-size", type=positive_int, default=_D.batch_size, help="samples generated per batch"
    )
    p.add_argument(
        "--feature",
        default=None,
        help="torch-fidelity feature extractor for FID (None: flowmap-digits on 8×8 images, "
        "inception-v3-compat otherwise)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=[],
        metavar="W",
        help="class-conditional teachers: the guidance scales to report (None: 1); the report "
        "then gives FID/KID/PR and class accuracy per scale (see flowmap.apps.report)",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="Inception-v3 weights file for FID on images other than 8×8 digits",
    )


def main(argv: Sequence[str] | None = None, quiet: bool = False) -> dict[str, Any]:
    """``flowmap report`` / ``python benchmarks/fid_vs_steps.py``: the report, then its headline
    table (unless ``quiet``: a pipeline prints its own). A problem the user can fix raises
    :class:`ValueError` or :class:`CheckpointError` (one sentence) before any work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    check_writable_dir(args.out, "--out")
    cmd = "flowmap report " + " ".join(shlex.quote(a) for a in argv)
    cfg = ReportConfig(command=cmd, **vars(args))
    results = run_report(cfg)
    if not quiet:
        print(headline_table(results, Path(cfg.out)), end="")
    return results
