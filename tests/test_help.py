"""The help (flowmap.apps.help): every command listed, fit's help led by flowmap's own components
and short, Lightning's in full on request, every sample and report argument described with its
default, no design document cited."""

import argparse
import re

import pytest

import flowmap.apps.report as report
import flowmap.apps.sample as sample
from flowmap.apps.cli import main
from flowmap.apps.help import command_help
from flowmap.apps.lightning_cli import FlowmapCLI
from tests.helpers import one_line_error


def test_help_lists_every_command_and_test_is_not_one(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "sample", "report"):
        assert f"\n  {command} " in out
    assert "predict" not in out and "\n  test" not in out
    assert set(FlowmapCLI.subcommands()) == {"fit", "validate"}
    one_line_error(
        capsys, ["test", "--config", "x.yaml"], "`flowmap test` is not a flowmap command"
    )
    one_line_error(capsys, ["fitt"], "unknown command 'fitt'; did you mean 'fit'?")


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_fit_help_leads_with_flowmap_components_and_is_short(capsys, command):
    main([command, "--help"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) < 200  # flowmap's own options only (Lightning's: --help-all)
    assert lines[0].startswith(f"usage: flowmap {command} --config RECIPE.yaml")
    for name in (
        "flowmap.training.VelocityModule",
        "flowmap.training.FlowMapModule",
        "flowmap.nets.MLP",
        "flowmap.nets.UNet",
        "flowmap.nets.DiT",
        "flowmap.losses.LagrangianLoss",
        "flowmap.losses.EulerianLoss",
        "flowmap.losses.SemigroupLoss",
        "flowmap.data.Toy2DDataModule",
        "flowmap.data.DigitsDataModule",
    ):
        assert name in out
    # options with their docstring descriptions and defaults
    flat = " ".join(out.split())  # an option's description may wrap onto more lines
    assert "--model.net.width hidden width [DiT: null, MLP: 256]" in flat
    assert re.search(r"--model\.loss\.teacher_max_gap [^\[]* \[Eulerian: 0\.125\]", flat)
    assert "--model.ema_decay EMA of the net" in flat
    assert f"flowmap {command} --help-all" in out and "--model.help" in out
    assert "DESIGN" not in out and ":math:" not in out and "``" not in out
    assert "…" not in out  # descriptions wrap, never cut


def test_help_all_prints_lightnings_full_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help-all"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.max_steps" in out and "--trainer.accelerator" in out
    assert len(out.splitlines()) > 200


@pytest.mark.parametrize("module", [sample, report])
def test_every_sample_and_report_argument_is_described_with_its_default(module):
    parser = module.parser()
    text = parser.format_help()
    assert "DESIGN" not in text and "``" not in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, action.dest
        shown = parser._get_formatter()._get_help_string(action)
        if action.nargs != 0:  # flags have no default to show
            assert "(default: " in shown or "(required)" in shown, action.dest


def test_no_help_text_cites_a_design_document(capsys):
    main(["--help"])
    for command in ("fit", "validate"):
        assert "DESIGN" not in command_help(command)
    assert "DESIGN" not in capsys.readouterr().out
