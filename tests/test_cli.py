"""The command line (flowmap.apps: the command kit, the dispatcher, the error translator and the
LightningCLI): one-sentence errors on every command, options checked early, the README's commands
parse as written, a named loss starts from its own defaults, offline W&B, a quiet console."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import flowmap.apps.sample as sample
from flowmap.apps.cli import main
from flowmap.apps.kit import quiet_console
from flowmap.apps.lightning_cli import cli_main
from tests.helpers import TINY_CLI, TINY_NET, fails, one_line_error

# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- fit's options


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


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model.lrr=1"], "lrr"),
        (["--data.name=swissroll"], "Unknown toy 2D dataset 'swissroll'"),
        (["--model.ema_decay=1.5"], "ema_decay must lie in"),
        (["--model.ema_decay=inf"], "ema_decay: expected a finite number or null, got 'inf'"),
        (["--model.lr=nan"], "lr: must be a finite number, got nan"),
        (["--model.lr=.nan"], "The learning rate must be a positive number, got nan"),
        (
            ["--model.time_distribution=beta"],
            "time_distribution: Expected a typing.Literal['uniform', 'logit_normal']. Got value: beta",
        ),
    ],
)
def test_bad_config_fails_early_with_a_clear_message(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                "recipes/toy2d/teacher.yaml",
                f"--trainer.default_root_dir={tmp_path}",
                *args,
            ]
        )
    err = capsys.readouterr().err
    assert match in err
    assert "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "arg,match",
    [
        (
            "--model.loss.formm=regression",
            "model.loss (flowmap.losses.LagrangianLoss): option 'formm' is not accepted; "
            "did you mean 'form'?",
        ),
        (
            "--model.loss.pairs.etaa=0.5",
            "model.loss.pairs (flowmap.losses.TimePairSampler): option 'etaa' is not accepted; "
            "did you mean 'eta'?",
        ),
        ("--model.loss.form=regresion", "Got value: regresion"),
        (
            "--model.loss=flowmap.losses.NoSuchLoss",
            "--model.loss=flowmap.losses.NoSuchLoss is not known",
        ),
        ("--model.loss.weighting.kind=focal", "Got value: focal"),
    ],
)
def test_a_misspelt_loss_option_is_one_sentence(tmp_path, capsys, arg, match):
    _run_and_expect_one_sentence(
        [
            "fit",
            "--config",
            "recipes/toy2d/lagrangian.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            arg,
        ],
        capsys,
        match,
    )


def test_a_misspelt_loss_option_in_a_yaml_file_is_one_sentence(tmp_path, capsys):
    cfg = tmp_path / "student.yaml"
    text = Path("recipes/toy2d/semigroup.yaml").read_text().replace("teacher_gap:", "teacher_gapp:")
    cfg.write_text(text)
    _run_and_expect_one_sentence(
        ["fit", "--config", str(cfg), f"--trainer.default_root_dir={tmp_path}"],
        capsys,
        "model.loss (flowmap.losses.SemigroupLoss): option 'teacher_gapp' is not accepted; "
        "did you mean 'teacher_gap'?",
    )


def _run_and_expect_one_sentence(args, capsys, match):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowmap: error: ") and match in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_nested_loss_argument_can_be_set_to_null_on_the_command_line(tmp_path):
    for arg in (
        ["--model.loss.init_args.teacher_max_gap=null"],
        ["--model.loss.teacher_max_gap", "null"],
        ["--model.loss.teacher_max_gap", "~", "--model.lr", "0.01"],  # YAML's other null
    ):
        cli = cli_main(
            [
                "--config",
                "recipes/toy2d/eulerian.yaml",
                *TINY_CLI,
                "--model.teacher=null",  # self-distillation: no teacher file needed
                "--model.warm_start=false",
                f"--trainer.default_root_dir={tmp_path}",
                "--model.loss.init_args.teacher_max_gap=0.2",  # overridden by the null after it
                *arg,
            ],
            run=False,
        )
        assert cli.model.loss.teacher_max_gap is None
    assert cli.model.hparams.lr == 0.01  # an option beside the nested null is kept as given


def _resolved_loss(capsys, *argv: str) -> dict:
    import yaml

    from flowmap.apps.lightning_cli import cli_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--config", "recipes/toy2d/lagrangian.yaml", *argv, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["loss"]


def test_a_preset_or_loss_class_named_on_the_command_line_starts_from_its_own_defaults(capsys):
    from flowmap.apps.help import command_help
    from flowmap.presets import PRESETS

    loss = _resolved_loss(capsys, "--model.loss=meanflow")
    assert loss["class_path"] == PRESETS["meanflow"].loss["class_path"]
    assert loss["init_args"]["pairs"]["init_args"]["distribution"] == "logit_normal"
    # the recipe's LagrangianLoss trains both ways; EulerianLoss named alone does not inherit it
    swap = _resolved_loss(capsys, "--model.loss=EulerianLoss")
    assert swap["class_path"].endswith("EulerianLoss") and swap["init_args"]["pairs"] is None
    after = _resolved_loss(
        capsys, "--model.loss", "EulerianLoss", "--model.loss.init_args.pairs.backward_fraction=0.5"
    )
    assert after["init_args"]["pairs"]["init_args"]["backward_fraction"] == 0.5
    assert _resolved_loss(capsys, "--model.loss=null") is None  # the module's default loss
    line = fails(capsys, "fit", "--config", "recipes/toy2d/lagrangian.yaml", "--model.loss=meanflw")
    assert "did you mean 'meanflow'?" in line and "improved_meanflow" in line
    assert "preset by name, e.g. --model.loss=meanflow" in " ".join(command_help("fit").split())


def _readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell commands starting with ``prefix``, continuation lines joined."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prefix):
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_readme_fit_commands_parse_as_written():
    from flowmap.apps.lightning_cli import cli_main

    commands = _readme_commands("flowmap fit")
    assert len(commands) >= 4
    roots = set()
    for argv in commands:
        with pytest.raises(SystemExit) as exc:
            cli_main([*argv, "--print_config"])
        assert exc.value.code in (0, None), argv
        roots |= {a for a in argv if a.startswith("--trainer.default_root_dir=")}
    assert len(roots) >= 3  # each example writes into its own directory


# --------------------------------------------------------------------------- loggers and the console


@pytest.mark.slow
def test_wandb_offline_run_writes_its_files_and_a_second_run_does_not_crash(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for resume in ([], ["--ckpt_path=last", "--trainer.max_steps=6"]):  # a fit, then its resume
        cli_main(
            [
                "fit",
                "--config",
                "recipes/toy2d/teacher.yaml",
                *TINY_NET,
                "--logger=wandb",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.max_steps=3",
                "--data.batch_size=32",
                *resume,
            ]
        )
        import wandb

        wandb.finish()  # one run per process, as from the command line
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(r.glob("*.wandb")) for r in runs)
    assert (tmp_path / "checkpoints" / "config.yaml").exists()


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


@pytest.mark.slow
def test_a_tiny_fit_prints_no_known_noise(tmp_path):
    """The console of a real ``flowmap fit`` process (warnings and logging as a user sees them)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("PYTHONWARNINGS", None)
    args = ["fit", "--config", "recipes/toy2d/teacher.yaml", *TINY_CLI[:3]]
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
