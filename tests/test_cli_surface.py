"""The command line as a new user meets it: one-sentence errors on every command, help that
describes flowmap's own options, honest output names, a quiet console with a labelled progress bar."""

import argparse
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import flowmap.apps.report as report
import flowmap.apps.sample as sample
from flowmap.apps.cli import main
from flowmap.apps.help import command_help
from flowmap.apps.kit import quiet_console
from flowmap.apps.lightning_cli import FlowmapCLI, _nested_nulls_as_config, cli_main
from flowmap.training.progress import FlowmapProgressBar, stage_label

TINY = [
    "--model.net.init_args.width=16",
    "--model.net.init_args.depth=1",
    "--data.init_args.batch_size=32",
    "--trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A 2-step toy teacher fitted through the CLI: its ``last.ckpt``."""
    root = tmp_path_factory.mktemp("cli-teacher")
    cli_main(
        [
            "fit",
            "--config",
            "recipes/toy2d/teacher.yaml",
            *TINY,
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
        ]
    )
    return next(root.rglob("last.ckpt"))


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


# --------------------------------------------------------------------------- errors
@pytest.fixture
def bad_files(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello\n")  # torch.load raises a bare KeyError on this
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    lightning = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}}, lightning)  # a Lightning checkpoint, not a flowmap one
    return {"text": text, "foreign": foreign, "lightning": lightning, "dir": tmp_path}


@pytest.mark.parametrize(
    "command,kind,match",
    [
        ("sample", "missing", "does not exist"),
        ("sample", "text", "is not a torch file"),
        ("sample", "foreign", "is not a Lightning checkpoint"),
        ("sample", "lightning", "not a flowmap one"),
        ("report", "missing", "does not exist"),
        ("report", "text", "is not a torch file"),
        ("report", "foreign", "is not a Lightning checkpoint"),
        ("report", "lightning", "is not a flowmap checkpoint"),
    ],
)
def test_a_bad_checkpoint_is_one_sentence_on_sample_and_report(
    capsys, bad_files, command, kind, match
):
    ckpt = bad_files["dir"] / "missing.ckpt" if kind == "missing" else bad_files[kind]
    out = bad_files["dir"] / ("s.npz" if command == "sample" else "report")
    flag = "--ckpt" if command == "sample" else "--teacher"
    one_line_error(capsys, [command, flag, str(ckpt), "--out", str(out)], match)
    assert not out.exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["sample", "--nfe", "0"], "argument --nfe: must be at least 1, got 0"),
        (["sample", "--n", "x"], "argument --n: expected a whole number, got 'x'"),
        (["report", "--solvers", "euler", "leapfrog"], "argument --solvers: invalid choice"),
        (["sample", "--out", "s.pt"], "must end in .npz"),
        (["sample", "--out", "s.npz", "--invert"], "--invert needs --data-npz"),
    ],
)
def test_a_bad_sample_or_report_argument_is_one_sentence(capsys, bad_files, args, match):
    ckpt = str(bad_files["lightning"])
    args = [*args, "--ckpt" if args[0] == "sample" else "--teacher", ckpt]
    if "--out" not in args:
        args += ["--out", str(bad_files["dir"] / ("s.npz" if args[0] == "sample" else "r"))]
    one_line_error(capsys, args, match)


def test_a_missing_required_argument_is_one_sentence(capsys):
    one_line_error(capsys, ["sample", "--out", "s.npz"], "required: --ckpt")
    one_line_error(capsys, ["report", "--teacher", "t.ckpt"], "required: --out")


def test_a_bad_nfe_is_one_sentence(capsys, tiny_teacher, tmp_path):
    one_line_error(
        capsys,
        ["sample", "--ckpt", str(tiny_teacher), "--nfe", "3", "--method", "heun"]
        + ["--out", str(tmp_path / "s.npz")],
        "heun uses 2 NFE per step",
    )
    one_line_error(
        capsys,
        ["report", "--teacher", str(tiny_teacher), "--nfe", "3", "--solvers", "heun"]
        + ["--out", str(tmp_path / "r")],
        "heun uses 2 NFE per step and cannot take NFE 3",
    )
    one_line_error(
        capsys,
        ["report", "--teacher", str(tiny_teacher), "--nfe", "1", "0", "--out", str(tmp_path / "r")],
        "NFE must be at least 1, got 0",
    )
    assert not list(tmp_path.iterdir())


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    def broken(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sample, "main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sample", "--ckpt", "x.ckpt", "--out", "x.npz"])


@pytest.mark.parametrize(
    "arg,match",
    [
        (
            "--model.lossx=foo",
            "option 'lossx' is not accepted; did you mean 'loss'? It is an option of "
            "FlowMapModule, not of VelocityModule",
        ),
        (
            "--trainer.max_stepz=3",
            "unrecognized option --trainer.max_stepz; did you mean --trainer.max_steps?",
        ),
        (
            "--data.init_args.nam=moons",
            "data (flowmap.data.Toy2DDataModule): option 'nam' is not accepted; did you mean "
            "'name'?",
        ),
        ("--modl.lr=1", "unrecognized option --modl.lr; did you mean --model.lr?"),
    ],
)
def test_a_misspelt_key_names_the_closest_valid_key(capsys, tmp_path, arg, match):
    one_line_error(
        capsys,
        ["fit", "--config", "recipes/toy2d/teacher.yaml", f"--trainer.default_root_dir={tmp_path}"]
        + [arg],
        match,
    )


def test_a_yaml_syntax_error_names_the_file_and_the_line(capsys, tmp_path):
    bad = tmp_path / "teacher.yaml"
    text = Path("recipes/toy2d/teacher.yaml").read_text()
    bad.write_text(text.replace("max_steps: 3000", "max_steps: [3000"))
    line = 1 + text.splitlines().index("  max_steps: 3000")  # the line to fix, not the next
    err = one_line_error(capsys, ["fit", "--config", str(bad)], f"{bad}: YAML syntax error at line")
    assert f"line {line}, column 14 (noticed at line {line + 1})" in err
    assert "did not find expected ',' or ']'" in err
    bad.write_text(text.replace("max_steps: 3000", "max_steps 3000"))  # a missing colon
    err = one_line_error(capsys, ["fit", "--config", str(bad)], f"{bad}: YAML syntax error at line")
    assert f"at line {line}, column 3" in err and "could not find expected ':'" in err


def test_fit_without_a_recipe_says_what_it_needs(capsys):
    one_line_error(capsys, ["fit"], "`flowmap fit` needs a recipe: --config")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_a_gpu_accelerator_without_a_gpu_is_one_sentence(capsys, tmp_path, accelerator):
    one_line_error(
        capsys,
        ["fit", "--config", "recipes/toy2d/teacher.yaml", f"--trainer.default_root_dir={tmp_path}"]
        + [f"--trainer.accelerator={accelerator}"],
        "no GPU is available on this machine; use --trainer.accelerator=cpu (or auto)",
    )


def _unwritable_places(tmp_path):
    """``{what: (path, reason)}``: places no output can be written to."""
    tmp_path.mkdir(exist_ok=True)
    afile = tmp_path / "afile"
    afile.write_text("x")
    places = {
        "an existing file": (afile, "is an existing file"),
        "under a file": (afile / "sub", "cannot be created"),
    }
    if os.path.isdir("/proc"):
        places["a read-only file system"] = (Path("/proc/flowmap-out"), "is not writable")
    if os.geteuid() != 0:  # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        places["a read-only directory"] = (ro / "out", "is not writable")
    return places


def test_an_unwritable_output_is_refused_up_front(capsys, tmp_path, bad_files):
    ckpt = str(bad_files["lightning"])
    for where, (path, reason) in _unwritable_places(tmp_path).items():
        if where != "an existing file":  # x.npz beside a file x is fine
            err = one_line_error(capsys, ["sample", "--ckpt", ckpt, "--out", f"{path}.npz"], reason)
            assert f"--out '{path}.npz'" in err
        err = one_line_error(capsys, ["report", "--teacher", ckpt, "--out", str(path)], reason)
        assert f"--out '{path}'" in err
    for path, reason in _unwritable_places(tmp_path / "fit").values():
        recipe = ["fit", "--config", "recipes/toy2d/teacher.yaml"]
        err = one_line_error(capsys, [*recipe, f"--trainer.default_root_dir={path}"], reason)
        assert f"--trainer.default_root_dir '{path}'" in err


def test_a_directory_as_the_sample_out_is_refused(capsys, tmp_path, bad_files):
    (tmp_path / "d.npz").mkdir()
    one_line_error(
        capsys,
        ["sample", "--ckpt", str(bad_files["lightning"]), "--out", str(tmp_path / "d.npz")],
        "is a directory; give a file name",
    )


def test_a_nested_loss_argument_can_be_set_to_null_on_the_command_line(tmp_path):
    assert _nested_nulls_as_config(
        ["--model.loss.init_args.teacher_max_gap=null", "--model.lr=null", "--x", "1"]
    ) == [
        '--config={"model": {"loss": {"init_args": {"teacher_max_gap": null}}}}',
        "--model.lr=null",
        "--x",
        "1",
    ]
    assert _nested_nulls_as_config(["--model.loss.teacher_max_gap", "~"]) == [
        '--config={"model": {"loss": {"teacher_max_gap": null}}}'
    ]
    for arg in (
        ["--model.loss.init_args.teacher_max_gap=null"],
        ["--model.loss.teacher_max_gap", "null"],
    ):
        cli = cli_main(
            [
                "--config",
                "recipes/toy2d/eulerian.yaml",
                *TINY,
                "--model.teacher=null",  # self-distillation: no teacher file needed
                "--model.warm_start=false",
                f"--trainer.default_root_dir={tmp_path}",
                "--model.loss.init_args.teacher_max_gap=0.2",  # overridden by the null after it
                *arg,
            ],
            run=False,
        )
        assert cli.model.loss.teacher_max_gap is None


# --------------------------------------------------------------------------- help
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
        "flowmap.losses.LagrangianLoss",
        "flowmap.losses.EulerianLoss",
        "flowmap.losses.SemigroupLoss",
        "flowmap.data.Toy2DDataModule",
        "flowmap.data.DigitsDataModule",
    ):
        assert name in out
    # options with their docstring descriptions and defaults
    flat = " ".join(out.split())  # an option's description may wrap onto more lines
    assert "--model.net.width hidden width [MLP: 256]" in flat
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


# --------------------------------------------------------------------------- sample's output
def test_sample_output_names_follow_one_rule():
    assert sample.output_paths(Path("a/x.npz")) == (Path("a/x.npz"), Path("a/x.png"))
    assert sample.output_paths(Path("a/x.png")) == (Path("a/x.npz"), Path("a/x.png"))
    assert sample.output_paths(Path("x.JPG")) == (Path("x.npz"), Path("x.JPG"))
    with pytest.raises(ValueError, match="must end in .npz"):
        sample.output_paths(Path("x.pt"))


@pytest.mark.parametrize("out", ["pics/x.png", "x.npz"])
def test_sample_writes_and_prints_the_real_paths(capsys, tiny_teacher, tmp_path, out):
    main(["sample", "--ckpt", str(tiny_teacher), "--n", "16", "--out", str(tmp_path / out)])
    npz, picture = sample.output_paths(tmp_path / out)
    assert npz.is_file() and picture.is_file()
    assert sorted(p.name for p in npz.parent.iterdir()) == sorted({npz.name, picture.name})
    printed = capsys.readouterr().out
    assert printed.startswith(f"{npz}: 16 samples, NFE 1; picture {picture}")


# --------------------------------------------------------------------------- the console
class _Trainer:
    def __init__(self, max_steps=-1, max_epochs=None, batches=10.0, accumulate=1):
        self.max_steps, self.max_epochs = max_steps, max_epochs
        self.num_training_batches, self.accumulate_grad_batches = batches, accumulate


def test_the_progress_bar_names_the_stage_and_counts_steps():
    from flowmap.losses import EulerianLoss
    from flowmap.nets import MLP
    from flowmap.training import FlowMapModule, VelocityModule

    teacher = VelocityModule(MLP((2,), width=8, depth=1))
    student = FlowMapModule(MLP((2,), width=8, depth=1), loss=EulerianLoss(), warm_start=False)
    assert stage_label(teacher, "teacher") == "teacher"
    assert stage_label(student) == "FlowMapModule/eulerian"
    bar = FlowmapProgressBar("teacher")
    assert bar.total_steps(_Trainer(max_steps=3000)) == 3000
    assert bar.total_steps(_Trainer(max_epochs=3, batches=10, accumulate=2)) == 15
    assert bar.total_steps(_Trainer(max_epochs=-1, batches=float("inf"))) is None


@pytest.mark.parametrize(
    "extra,expected",
    [
        ([], FlowmapProgressBar),
        (["--trainer.enable_progress_bar=false"], None),
        (["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], "TQDMProgressBar"),
    ],
)
def test_fit_uses_the_flowmap_progress_bar_unless_told_otherwise(tmp_path, extra, expected):
    args = [a for a in TINY if "enable_progress_bar" not in a]
    cli = cli_main(
        ["--config", "recipes/toy2d/teacher.yaml", *args, *extra]
        + [f"--trainer.default_root_dir={tmp_path / 'teacher'}"],
        run=False,
    )
    bar = cli.trainer.progress_bar_callback
    if expected is None:
        assert bar is None
    elif expected is FlowmapProgressBar:
        assert isinstance(bar, FlowmapProgressBar) and bar.stage == "teacher"
    else:
        assert type(bar).__name__ == expected


def test_quiet_console_drops_only_the_known_harmless_lines():
    quiet_console()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def shown(message):
        record = log.makeRecord(log.name, logging.INFO, __file__, 1, message, (), None)
        return all(f.filter(record) for f in log.filters)

    assert not shown("GPU available: False, used: False")
    assert not shown("`Trainer(limit_val_batches=1)` was configured so 1 batch will be used.")
    assert not shown("💡 Tip: For seamless cloud logging, try installing [litlogger](…)")
    assert shown("GPU available: True (cuda), used: False")
    assert shown("`Trainer.fit` stopped: `max_steps=3` reached.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()
        warnings.warn(
            "`torch.jit.script` is deprecated. Please switch", FutureWarning, stacklevel=1
        )
        warnings.warn(
            "The 'train_dataloader' does not have many workers", UserWarning, stacklevel=1
        )
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another deprecation"]


def test_a_tiny_fit_prints_no_known_noise(tmp_path):
    """The console of a real ``flowmap fit`` process (warnings and logging as a user sees them)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("PYTHONWARNINGS", None)
    args = ["fit", "--config", "recipes/toy2d/teacher.yaml", *TINY[:3]]
    args += ["--trainer.max_steps=3", "--trainer.val_check_interval=2"]
    args += [f"--trainer.default_root_dir={tmp_path / 'teacher'}"]
    code = (  # called from a script with its own arguments, as the recipe pipelines do
        "import sys; sys.argv = ['pipeline.py', '--out', 'x']; "
        f"from flowmap.apps.lightning_cli import cli_main; cli_main({args!r})"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=600
    )
    assert run.returncode == 0, run.stderr
    console = run.stdout + run.stderr
    for noise in (
        "args parameter",
        "litlogger",
        "GPU available",
        "TPU available",
        "LeafSpec",
        "torch.jit.script",
        "does not have many workers",
        "limit_val_batches=1",
        "Epoch 0/-2",
    ):
        assert noise not in console, noise
    assert "teacher" in console and "3/3" in console
    assert "loss:" in console and "v_num" not in console and "val/loss" not in console
