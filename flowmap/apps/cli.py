"""The ``flowmap`` command: ``fit`` and ``validate`` (LightningCLI) plus ``sample`` and ``report``.

* ``flowmap fit --config recipes/toy2d/teacher.yaml [--trainer.max_steps=…]``
* ``flowmap validate --config recipes/toy2d/teacher.yaml --ckpt_path C.ckpt``
* ``flowmap sample --ckpt C.ckpt --nfe 4 --n 1000 --out samples.npz``
* ``flowmap report --teacher T.ckpt --flowmap lagrangian=L.ckpt … --out DIR`` (FID/W2 vs steps)

Fits write checkpoints (``last.ckpt`` included, so ``--ckpt_path last`` resumes) and their
``config.yaml`` under the logger's directory. ``--logger csv`` (default) or ``--logger wandb``
(offline when no W&B account is configured) or ``--logger none``.

Every command has one error path, :func:`fail`: a mistake the user can fix (a bad option, a missing
or foreign checkpoint, an unwritable output) is one line ``flowmap: error: <sentence>`` on stderr
and exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextvars
import difflib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from flowmap.data.base import FlowDataModule
from flowmap.training import (
    CheckpointError,
    ConfigBesideCheckpoints,
    FlowModuleBase,
    InterruptCheckpoint,
    NonFiniteLossError,
)
from flowmap.training.base import check_fit_directory
from flowmap.training.progress import FlowmapProgressBar
from flowmap.training.teachers import missing_student_teacher
from flowmap.training.threads import ThreadsForLoad, set_threads

__all__ = [
    "COMMANDS",
    "CommandParser",
    "FlowmapCLI",
    "check_writable_dir",
    "check_writable_file",
    "cli_main",
    "fail",
    "main",
    "make_logger",
    "one_sentence",
    "quiet_console",
    "run_command",
]

LOGGERS = ("csv", "wandb", "none")
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError)
#: Every subcommand, with the line ``flowmap --help`` prints for it.
COMMANDS = {
    "fit": "train a teacher (VelocityModule) or a flow map (FlowMapModule) from a recipe",
    "validate": "run the validation loop (loss and sample quality) on a checkpoint",
    "sample": "draw samples from a teacher or flow-map checkpoint at a given NFE",
    "report": "FID (images) or W2 (2D data) against the number of sampling steps, with 95% intervals",
}
#: The subcommands LightningCLI runs (the modules have no test_step or predict_step).
TRAINER_COMMANDS = ("fit", "validate")
_COMMAND: contextvars.ContextVar[str] = contextvars.ContextVar("flowmap_command", default="")


# --------------------------------------------------------------------------- the one error path
def fail(message: str) -> NoReturn:
    """Print ``flowmap: error: <message>`` (one line) on stderr and exit with status 2."""
    sys.stderr.write(f"flowmap: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, or ``(required)``; a flag shows none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:  # store_true / store_false: a flag
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse for ``flowmap sample`` and ``flowmap report``: every default shown in ``--help``,
    and a bad argument is one line through :func:`fail` instead of a usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def user_error(err: BaseException) -> BaseException | None:
    """The innermost user error (:data:`USER_ERRORS`) in ``err``'s chain of causes, following a
    context only where it was not suppressed (``raise ... from None``)."""
    found, node = None, err
    while node is not None:
        if isinstance(node, USER_ERRORS):
            found = node
        node = node.__cause__ or (None if node.__suppress_context__ else node.__context__)
    return found


def check_writable_dir(path: str | os.PathLike[str], option: str) -> Path:
    """Check, before any work, that ``path`` is or can become a writable directory; nothing is
    created. A problem is a one-sentence :class:`ValueError` naming ``option``."""
    p = Path(path).expanduser()
    try:
        if p.exists() and not p.is_dir():
            raise ValueError(
                f"{option} {str(p)!r} is an existing file, not a directory; choose a directory."
            )
        _check_creatable(p, option)
    except PermissionError:
        raise ValueError(
            f"{option} {str(p)!r} is not accessible; choose another directory."
        ) from None
    return p


def check_writable_file(path: str | os.PathLike[str], option: str) -> Path:
    """Check, before any work, that a file can be written at ``path`` (parents may be missing)."""
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            raise ValueError(f"{option} {str(p)!r} is a directory; give a file name.")
        if p.exists() and not os.access(p, os.W_OK):
            raise ValueError(f"{option} {str(p)!r} exists and is read-only; choose another path.")
        _check_creatable(p.parent, option, p)
    except PermissionError:
        raise ValueError(f"{option} {str(p)!r} is not accessible; choose another path.") from None
    return p


def _check_creatable(directory: Path, option: str, target: Path | None = None) -> None:
    target = target or directory
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(
            f"{option} {str(target)!r} cannot be created: {str(probe)!r} is a file; choose another path."
        )
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(
            f"{option} {str(target)!r} is not writable ({reason} in {str(probe)!r}); "
            "choose a writable location."
        ) from None


# --------------------------------------------------------------------------- a quiet console
#: Known-harmless warnings of the libraries under flowmap, silenced by exact message.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
    ),  # Lightning on torch 2.10+
    (r"`torch\.jit\.script` is deprecated", FutureWarning),
    (r"The '\w+' does not have many workers", UserWarning),  # flowmap's toy data are in memory
)
#: Known-harmless Lightning info lines (its ``rank_zero_info`` logger), dropped by exact message.
HARMLESS_LOG_LINES = re.compile(
    r"💡 Tip: .*litlogger"
    r"|GPU available: False, used: False$"
    r"|TPU available: False, using: 0 TPU cores$"
    r"|`Trainer\(limit_(train|val|test|predict)_batches=1(\.0)?\)` was configured so"
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not HARMLESS_LOG_LINES.match(record.getMessage())


def quiet_console() -> None:
    """Silence the known-harmless warnings and info lines above (and only those)."""
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless())


# --------------------------------------------------------------------------- loggers
def _wandb_has_account() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def make_logger(kind: str, save_dir: str, name: str = "logs") -> Any:
    """A CSV or W&B logger in ``save_dir``; W&B runs offline unless an account is configured."""
    if kind not in LOGGERS:
        raise ValueError(f"Unknown logger {kind!r}; choose one of {list(LOGGERS)}.")
    if kind == "none":
        return False
    if kind == "wandb":
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not _wandb_has_account()
        return WandbLogger(save_dir=save_dir, project=name, offline=offline)
    return CSVLogger(save_dir=save_dir, name=name)


# --------------------------------------------------------------------------- one-sentence errors
def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _init_params(cls: type) -> list[str]:
    from flowmap.apps.help import init_parameters

    return list(init_parameters(cls))


def _family(cls: type) -> list[type]:
    """The flowmap classes that can take ``cls``'s place (the other models, nets, losses or data)."""
    from flowmap.apps.help import component_groups  # the help's grouping of the classes

    for group in component_groups():
        if cls in group.classes:
            return group.classes
    return []


def _suggestion(class_path: str | None, option: str) -> str:
    """ "; did you mean 'x'? It takes a, b, c" for an option a class does not take, or the class of
    the same family (model, net, loss, data) that takes it."""
    if not class_path:
        return ""
    try:
        cls = _import(class_path)
        names = _init_params(cls)
    except (ImportError, AttributeError, ValueError, TypeError):
        return ""
    name = cls.__name__
    option = option.split(".")[0]  # 'loss.teacher_max_gap': the class lacks 'loss'
    close = difflib.get_close_matches(option, names, n=1)
    if close:
        return f"; did you mean {close[0]!r}? {name} takes {', '.join(names)}"
    for other in _family(cls):
        if other is cls:
            continue
        there = difflib.get_close_matches(option, _init_params(other), n=1)
        if there:
            return (
                f"; did you mean {there[0]!r}? It is an option of {other.__name__}, not of "
                f"{name}, which takes {', '.join(names)}"
            )
    return f"; {name} takes {', '.join(names)}"


def _yaml_sentence(text: str) -> str:
    """``Problems parsing config: <PyYAML's multi-line report>`` → ``line L, column C: problem``."""
    marks = re.findall(r'in "([^"]*)", line (\d+), column (\d+)', text)
    body = re.sub(r'\s*in "[^"]*", line \d+, column \d+', "", text)
    body = body.replace("Problems parsing config:", "").strip()
    parts = [p.strip() for p in body.splitlines() if p.strip()]
    problem = parts[-1] if parts else body
    # PyYAML notices a missing ':' or ']' on a later line; its first mark is where the
    # construct in trouble starts, the line to fix
    where = f"line {marks[0][1]}, column {marks[0][2]}" if marks else ""
    if len(marks) > 1 and marks[-1][1] != marks[0][1]:
        where += f" (noticed at line {marks[-1][1]})"
    return f"YAML syntax error at {where}: {problem}" if where else f"YAML syntax error: {problem}"


_TYPE_WORDS = {"float": "a number", "int": "a whole number", "NoneType": "null", "str": "text"}


def _union_sentence(text: str, given: str) -> str:
    """jsonargparse's "Does not validate against any of the Union subtypes Subtypes: [<class
    'float'>, <class 'NoneType'>] Errors:" → "expected a number or null, got 'inf'" (YAML reads
    nan and inf as text: no option of flowmap takes them)."""
    union = re.search(
        r"Does not validate against any of the Union subtypes\s*Subtypes: \[(.*?)\]", text
    )
    if not union:
        return text
    kinds = [t.rpartition(".")[2] for t in re.findall(r"<class '([\w.]+)'>", union.group(1))]
    words = [_TYPE_WORDS.get(k, k) for k in kinds]
    if "a number" in words and re.fullmatch(r"[+-]?(nan|inf\w*)", given, re.I):
        words[words.index("a number")] = "a finite number"
    return text[: union.start()] + f"expected {' or '.join(words)}, got {given!r}"


def one_sentence(message: str) -> str:
    """Boil a (nested, multi-line) jsonargparse error down to the innermost problem, in one line:
    which key, which class, what is wrong, and the close option name when one was misspelt."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if message.startswith("Problems parsing config"):
        return _yaml_sentence(message)
    class_paths = list(re.finditer(r"Problem with given class_path '([^']+)'", message))
    class_path = class_paths[-1].group(1) if class_paths else None
    head = message[: class_paths[-1].start()] if class_paths else message
    key = ".".join(re.findall(r'Parser key "([^"]+)"', head)) or None
    if class_path:
        problem = f"Problem with given class_path '{class_path}'"
        start = max(i for i, ln in enumerate(lines) if problem in ln)
        detail = []
        for ln in lines[start + 1 :]:
            if ln.startswith("- ") or ln.startswith("Given value"):
                break
            detail.append(ln.rstrip(":") if ln.startswith("Parser key") else ln)
        text = " ".join(detail) or lines[-1]
        given = next((ln for ln in lines[start + 1 :] if ln.startswith("Given value:")), "")
        text = _union_sentence(text, given.partition(":")[2].strip())
        where = f"{key} ({class_path})" if key else class_path
    else:
        text, where = " ".join(lines[:2]), None
    option = re.search(r"(?:Option|Key) '([^']+)' is not accepted", text)
    if option:
        text = (
            f"option {option.group(1)!r} is not accepted{_suggestion(class_path, option.group(1))}"
        )
    if "Problems parsing config" in text:  # a YAML file given as the value of a nested key
        text = _yaml_sentence(text[text.index("Problems parsing config") :])
    nan = re.search(r"Expected a <class 'float'>\. Got value: ([+-]?(?:nan|inf)\w*)", text, re.I)
    if nan:
        text = text[: nan.start()] + f"must be a finite number, got {nan.group(1)}"
    text = re.sub(r'Parser key "([^"]+)":?', r"\1:", text)
    text = text.replace("::", ":")
    missing = re.match(r"config: File does not exist: (.*)", text)
    if missing:
        text = f"the --config file {missing.group(1)} does not exist; check the path"
    return f"{where}: {text}" if where else text


def _option_keys(parser: argparse.ArgumentParser) -> list[str]:
    return [o[2:] for o in parser._option_string_actions if o.startswith("--")]


def _closest_key(key: str, keys: list[str]) -> str | None:
    """The valid option closest to a misspelt one: the whole dotted key, else its first part."""
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if close:
        return close[0]
    root, dot, rest = key.partition(".")
    roots = sorted({k.split(".")[0] for k in keys})
    close = difflib.get_close_matches(root, roots, n=1)
    if close and close[0] != root:
        return f"{close[0]}{dot}{rest}"
    prefix = root + "."
    close = difflib.get_close_matches(
        key, [k for k in keys if k.startswith(prefix)], n=1, cutoff=0.6
    )
    return close[0] if close else None


def _unrecognized(message: str, parser: argparse.ArgumentParser) -> str | None:
    """``unrecognized arguments: fit --trainer.max_stepz=3`` → a sentence with the closest key."""
    command = _COMMAND.get()
    if command in TRAINER_COMMANDS and re.match(
        r"the following arguments are required: .*model", message
    ):
        return (
            f"`flowmap {command}` needs a recipe: --config recipes/<data>/<stage>.yaml "
            "(or --model=CLASS and --data=CLASS)"
        )
    found = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if not found:
        return None
    tokens = found.group(1).split()
    if tokens and tokens[0] == command:
        tokens = tokens[1:]
    options = [t for t in tokens if t.startswith("-")]
    if not options:
        if command in TRAINER_COMMANDS:
            return (
                f"`flowmap {command}` needs a recipe: --config recipes/<data>/<stage>.yaml "
                "(or --model=CLASS and --data=CLASS)"
            )
        return f"unrecognized arguments: {' '.join(tokens)}"
    sub = _subcommand_parser(parser, command) or parser
    keys = _option_keys(sub)
    bad = options[0].split("=", 1)[0]
    close = _closest_key(bad.lstrip("-"), keys)
    hint = f"; did you mean --{close}?" if close else ""
    return f"unrecognized option {bad}{hint}"


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> Any:
    action = getattr(parser, "_subcommands_action", None)
    return action._name_parser_map.get(command) if action is not None and command else None


class FlowmapArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, printing a bad argument as one sentence instead of a usage dump."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        command = _COMMAND.get()
        see = f"flowmap {command} --help" if command else "flowmap --help"
        fail(f"{_unrecognized(message, self) or one_sentence(message)} (see `{see}`)")

    def _load_config_parser_mode(self, content: str, path: Any = "", *args: Any, **kwargs: Any):
        """As jsonargparse's, but a YAML syntax error names the file it is in."""
        try:
            return super()._load_config_parser_mode(content, path, *args, **kwargs)
        except TypeError as err:
            text = str(err)
            if not path or not text.startswith("Problems parsing config"):
                raise
            full = os.path.abspath(path)  # jsonargparse passes the basename, from the file's folder
            raise TypeError(
                f"{full if os.path.exists(full) else path}: {_yaml_sentence(text)}"
            ) from err


# --------------------------------------------------------------------------- the Lightning CLI
_NULLS = ("null", "Null", "NULL", "~")


def _nested_nulls_as_config(args: list[str]) -> list[str]:
    """``--model.loss.init_args.teacher_max_gap=null`` → ``--config={"model": {…: null}}``.

    jsonargparse (4.53) forwards a key two subclasses deep to the inner parser as the text
    ``--teacher_max_gap=None`` (``str`` of the already parsed value), which no ``float | None``
    accepts; the same setting given as a config string keeps its YAML null.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
            value = args[i + 1]
        parts = key[2:].split(".") if key.startswith("--") else []
        depth = len([p for p in parts if p != "init_args"])
        if parts and parts[0] in ("model", "data") and depth >= 3 and value.strip() in _NULLS:
            tree: Any = None
            for part in reversed(parts):
                tree = {part: tree}
            out.append("--config=" + json.dumps(tree))
            i += 1 if eq else 2
            continue
        out.append(arg)
        i += 1
    return out


_LOSS_KEYS = ("--model.loss", "--model.init_args.loss")


def _named_losses(args: list[str]) -> list[str]:
    """``--model.loss=meanflow`` (a preset) or ``--model.loss=EulerianLoss`` (a class) →
    ``--model.loss=<its complete config>``: the loss named starts from the preset or the class's
    defaults, so no setting of the recipe's loss carries over unseen; options given after it
    (``--model.loss.init_args.…``) change it as usual. A JSON or YAML mapping, or null (the
    default loss), is left as given."""
    from flowmap.presets import loss_config

    out: list[str] = []
    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        step = 1
        if key in _LOSS_KEYS and not eq and i + 1 < len(args):
            value, step = args[i + 1], 2
        named = value.strip() and value.strip() not in _NULLS
        if key in _LOSS_KEYS and named and not value.lstrip().startswith(("{", "class_path")):
            out.append(f"{key}={json.dumps(loss_config(value.strip()))}")
            i += step
            continue
        out.append(args[i])
        i += 1
    return out


def _has_progress_bar(callbacks: Any) -> bool:
    if callbacks is None:
        return False
    items = callbacks if isinstance(callbacks, Iterable) else [callbacks]
    return any(isinstance(c, ProgressBar) for c in items)


class FlowmapCLI(LightningCLI):
    """LightningCLI over every :class:`FlowModuleBase` and :class:`FlowDataModule`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate`` only: flowmap's modules have no ``test_step`` or
        ``predict_step`` (``flowmap sample`` and ``flowmap report`` do their jobs)."""
        base = LightningCLI.subcommands()
        return {k: base[k] for k in TRAINER_COMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--logger",
            type=str,
            default="csv",
            help=f"Logger when trainer.logger is left unset: one of {LOGGERS}.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse (without LightningCLI's warning about ``args`` given from Python beside a
        ``sys.argv``: the recipe pipelines do that on purpose), then check what needs no model:
        the accelerator and the output directory."""
        if isinstance(args, dict):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)
        cfg = (
            self.config[self.config["subcommand"]] if self.config.get("subcommand") else self.config
        )
        trainer = cfg.get("trainer") or {}
        _check_accelerator(trainer.get("accelerator"))
        root = trainer.get("default_root_dir")
        check_writable_dir(root or os.getcwd(), "--trainer.default_root_dir")
        # as given: LightningCLI then replaces the model config by a --ckpt_path file's own
        self._given = {key: _as_hparams(cfg.get(key)) for key in ("model", "data")}

    def before_fit(self) -> None:
        """Before the fit writes anything: refuse a fresh fit into a directory with checkpoints
        and a resume under another model config or dataset (:func:`check_fit_directory`); then
        choose torch's threads for the machine's load (:func:`~flowmap.training.threads.set_threads`)."""
        cfg = self.config[self.subcommand]
        ckpt = self.trainer.checkpoint_callback
        check_fit_directory(
            getattr(ckpt, "dirpath", None),
            cfg.get("ckpt_path"),
            self._given["model"],
            self._given["data"],
            writes_checkpoints=not self.trainer.fast_dev_run,
        )
        set_threads()

    def before_validate(self) -> None:
        set_threads()

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but a bad argument surfaces as the model's or data's own one-sentence
        error instead of jsonargparse's union-type report wrapped around it; a
        ``DiffusionStudent`` net given without its teacher gets the model's teacher's architecture
        first (as ``FlowMapModule`` fills it in from Python)."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        args = getattr(cfg.get("model"), "init_args", None)
        if args is not None and args.get("net") is not None:
            arch = missing_student_teacher(args.net, args.get("teacher"))
            if arch is not None:
                args.net.init_args.teacher = arch
        try:
            super().instantiate_classes()
        except Exception as err:
            root = user_error(err)
            if root is None or root is err:
                raise
            raise root from None

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        kind = cfg.get("logger", "csv")
        given_root = cfg["trainer"].get("default_root_dir")
        root = given_root or os.getcwd()
        if kwargs.get("logger") in (None, True):
            kwargs["logger"] = make_logger(kind, root)
        callbacks = cfg["trainer"].get("callbacks")
        if cfg["trainer"].get("enable_progress_bar") is not False and not _has_progress_bar(
            callbacks
        ):
            listed = (
                []
                if callbacks is None
                else list(callbacks)
                if isinstance(callbacks, list)
                else [callbacks]
            )
            stage = Path(given_root).name if given_root else None
            kwargs["callbacks"] = [*listed, *kwargs.get("callbacks", []), FlowmapProgressBar(stage)]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:  # Lightning's word for a bad trainer option
            raise ValueError(f"Bad trainer option: {err}") from None
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint):
            if ckpt.dirpath is None:  # one place per run root, so `--ckpt_path last` finds it
                ckpt.dirpath = os.path.join(root, "checkpoints")
            trainer.callbacks.append(InterruptCheckpoint(ckpt))
        trainer.callbacks.append(ThreadsForLoad())
        return trainer


def _as_hparams(section: Any) -> dict[str, Any]:
    """A parsed ``model``/``data`` section (``class_path`` + ``init_args``) in the form a
    checkpoint keeps its hyperparameters: ``{"_class_path": …, **init_args}``, plain data."""
    if section is None:
        return {}
    d = section.as_dict() if hasattr(section, "as_dict") else dict(section)
    if "class_path" in d:
        return {"_class_path": d["class_path"], **(d.get("init_args") or {})}
    return d


def _check_accelerator(accelerator: Any) -> None:
    """A GPU accelerator on a machine without one is a one-sentence error before any work."""
    if not isinstance(accelerator, str):
        return
    import torch

    name = accelerator.lower()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    missing = (name == "gpu" and not (cuda or mps)) or (name == "cuda" and not cuda)
    if missing:
        raise ValueError(
            f"--trainer.accelerator={accelerator} asks for a GPU, but no GPU is available on this "
            "machine; use --trainer.accelerator=cpu (or auto)."
        )
    if name == "mps" and not mps:
        raise ValueError(
            "--trainer.accelerator=mps asks for an Apple GPU, but MPS is not available here; use "
            "--trainer.accelerator=cpu (or auto)."
        )


def cli_main(args: list[str] | None = None, run: bool = True) -> FlowmapCLI:
    """Build (and by default run) the Lightning CLI; ``args`` as on the command line."""
    quiet_console()
    argv = list(sys.argv[1:] if args is None else args)
    command = next((a for a in argv if a in TRAINER_COMMANDS), "") if run else ""
    token = _COMMAND.set(command)
    try:
        return FlowmapCLI(
            FlowModuleBase,
            FlowDataModule,
            parser_class=FlowmapArgumentParser,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={
                "description": "flowmap: Lightning CLI subcommands below, plus "
                "`flowmap sample --help` and `flowmap report --help`."
            },
            save_config_callback=ConfigBesideCheckpoints,
            save_config_kwargs={"overwrite": True},
            args=_nested_nulls_as_config(_named_losses(argv)),
            run=run,
            auto_configure_optimizers=False,
        )
    finally:
        _COMMAND.reset(token)


# --------------------------------------------------------------------------- entry point
def _dispatch(args: list[str]) -> None:
    from flowmap.apps.help import command_help, overview

    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(overview())
        if not args:
            raise SystemExit(2)
        return
    command, rest = args[0], args[1:]
    if command in ("-V", "--version"):
        from flowmap import __version__

        print(f"flowmap {__version__}")
        return
    if command == "report":
        from flowmap.apps.report import main as report_main

        report_main(rest)
    elif command == "sample":
        from flowmap.apps.sample import main as sample_main

        sample_main(rest)
    elif command in TRAINER_COMMANDS:
        if any(a in ("-h", "--help") for a in rest):
            sys.stdout.write(command_help(command))
            return
        if "--help-all" in rest:
            rest = ["--help" if a == "--help-all" else a for a in rest]
        cli_main([command, *rest])
    elif command in ("test", "predict"):
        fail(
            f"`flowmap {command}` is not a flowmap command: its modules have no {command} step; "
            "measure a checkpoint with `flowmap validate` or `flowmap report`, and draw samples "
            "with `flowmap sample`"
        )
    else:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        fail(
            f"unknown command {command!r}; {hint}the commands are {', '.join(COMMANDS)} (see `flowmap --help`)"
        )


def run_command(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as a command: a mistake the user can fix (:data:`USER_ERRORS`) ends in one line
    through :func:`fail`, with no traceback; anything else is a bug and keeps its traceback. The
    ``flowmap`` command and the recipe scripts (``python recipes/<data>/pipeline.py``) use it."""
    try:
        return fn()
    except USER_ERRORS as err:
        fail(str(err))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flowmap`` console script: every command goes through one handler."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_console()
    run_command(lambda: _dispatch(args))
    return None  # the console script exits with main()'s value


if __name__ == "__main__":
    main()
