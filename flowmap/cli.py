"""The ``flowmap`` command: LightningCLI subcommands plus ``sample`` and ``report``.

* ``flowmap fit|validate|test|predict --config recipes/.../x.yaml [--trainer.max_steps=…]``
* ``flowmap sample --ckpt C.ckpt --nfe 4 --n 1000 --out samples.pt``
* ``flowmap report --teacher T.ckpt --flowmap lagrangian=L.ckpt … --out DIR`` (FID/W2 vs steps)

Fits write checkpoints (``last.ckpt`` included, so ``--ckpt_path last`` resumes) and their
``config.yaml`` under the logger's directory. ``--logger csv`` (default) or ``--logger wandb``
(offline when no W&B account is configured) or ``--logger none``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from flowmap.callbacks import ConfigBesideCheckpoints, InterruptCheckpoint
from flowmap.checkpoints import CheckpointError
from flowmap.data.base import FlowDataModule
from flowmap.modules.base import FlowModuleBase, NonFiniteLossError

__all__ = ["FlowmapCLI", "main", "make_logger"]

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
        from lightning.pytorch.loggers import WandbLogger

        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not _wandb_has_account()
        return WandbLogger(save_dir=save_dir, project=name, offline=offline)
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=save_dir, name=name)


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
            root = err
            while (root.__cause__ or root.__context__) is not None:
                root = root.__cause__ or root.__context__
            if root is err:
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
    if args and args[0] == "report":
        from flowmap.report import main as report_main

        report_main(args[1:])  # the console script exits with main()'s value: return None
        return None
    if args and args[0] == "sample":
        from flowmap.sample import main as sample_main

        sample_main(args[1:])
        return None
    try:
        cli_main(argv)
    except USER_ERRORS as err:  # one sentence, no traceback, for what the user can fix
        print(f"flowmap: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
