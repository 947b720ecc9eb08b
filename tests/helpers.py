"""Test helpers shared by several test files."""

from pathlib import Path

import pytest
import torch

from flowmap.apps.cli import main
from flowmap.apps.lightning_cli import cli_main
from flowmap.losses import FlowMapLoss, mean_square
from flowmap.oracles import GaussianTarget


class ExactPhi(torch.nn.Module):
    r"""The exact :math:`\phi(x,s,t) = (X(s,t,x) - x)/(t-s)` of a Gaussian target (``b_t`` on the diagonal)."""

    def __init__(self, target: GaussianTarget, perturb: float = 0.0) -> None:
        super().__init__()
        self.target, self.perturb = target, perturb

    def forward(self, x, s, t):
        gap = (t - s)[:, None]
        safe = torch.where(gap.abs() > 1e-12, gap, torch.ones_like(gap))
        chord = (self.target.flow_map(x, s, t) - x) / safe
        phi = torch.where(gap.abs() > 1e-12, chord, self.target.velocity(x, t))
        # a smooth perturbation in x, s and t, so that no residual vanishes by accident
        return phi + self.perturb * torch.sin(x + s[:, None] + 2 * t[:, None])


class EulerChordLoss(FlowMapLoss):
    r"""A loss written outside the package, to show that a new loss is one class:
    :math:`\|\phi(x_s, s, t) - b_s(x_s)\|^2` (the chord slope regressed on one Euler step)."""

    name = "euler_chord"

    def off_diagonal(self, flow_map, teacher, x_s, s, t, step):  # no dx_s: it may be left out
        return mean_square(flow_map.phi(x_s, s, t) - teacher(x_s, s).detach())


TINY_NET = [
    "--model.net=flowmap.nets.MLP",
    "--model.net.data_shape=[2]",
    "--model.net.width=64",
    "--model.net.depth=1",
]

#: a short, quiet fit (no progress bar, no logger, small batches); with :data:`TINY_NET`
TINY = ["--trainer.enable_progress_bar=false", "--data.batch_size=32", "--logger=none"]

#: a toy recipe's own net made tiny through its ``init_args`` (a 16-wide MLP), small batches
TINY_CLI = [
    "--model.net.init_args.width=16",
    "--model.net.init_args.depth=1",
    "--data.init_args.batch_size=32",
    "--trainer.enable_progress_bar=false",
]


def fit_cli(cfg: str, root: Path, *extra: str) -> Path:
    """``flowmap fit --config cfg`` with a tiny MLP into ``root``; returns ``last.ckpt``."""

    cli_main(
        [
            "fit",
            "--config",
            cfg,
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            *TINY_NET,
            *extra,
        ]
    )
    return next(Path(root).rglob("last.ckpt"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def fails(capsys, *argv: str) -> str:
    """Run the ``flowmap`` command, expect a non-zero exit, return its one error sentence."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code not in (0, None)
    line = one_error_line(capsys)
    assert line.startswith("flowmap: error:")
    return line


def one_line_error(capsys, args, match):
    """``flowmap ARGS`` fails with exit status 2 and one line ``flowmap: error: …match…``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("flowmap: error: "), err
    assert match in err, err
    return err
