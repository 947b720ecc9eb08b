"""Recipe pipelines: teacher → flow maps (one per loss) → FID/W2-vs-steps report, one command.

Each stage is the same Lightning CLI fit a user would run by hand (``flowmap fit --config
recipes/<name>/<stage>.yaml``); a stage whose checkpoint is already there is reused, so a killed
pipeline resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowmap.apps.cli import cli_main
from flowmap.apps.report import main as report_main

__all__ = ["fit_stage", "run_pipeline", "recipe_parser", "run_recipe"]

FLOW_MAP_STAGES = ("lagrangian", "eulerian", "semigroup")


def fit_stage(config: Path, root: Path, overrides: Sequence[str] = ()) -> Path:
    """Run ``flowmap fit --config config`` into ``root`` (skipped if ``root/done.json`` exists;
    that file records the checkpoint and the stage's wall time)."""
    done = root / "done.json"
    if done.exists():
        return Path(json.loads(done.read_text())["checkpoint"])
    start = time.time()
    cli = cli_main(
        ["fit", "--config", str(config), f"--trainer.default_root_dir={root}", *overrides]
    )
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    done.write_text(
        json.dumps(
            {"checkpoint": str(ckpt), "seconds": time.time() - start, "overrides": list(overrides)},
            indent=2,
        )
    )
    return ckpt


def run_pipeline(
    recipe: Path,
    out: Path,
    *,
    data_overrides: Sequence[str] = (),
    teacher_overrides: Sequence[str] = (),
    flowmap_overrides: Sequence[str] = (),
    losses: Sequence[str] = FLOW_MAP_STAGES,
    report_args: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Teacher, then one flow map per loss, then ``flowmap report`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    teacher = fit_stage(
        recipe / "teacher.yaml", out / "teacher", [*data_overrides, *teacher_overrides]
    )
    flowmaps = []
    for loss in losses:
        ckpt = fit_stage(
            recipe / f"{loss}.yaml",
            out / loss,
            [f"--model.teacher={teacher}", *data_overrides, *flowmap_overrides],
        )
        flowmaps += ["--flowmap", f"{loss}={ckpt}"]
    for stage in ("teacher", *losses):  # wall time of the run that trained each stage
        times[stage] = json.loads((out / stage / "done.json").read_text())["seconds"]
    t0 = time.time()
    results = report_main(
        ["--teacher", str(teacher), *flowmaps, "--out", str(out), "--save-samples", *report_args]
    )
    times["report"] = time.time() - t0
    cmd = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv))
    results["pipeline_command"] = cmd
    results["stage_seconds"] = times
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with open(out / "report.md", "a") as f:
        f.write(
            f"\nMade by `{cmd}`; stage wall times (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
            + ".\n"
        )
    return results


def recipe_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every recipe pipeline takes (``--out``, step overrides, losses, ``--tiny``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--teacher-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--flowmap-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--losses", nargs="+", default=list(FLOW_MAP_STAGES), choices=FLOW_MAP_STAGES)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    return p


def run_recipe(
    recipe: Path,
    args: argparse.Namespace,
    *,
    data_overrides: Sequence[str] = (),
    tiny_overrides: Sequence[str] = (),
    tiny_steps: tuple[int, int] = (20, 10),
    report_args: Sequence[str] = (),
    tiny_report_args: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Apply a recipe's command-line arguments and run :func:`run_pipeline`."""
    teacher: list[str] = []
    flowmap: list[str] = []
    report = list(report_args)
    if args.tiny:
        teacher = [*tiny_overrides, f"--trainer.max_steps={tiny_steps[0]}"]
        flowmap = [*tiny_overrides, f"--trainer.max_steps={tiny_steps[1]}"]
        report += list(tiny_report_args)
    if args.teacher_steps:
        teacher.append(f"--trainer.max_steps={args.teacher_steps}")
    if args.flowmap_steps:
        flowmap.append(f"--trainer.max_steps={args.flowmap_steps}")
    return run_pipeline(
        recipe,
        args.out,
        data_overrides=data_overrides,
        teacher_overrides=teacher,
        flowmap_overrides=flowmap,
        losses=args.losses,
        report_args=report,
        argv=[sys.executable, *sys.argv] if argv is None else argv,
    )
