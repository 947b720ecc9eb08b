"""Recipe pipelines: teacher → flow maps (one per loss) → FID/W2-vs-steps report, one command.

Each stage is the same Lightning CLI fit a user would run by hand (``flowmap fit --config
recipes/<name>/<stage>.yaml``); a stage whose checkpoint is already there is reused, so a killed
pipeline resumes where it stopped.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["fit_stage", "run_pipeline"]

LOSSES = ("lagrangian", "eulerian", "semigroup")


def fit_stage(config: Path, root: Path, overrides: Sequence[str] = ()) -> Path:
    """Run ``flowmap fit --config config`` into ``root`` (skipped if ``root/done.json`` exists)."""
    from flowmap.cli import cli_main

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
    losses: Sequence[str] = LOSSES,
    report_args: Sequence[str] = (),
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Teacher, then one flow map per loss, then ``flowmap report`` into ``out``."""
    from flowmap.report import main as report_main

    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.time()
    teacher = fit_stage(
        recipe / "teacher.yaml", out / "teacher", [*data_overrides, *teacher_overrides]
    )
    times["teacher"] = time.time() - t0
    flowmaps = []
    for loss in losses:
        t0 = time.time()
        ckpt = fit_stage(
            recipe / f"{loss}.yaml",
            out / loss,
            [f"--model.teacher_ckpt={teacher}", *data_overrides, *flowmap_overrides],
        )
        times[loss] = time.time() - t0
        flowmaps += ["--flowmap", f"{loss}={ckpt}"]
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
