"""Render the presets into recipes/presets/<name>.yaml and README.md's preset table.

The one source is :data:`flowmap.presets.PRESETS`: each preset's line in ``flowmap/presets.py``,
its prose in ``flowmap/presets.yaml``. The README's table sits between ``<!-- presets:begin -->``
and ``<!-- presets:end -->``; its last column is the cost per step measured in :data:`SPEED`.

    python scripts/write_presets.py          # rewrite the files
    python scripts/write_presets.py --check  # exit 1 if a file differs from what it would write

Each YAML is a ``flowmap fit`` config on the toy checkerboard at the self-distillation
benchmark's budget (4×256 MLP, 3000 steps, batch 1024, lr 1e-3); a distillation preset takes the
toy teacher of ``recipes/toy2d/teacher.yaml`` and starts from a copy of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from flowmap.presets import PRESETS, Preset, table

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "recipes" / "presets"
README = ROOT / "README.md"
BEGIN, END = "<!-- presets:begin -->", "<!-- presets:end -->"
#: the measured cost per step of the table's last column (``benchmarks/self_distillation.py speed``)
SPEED = ROOT / "benchmarks" / "results" / "self-distillation-1000" / "speed.json"
TEACHER = "runs/toy2d/teacher/checkpoints/last.ckpt"
#: the teacher's net (recipes/toy2d/teacher.yaml), which a distilled student copies
TEACHER_NET = {"data_shape": [2], "width": 256, "depth": 2}
#: the self-distillation benchmark's net
SCRATCH_NET = {"data_shape": [2], "width": 256, "depth": 4}


def config(p: Preset) -> dict[str, Any]:
    """The ``flowmap fit`` config of preset ``p``."""
    model: dict[str, Any] = {
        "teacher": TEACHER if p.needs_teacher else None,
        "net": {
            "class_path": "flowmap.nets.MLP",
            "init_args": TEACHER_NET if p.needs_teacher else SCRATCH_NET,
        },
        "loss": p.loss,
        "lr": 0.001,
        "warmup_steps": 100,
    }
    if not p.needs_teacher:
        model["warm_start"] = False
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3000,
            "gradient_clip_val": 1.0,
            "val_check_interval": 1000,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 1,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "flowmap.training.SampleQuality",
                    "init_args": {"nfe": [1, 2, 4, 8]},
                }
            ],
            "default_root_dir": f"runs/presets/{p.name}",
        },
        "model": {"class_path": "flowmap.training.FlowMapModule", "init_args": model},
        "data": {
            "class_path": "flowmap.data.Toy2DDataModule",
            "init_args": {"name": "checkerboard", "batch_size": 1024, "n_val": 2048},
        },
        "checkpoint": {"every_n_train_steps": 1000},
    }


def _comment(text: str) -> list[str]:
    return ["#   " + line for line in textwrap.wrap(text, 92)]


def render(p: Preset) -> str:
    """The YAML text of preset ``p``: a header of comments, then the config."""
    head = [f"# {p.title}: preset {p.name!r} (flowmap.presets.PRESETS[{p.name!r}])"]
    head += _comment(p.citation)
    head += ["# Place in the taxonomy:"] + _comment(p.place)
    if p.differences:
        head += ["# Where flowmap's preset differs from the paper:"] + _comment(p.differences)
    head.append(
        "# Written by scripts/write_presets.py from flowmap/presets.py and presets.yaml; edit "
        "those, not this."
    )
    if p.needs_teacher:
        head += [
            "# Distils the toy teacher (flowmap fit --config recipes/toy2d/teacher.yaml first):",
            f"#   flowmap fit --config recipes/presets/{p.name}.yaml --model.teacher={TEACHER}",
        ]
    else:
        head += [
            "# Trains from scratch:",
            f"#   flowmap fit --config recipes/presets/{p.name}.yaml",
        ]
    body = yaml.safe_dump(config(p), sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(head) + "\n" + body


def readme_table() -> str:
    """README.md's preset table: each preset's columns and its measured cost per step."""
    return "\n".join(table(json.loads(SPEED.read_text()) if SPEED.is_file() else None))


def with_table(readme: str) -> str:
    """``readme`` with the text between its two markers replaced by :func:`readme_table`."""
    head, begin, rest = readme.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not (begin and end):
        raise ValueError(f"README.md lacks the markers {BEGIN} ... {END}")
    return f"{head}{BEGIN}\n\n{readme_table()}\n\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    wanted = {OUT / f"{p.name}.yaml": render(p) for p in PRESETS.values()}
    wanted[README] = with_table(README.read_text(encoding="utf-8"))
    stale = []
    for path, text in wanted.items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    extra = sorted({f.name for f in OUT.glob("*.yaml")} - {f"{n}.yaml" for n in PRESETS})
    if args.check and (stale or extra):
        print(f"out of date: {stale}; not a preset: {extra}", file=sys.stderr)
        return 1
    print(f"{'stale' if args.check else 'wrote'}: {stale or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
