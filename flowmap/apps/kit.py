"""The command kit every ``flowmap`` command shares: one error path (:func:`fail`), argparse with
defaults in ``--help``, checks of output paths before any work, and a quiet console.

A mistake the user can fix (a bad option, a missing or foreign checkpoint, an unwritable output)
is one line ``flowmap: error: <sentence>`` on stderr and exit status 2; any other exception is a
bug and keeps its traceback. This module imports nothing else from :mod:`flowmap.apps`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from flowmap.training import CheckpointError, NonFiniteLossError

__all__ = [
    "COMMANDS",
    "CommandParser",
    "TRAINER_COMMANDS",
    "USER_ERRORS",
    "check_writable_dir",
    "check_writable_file",
    "fail",
    "positive_int",
    "quiet_console",
    "run_command",
    "user_error",
]

USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError)
#: Every subcommand, with the line ``flowmap --help`` prints for it.
COMMANDS = {
    "fit": "train a teacher (VelocityModule) or a flow map (FlowMapModule) from a recipe",
    "validate": "run the validation loop (loss and sample quality) on a checkpoint",
    "sample": "draw samples from a teacher or flow-map checkpoint at a given NFE",
    "report": "FID (images) or W2 (2D data) against the number of sampling steps, with 95% intervals",
    "couple": "pair noise with a teacher's ODE endpoints: the training data of a reflow",
    "steer": "draw samples steered towards a reward: look-ahead guidance, best-of-N, inverse problems",
}
#: The subcommands LightningCLI runs (the modules have no test_step or predict_step).
TRAINER_COMMANDS = ("fit", "validate")


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


def run_command(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as a command: a mistake the user can fix (:data:`USER_ERRORS`) ends in one line
    through :func:`fail`, with no traceback; anything else is a bug and keeps its traceback. The
    ``flowmap`` command and the recipe scripts (``python recipes/<data>/pipeline.py``) use it."""
    try:
        return fn()
    except USER_ERRORS as err:
        fail(str(err))
