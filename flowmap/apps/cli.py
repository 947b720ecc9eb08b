"""The ``flowmap`` command: LightningCLI subcommands plus ``sample`` and ``report``.

* ``flowmap fit|validate|test|predict --config recipes/.../x.yaml [--trainer.max_steps=…]``
* ``flowmap sample --ckpt C.ckpt --nfe 4 --n 1000 --out samples.pt``
* ``flowmap report --teacher T.ckpt --flowmap lagrangian=L.ckpt … --out DIR`` (FID/W2 vs steps)

Fits write checkpoints (``last.ckpt`` included, so ``--ckpt_path last`` resumes) and their
``config.yaml`` under the logger's directory. ``--logger csv`` (default) or ``--logger wandb``
(offline when no W&B account is configured) or ``--logger none``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from typing import Any, NoReturn

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from flowmap.apps.report import main as report_main
from flowmap.apps.sample import main as sample_main
from flowmap.data.base import FlowDataModule
from flowmap.training import (
    CheckpointError,
    ConfigBesideCheckpoints,
    FlowModuleBase,
    InterruptCheckpoint,
    NonFiniteLossError,
)

__all__ = ["FlowmapCLI", "cli_main", "main", "make_logger", "one_sentence"]

LOGGERS = ("csv", "wandb", "none")
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError)


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


def user_error(err: BaseException) -> BaseException | None:
    """The innermost user error (:data:`USER_ERRORS`) in ``err``'s chain of causes, following a
    context only where it was not suppressed (``raise ... from None``)."""
    found, node = None, err
    while node is not None:
        if isinstance(node, USER_ERRORS):
            found = node
        node = node.__cause__ or (None if node.__suppress_context__ else node.__context__)
    return found


def _suggestion(class_path: str | None, option: str) -> str:
    """ "; did you mean 'x'? It takes a, b, c" for an option a class does not take."""
    if not class_path:
        return ""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        names = [
            p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")
        ]
    except (ImportError, AttributeError, ValueError, TypeError):
        return ""
    close = difflib.get_close_matches(option, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return f"{hint} {name} takes {', '.join(names)}"


def one_sentence(message: str) -> str:
    """Boil a (nested, multi-line) jsonargparse error down to the innermost problem, in one line:
    which key, which class, what is wrong, and the close option name when one was misspelt."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
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
        where = f"{key} ({class_path})" if key else class_path
    else:
        text, where = " ".join(lines[:2]), None
    option = re.search(r"(?:Option|Key) '([^']+)' is not accepted", text)
    if option:
        text = (
            f"option {option.group(1)!r} is not accepted{_suggestion(class_path, option.group(1))}"
        )
    text = re.sub(r'Parser key "([^"]+)"', r"\1:", text)
    return f"{where}: {text}" if where else text


class FlowmapArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, printing a bad argument as one sentence instead of a usage dump."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"flowmap: error: {one_sentence(message)} (see --help)\n")
        self.exit(2)


class FlowmapCLI(LightningCLI):
    """LightningCLI over every :class:`FlowModuleBase` and :class:`FlowDataModule`."""

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

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but a bad argument surfaces as the model's or data's own one-sentence
        error instead of jsonargparse's union-type report wrapped around it."""
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
        root = cfg["trainer"].get("default_root_dir") or os.getcwd()
        if kwargs.get("logger") in (None, True):
            kwargs["logger"] = make_logger(kind, root)
        trainer = super().instantiate_trainer(**kwargs)
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint):
            if ckpt.dirpath is None:  # one place per run root, so `--ckpt_path last` finds it
                ckpt.dirpath = os.path.join(root, "checkpoints")
            trainer.callbacks.append(InterruptCheckpoint(ckpt))
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True) -> FlowmapCLI:
    """Build (and by default run) the Lightning CLI; ``args`` as on the command line."""
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
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flowmap`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "report":
            report_main(args[1:])
        elif args and args[0] == "sample":
            sample_main(args[1:])
        else:
            cli_main(argv)
    except USER_ERRORS as err:  # one sentence, no traceback, for what the user can fix
        print(f"flowmap: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return None  # the console script exits with main()'s value


if __name__ == "__main__":
    main()
