"""Recipe pipelines: teacher → flow maps (one per loss) → FID/W2-vs-steps report, one command.

Each stage is the same Lightning CLI fit a user would run by hand (``flowmap fit --config
recipes/<name>/<stage>.yaml``). A finished stage is reused only if its recipe, overrides and
teacher are unchanged, and a killed stage resumes from its ``last.ckpt`` (:func:`fit_stage`), so a
killed pipeline resumes where it stopped; other inputs into the same ``--out`` are an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flowmap.apps.lightning_cli import cli_main
from flowmap.apps.report import main as report_main
from flowmap.apps.summary import headline
from flowmap.io import file_sha256

__all__ = ["fit_stage", "run_pipeline", "recipe_parser", "run_recipe"]

FLOW_MAP_STAGES = ("lagrangian", "eulerian", "semigroup")


def content_sha256(path: Path) -> str:
    """A file's SHA-256, or a folder's: of its files' relative paths and contents, in order."""
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{file_sha256(f)};".encode())
    return h.hexdigest()


def stage_inputs(config: Path, overrides: Sequence[str], teacher: Path | None) -> dict[str, Any]:
    """What a stage's result depends on: its recipe (by content), the overrides, and the teacher
    it distils (a checkpoint or a model folder, by content; its path, like the recipe's, may move)."""
    return {
        "config": str(config),
        "config_sha256": file_sha256(config),
        "overrides": [o for o in overrides if not o.startswith("--model.teacher=")],
        "teacher_sha256": content_sha256(teacher) if teacher is not None else None,
    }


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The inputs that differ, as a user reads them (``None``: the same inputs)."""
    if "config_sha256" not in old:
        return "it was made by an older flowmap that did not record its inputs"
    what = []
    if old["config_sha256"] != new["config_sha256"]:
        what.append(f"the recipe {new['config']} was edited")
    if old.get("overrides") != new["overrides"]:
        a, b = set(old.get("overrides", [])), set(new["overrides"])
        gone, added = " ".join(sorted(a - b)) or "none", " ".join(sorted(b - a)) or "none"
        what.append(f"overrides {gone} then, {added} now")
    if old.get("teacher_sha256") != new["teacher_sha256"]:
        what.append("its teacher checkpoint changed")
    return "; ".join(what) or None


def fit_stage(
    config: Path, root: Path, overrides: Sequence[str] = (), teacher: Path | None = None
) -> Path:
    """Run ``flowmap fit --config config`` into ``root``, unless it already ran there.

    A finished stage (``root/done.json``: checkpoint, wall time, inputs) is reused only if its
    inputs (:func:`stage_inputs`) are unchanged; a stage that was killed resumes from its
    ``last.ckpt`` under the same condition. Other inputs are an error that says which changed:
    the directory holds another run, and mixing them would report one under the other's name.
    """
    inputs = stage_inputs(config, overrides, teacher)
    done, started = root / "done.json", root / "inputs.json"
    recorded = done if done.exists() else started if started.exists() else None
    if recorded is not None:
        old = json.loads(recorded.read_text())
        changed = _changed(old.get("inputs", old), inputs)
        if changed:
            raise ValueError(
                f"{root} holds a stage made from other inputs ({changed}); "
                "pass another --out, or delete that directory to retrain it."
            )
        if recorded is done:
            print(f"{root.name}: reusing {root} (same recipe, overrides and teacher)")
            return Path(old["checkpoint"])
    last = root / "checkpoints" / "last.ckpt"
    resume = ["--ckpt_path", str(last)] if recorded is started and last.exists() else []
    if resume:
        print(f"{root.name}: resuming the interrupted run from {last}")
    root.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(inputs, indent=2))
    start = time.time()
    cli = cli_main(
        ["fit", "--config", str(config), f"--trainer.default_root_dir={root}", *overrides, *resume]
    )
    ckpt = Path(cli.trainer.checkpoint_callback.last_model_path)
    done.write_text(
        json.dumps(
            {"checkpoint": str(ckpt), "seconds": time.time() - start, "inputs": inputs}, indent=2
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
    teacher_stage: Callable[[Path], Path] | None = None,
) -> dict[str, Any]:
    """Teacher, then one flow map per loss, then ``flowmap report`` into ``out``.

    ``teacher_stage(out / "teacher")`` makes a teacher some other way (e.g. a diffusers model,
    trained outside flowmap) and returns what ``--model.teacher`` takes; it writes a
    ``done.json`` with its ``seconds`` there. Default: ``flowmap fit`` of ``teacher.yaml``."""
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    if teacher_stage is not None:
        teacher = teacher_stage(out / "teacher")
    else:
        teacher = fit_stage(
            recipe / "teacher.yaml", out / "teacher", [*data_overrides, *teacher_overrides]
        )
    flowmaps = []
    for loss in losses:
        ckpt = fit_stage(
            recipe / f"{loss}.yaml",
            out / loss,
            [f"--model.teacher={teacher}", *data_overrides, *flowmap_overrides],
            teacher=teacher,
        )
        flowmaps += ["--flowmap", f"{loss}={ckpt}"]
    for stage in ("teacher", *losses):  # wall time of the run that trained each stage
        times[stage] = json.loads((out / stage / "done.json").read_text())["seconds"]
    t0 = time.time()
    results = report_main(
        ["--teacher", str(teacher), *flowmaps, "--out", str(out), "--save-samples", *report_args],
        quiet=True,
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
    print(headline(results, out, stages=True), end="")
    return results


def recipe_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every recipe pipeline takes (``--out``, step overrides, losses, ``--tiny``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--teacher-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--flowmap-steps", type=int, default=None, help="override max_steps")
    p.add_argument("--losses", nargs="+", default=list(FLOW_MAP_STAGES), choices=FLOW_MAP_STAGES)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    p.add_argument(
        "--accelerator",
        choices=("cpu", "gpu", "auto"),
        default=None,
        help="the trainer's accelerator for every stage (default: the recipes', the CPU)",
    )
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
    teacher_stage: Callable[[Path], Path] | None = None,
    tiny_flowmap_overrides: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Apply a recipe's command-line arguments and run :func:`run_pipeline` (``teacher_stage``:
    see there; it reads ``--tiny`` and ``--teacher-steps`` itself). ``--tiny`` applies
    ``tiny_overrides`` to the teacher and ``tiny_flowmap_overrides`` (default: the same) to the
    flow maps, whose net may be the teacher's own and then takes no net overrides."""
    teacher: list[str] = []
    flowmap: list[str] = []
    report = list(report_args)
    if args.tiny:
        teacher = [*tiny_overrides, f"--trainer.max_steps={tiny_steps[0]}"]
        tiny_maps = tiny_overrides if tiny_flowmap_overrides is None else tiny_flowmap_overrides
        flowmap = [*tiny_maps, f"--trainer.max_steps={tiny_steps[1]}"]
        report += list(tiny_report_args)
    if getattr(args, "accelerator", None):
        teacher.append(f"--trainer.accelerator={args.accelerator}")
        flowmap.append(f"--trainer.accelerator={args.accelerator}")
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
        teacher_stage=teacher_stage,
    )
