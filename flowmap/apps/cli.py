"""The ``flowmap`` command: ``fit`` and ``validate`` (:mod:`flowmap.apps.lightning_cli`) plus
``sample`` (:mod:`flowmap.apps.sample`), ``report`` (:mod:`flowmap.apps.report`), ``couple``
(:mod:`flowmap.apps.couple`) and ``steer`` (:mod:`flowmap.apps.steer`).

* ``flowmap fit --config recipes/toy2d/teacher.yaml [--trainer.max_steps=…]``
* ``flowmap sample --ckpt C.ckpt --nfe 4 --n 1000 --out samples.npz``
* ``flowmap report --teacher T.ckpt --flowmap lagrangian=L.ckpt … --out DIR`` (FID/W2 vs steps)
* ``flowmap couple --teacher T.ckpt --n 50000 --out couplings.safetensors`` (a reflow's data)
* ``flowmap steer --ckpt M.ckpt --reward class:3 --out steered.npz`` (steering by a reward)

Every command has one error path (:func:`flowmap.apps.kit.run_command`).
"""

from __future__ import annotations

import difflib
import sys

from flowmap.apps.help import command_help, overview
from flowmap.apps.kit import COMMANDS, TRAINER_COMMANDS, fail, quiet_console, run_command

__all__ = ["main"]


def _dispatch(args: list[str]) -> None:
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
    elif command == "couple":
        from flowmap.apps.couple import main as couple_main

        couple_main(rest)
    elif command == "steer":
        from flowmap.apps.steer import main as steer_main

        steer_main(rest)
    elif command in TRAINER_COMMANDS:
        if any(a in ("-h", "--help") for a in rest):
            sys.stdout.write(command_help(command))
            return
        if "--help-all" in rest:
            rest = ["--help" if a == "--help-all" else a for a in rest]
        from flowmap.apps.lightning_cli import cli_main  # Lightning's import, only when fitting

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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flowmap`` console script: every command goes through one handler."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_console()
    run_command(lambda: _dispatch(args))
    return None  # the console script exits with main()'s value


if __name__ == "__main__":
    main()
