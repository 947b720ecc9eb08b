"""The help a user reads: ``flowmap --help`` (every command) and ``flowmap fit --help``
(flowmap's own components and their documented options first, Lightning's on request)."""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
from typing import Any

from flowmap.apps.kit import COMMANDS
from flowmap.data.base import FlowDataModule
from flowmap.training import FlowModuleBase

__all__ = ["command_help", "component_groups", "init_parameters", "overview"]


class _Group:
    def __init__(self, title: str, key: str, classes: list[type]) -> None:
        self.title, self.key, self.classes = title, key, classes


def _concrete(module: Any, base: type, *, exclude: tuple[type, ...] = ()) -> list[type]:
    out = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name, None)
        if (
            inspect.isclass(obj)
            and issubclass(obj, base)
            and obj is not base
            and obj not in exclude
            and not inspect.isabstract(obj)
        ):
            out.append(obj)
    return out


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The options a component takes on the command line: its ``__init__`` parameters."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n not in ("self", "args", "kwargs")}


def component_groups() -> list[_Group]:
    """flowmap's components as the CLI takes them: models, nets, losses (and their parts), data."""
    import torch

    import flowmap.codecs
    import flowmap.data
    import flowmap.losses
    import flowmap.nets
    import flowmap.training

    def takes_x_s_t(cls: type) -> bool:
        return list(inspect.signature(cls.forward).parameters)[1:4] == ["x", "s", "t"]

    nets = [c for c in _concrete(flowmap.nets, torch.nn.Module) if takes_x_s_t(c)]
    return [
        _Group("Models", "model", _concrete(flowmap.training, FlowModuleBase)),
        _Group("Networks", "model.net", nets),
        _Group("Losses (FlowMapModule)", "model.loss", list(flowmap.losses.LOSSES)),
        _Group("Time pairs of a loss", "model.loss.pairs", [flowmap.losses.TimePairSampler]),
        _Group("Loss weighting", "model.loss.weighting", [flowmap.losses.LossWeighting]),
        _Group(
            "Data",
            "data",
            [*_concrete(flowmap.data, FlowDataModule), flowmap.codecs.LatentDataModule],
        ),
    ]


_LATEX = {  # longer commands first: \leftarrow before \le
    r"\leftarrow": "←",
    r"\phi": "φ",
    r"\eta": "η",
    r"\delta": "δ",
    r"\Delta": "Δ",
    r"\gamma": "γ",
    r"\tau": "τ",
    r"\omega": "ω",
    r"\ell": "ℓ",
    r"\sim": "~",
    r"\le": "≤",
    r"\ge": "≥",
    r"\cdot": "·",
    r"\|": "‖",
    r"\,": " ",
    r"\;": " ",
    r"\dot ": "d/dt ",
}


def _rst(text: str) -> str:
    """Docstring markup to plain text: ``:math:`\\phi``` → φ, ``:class:`~a.B``` → B, ````x```` → x."""

    def math(m: re.Match[str]) -> str:
        body = re.sub(r"\\(?:mathrm|mathbf|operatorname)\{([^}]*)\}", r"\1", m.group(1))
        for tex, plain in _LATEX.items():
            body = body.replace(tex, plain)
        return body.replace("\\", "")

    text = re.sub(r":math:`([^`]*)`", math, text)
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text)
    text = text.replace("``", "")
    return " ".join(text.split())


def _first_sentence(text: str) -> str:
    text = _rst(text)
    cut = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<=[a-z0-9)\]])\.(\s|$)", text)
    return text[: cut.start()] if cut else text.rstrip(".")


def _param_docs(cls: type) -> dict[tuple[str, ...], str]:
    """``Args:`` descriptions of ``cls`` (class and ``__init__`` docstrings), keyed by the names
    each entry documents (``lr, weight_decay: …`` documents both)."""
    try:
        import docstring_parser
    except ImportError:  # jsonargparse[signatures] installs it; without it, no descriptions
        return {}
    docs: dict[tuple[str, ...], str] = {}
    for text in (inspect.getdoc(cls), inspect.getdoc(cls.__init__)):
        if not text:
            continue
        for param in docstring_parser.parse(text).params:
            names = tuple(n.strip() for n in param.arg_name.split(","))
            docs.setdefault(names, _first_sentence(param.description or ""))
    return docs


def _default(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _short(cls: type, group: _Group) -> str:
    """A class's name without the suffix its whole group shares (``FlowMap`` for FlowMapModule)."""
    names = [c.__name__ for c in group.classes]
    for suffix in ("DataModule", "Module", "Loss"):
        if all(n.endswith(suffix) and n != suffix for n in names):
            return cls.__name__[: -len(suffix)]
    return cls.__name__


def _group_lines(group: _Group, width: int) -> list[str]:
    """One line per class, then one per option (or per set of options documented together): its
    description from the docstring and its default, per class where they differ."""
    key = group.key
    if len(group.classes) == 1:
        cls = group.classes[0]
        lines = [f"{group.title} ({_class_path(cls)}): --{key}.OPTION=VALUE"]
    else:
        lines = [f"{group.title}: --{key}=CLASS, then --{key}.OPTION=VALUE"]
        pad = max(len(_class_path(c)) for c in group.classes) + 2
        for cls in group.classes:
            summary = _first_sentence(inspect.getdoc(cls) or "")
            lines += _wrap(f"  {_class_path(cls):<{pad}}{summary}", width, " " * (pad + 2))
        if key == "model.loss":
            from flowmap.presets import PRESETS

            lines += _wrap(
                f"  or a preset by name, e.g. --{key}=meanflow: {', '.join(sorted(PRESETS))} "
                f"(recipes/presets/NAME.yaml). A loss named on the command line starts from "
                f"its own defaults (the recipe's loss settings do not carry over); options "
                f"after it change it.",
                width,
                " " * 4,
            )
    takes: dict[str, dict[str, str]] = {}
    docs: dict[tuple[str, ...], str] = {}
    for cls in group.classes:
        for name, param in init_parameters(cls).items():
            takes.setdefault(name, {})[_short(cls, group)] = _default(param.default)
        for names, text in _param_docs(cls).items():
            if text and all(n in takes for n in names):
                docs.setdefault(names, text)
    rows: list[tuple[str, str, str]] = []
    done: set[str] = set()
    for name in takes:
        if name in done:
            continue
        names = next((ns for ns in docs if name in ns and not done & set(ns)), (name,))
        done.update(names)
        defaults = []
        for n in names:
            by_class = takes[n]
            values = set(by_class.values())
            label = f"{n}=" if len(names) > 1 else ""
            if len(by_class) == len(group.classes) and len(values) == 1:
                defaults.append(f"{label}{values.pop()}")
            elif len(values) == 1:
                defaults.append(f"{label}{'/'.join(by_class)}: {values.pop()}")
            else:
                defaults.append(label + ", ".join(f"{c}: {v}" for c, v in by_class.items()))
        option = f"--{key}.{names[0]}" if len(names) == 1 else f"--{key}.{{{','.join(names)}}}"
        rows.append((option, docs.get(names, ""), "[" + "; ".join(defaults) + "]"))
    pad = min(max(len(r[0]) for r in rows), 30) + 2
    for option, text, default in rows:
        head = f"    {option:<{pad}}" if len(option) < pad else f"    {option}  "
        body = f"{text} {default}" if text else default
        lines += _wrap(head + body, width, " " * (4 + pad))
    return lines


def _class_path(cls: type) -> str:
    """``flowmap.training.VelocityModule`` for ``flowmap.training.velocity.VelocityModule``: the
    shortest package that exports the class, as the recipes write it."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        pkg = importlib.import_module(".".join(parts[:i]))
        if getattr(pkg, cls.__name__, None) is cls and i > 1:
            return ".".join([*parts[:i], cls.__name__])
    return f"{cls.__module__}.{cls.__name__}"


def command_help(command: str, width: int | None = None) -> str:
    """``flowmap fit --help``: flowmap's own components and options first, and where the rest is."""
    width = width or min(max(shutil.get_terminal_size((100, 24)).columns, 80), 160)
    if command == "validate":
        usage = (
            "usage: flowmap validate --config RECIPE.yaml --ckpt_path CHECKPOINT [--KEY=VALUE ...]"
        )
        intro = "Run the validation loop (loss and sample quality) of a checkpoint on its recipe's data."
    else:
        usage = "usage: flowmap fit --config RECIPE.yaml [--KEY=VALUE ...] [--ckpt_path last]"
        intro = (
            "Train a teacher or a flow map. A recipe (recipes/<data>/<stage>.yaml) sets every "
            "component below; override any option on the command line, e.g. "
            "--trainer.max_steps=500 --model.lr=1e-3 --data.batch_size=256. "
            "Each option shows its default in [brackets]."
        )
    lines = [usage, "", *_wrap(intro, width), ""]
    for group in component_groups():
        lines += _group_lines(group, width)
    lines += [
        "",
        *_wrap(
            "Also: --trainer.max_steps, --trainer.default_root_dir, --trainer.accelerator, "
            "--checkpoint.every_n_train_steps, --logger {csv,wandb,none}, --seed_everything, "
            "--ckpt_path, --print_config (the full resolved config).",
            width,
            "      ",
        ),
        "More: flowmap fit --help-all (Lightning's full help: every Trainer and checkpoint option)",
        "      flowmap fit --model.help flowmap.training.FlowMapModule  (one class, "
        "as jsonargparse prints it)",
    ]
    return "\n".join(lines).replace("flowmap fit", f"flowmap {command}") + "\n"


def _wrap(text: str, width: int, indent: str = "") -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, subsequent_indent=indent)


def overview() -> str:
    """``flowmap --help``: every subcommand, one line each."""
    pad = max(map(len, COMMANDS)) + 2
    lines = [
        "usage: flowmap COMMAND [OPTIONS]   (flowmap COMMAND --help for a command's options)",
        "",
        "Flow-map distillation: train a velocity teacher, distil a few-step flow map, sample, and",
        "measure quality against the number of steps.",
        "",
        "commands:",
        *(f"  {name:<{pad}}{text}" for name, text in COMMANDS.items()),
        "",
        "e.g. flowmap fit --config recipes/toy2d/teacher.yaml",
        "     flowmap sample --ckpt runs/toy2d/teacher/checkpoints/last.ckpt --nfe 4 --out s.npz",
    ]
    return "\n".join(lines) + "\n"
