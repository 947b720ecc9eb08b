"""``flowmap fit`` and ``flowmap validate``: LightningCLI over every :class:`FlowModuleBase` and
:class:`FlowDataModule`, its errors as one sentence (:mod:`flowmap.apps.translate`).

* ``flowmap fit --config recipes/toy2d/teacher.yaml [--trainer.max_steps=…]``
* ``flowmap validate --config recipes/toy2d/teacher.yaml --ckpt_path C.ckpt``

Fits write checkpoints (``last.ckpt`` included, so ``--ckpt_path last`` resumes) and their
``config.yaml`` under the logger's directory. ``--logger csv`` (default) or ``--logger wandb``
(offline when no W&B account is configured) or ``--logger none``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from flowmap.apps.kit import TRAINER_COMMANDS, check_writable_dir, fail, quiet_console, user_error
from flowmap.apps.translate import CURRENT_COMMAND, one_sentence, unrecognized, yaml_sentence
from flowmap.data.base import FlowDataModule
from flowmap.training import ConfigBesideCheckpoints, FlowModuleBase, InterruptCheckpoint
from flowmap.training.checkpoints import check_fit_directory
from flowmap.training.progress import FlowmapProgressBar
from flowmap.training.teachers import missing_student_teacher
from flowmap.training.threads import ThreadsForLoad, set_threads

__all__ = ["FlowmapCLI", "cli_main", "make_logger"]

LOGGERS = ("csv", "wandb", "none")


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


class FlowmapArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, printing a bad argument as one sentence instead of a usage dump."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        command = CURRENT_COMMAND.get()
        see = f"flowmap {command} --help" if command else "flowmap --help"
        fail(f"{unrecognized(message, self) or one_sentence(message)} (see `{see}`)")

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
                f"{full if os.path.exists(full) else path}: {yaml_sentence(text)}"
            ) from err


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
    token = CURRENT_COMMAND.set(command)
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
        CURRENT_COMMAND.reset(token)
