"""Interruptions, resume, unsafe and broken files, non-finite losses, bad configs, offline W&B."""

import csv
import logging
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from flowmap.apps.cli import main
from flowmap.apps.lightning_cli import cli_main
from flowmap.training import FlowMapModule, NonFiniteLossError, VelocityModule
from flowmap.training.checkpoints import CheckpointError, load_module, read_checkpoint
from tests.helpers import TINY_NET

FIT = [
    "fit",
    "--config",
    "recipes/toy2d/teacher.yaml",
    "--trainer.enable_progress_bar=false",
    *TINY_NET,
    "--data.batch_size=64",
    "--trainer.log_every_n_steps=1",
    "--trainer.val_check_interval=8",
    "--model.warmup_steps=5",
    "--checkpoint.every_n_train_steps=4",
]


def _losses(root: Path) -> dict[int, float]:
    out = {}
    for f in root.rglob("metrics.csv"):
        for r in csv.DictReader(open(f)):
            if r.get("train/loss"):
                out[int(r["step"])] = float(r["train/loss"])
    return out


class _StopAt(L.Callback):
    """Sends this process a real SIGTERM (or raises Ctrl-C) after a given training step."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_interrupted_fit_resumes_step_for_step(tmp_path, how, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    cli_main([*FIT, f"--trainer.default_root_dir={full}", "--trainer.max_steps=22"])
    cli = cli_main(
        [*FIT[1:], f"--trainer.default_root_dir={part}", "--trainer.max_steps=22"], run=False
    )
    cli.trainer.callbacks.append(_StopAt(13, how))
    handler = signal.getsignal(signal.SIGINT)
    lightning_log, lines = logging.getLogger("lightning.pytorch"), _Lines()
    lightning_log.addHandler(lines)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit):
            cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        lightning_log.removeHandler(lines)
    signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C after a graceful stop
    last = part / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 13
    said = capsys.readouterr().err
    assert f"flowmap: interrupted; saved {last} at step 13; resume with `flowmap fit" in said
    assert "--ckpt_path last`" in said
    # Lightning's "`weights_only` was not set" (about what a save holds) reads as unsafe loading
    assert not [ln for ln in lines.lines if "weights_only" in ln], lines.lines
    cli_main(
        [*FIT, f"--trainer.default_root_dir={part}", "--trainer.max_steps=22", "--ckpt_path=last"]
    )
    a, b = _losses(full), _losses(part)
    assert len(a) == 22 and set(range(13, 22)) <= set(b) and len(set(a) & set(b)) >= 21
    # (a Ctrl-C inside a step's hooks may cost that step's log line, never the step)
    for step in set(a) & set(b):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    ema = [read_checkpoint(r / "checkpoints" / "last.ckpt")["state_dict"] for r in (full, part)]
    for k in ema[0]:
        if k.startswith("ema."):
            assert torch.allclose(ema[0][k].float(), ema[1][k].float(), atol=1e-6), k


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create the marker file


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"x": _Payload(str(marker))},
            "flowmap_module": "VelocityModule",
        },
        path,
    )
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_module(VelocityModule, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        cli_main(
            [
                "fit",
                "--config",
                "recipes/toy2d/lagrangian.yaml",
                *TINY_NET,
                f"--trainer.default_root_dir={tmp_path}",
                f"--model.teacher={path}",
            ]
        )
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints_fail_with_one_sentence(toy_teacher, tmp_path):
    data = Path(toy_teacher[1]).read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        load_module(VelocityModule, cut)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="is not a Lightning checkpoint"):
        load_module(VelocityModule, foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_module(VelocityModule, tmp_path / "missing.ckpt")


def test_teacher_with_another_data_shape_is_refused(toy_teacher, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"trained on data of shape \[2\] but this data has shape "
        r"\[1, 8, 8\]",
    ):
        cli_main(
            [
                "fit",
                "--config",
                "recipes/toy2d/lagrangian.yaml",
                f"--trainer.default_root_dir={tmp_path}",
                f"--model.teacher={toy_teacher[1]}",
                "--model.net=flowmap.nets.MLP",
                "--model.net.data_shape=[1,8,8]",
                "--model.net.width=16",
                "--model.net.depth=1",
                "--model.warm_start=false",
                "--data=flowmap.data.DigitsDataModule",
                "--trainer.max_steps=1",
            ]
        )


class _NaNAfter(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0, 0] = float("nan")  # a corrupt sample poisons this step's loss


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_last_good_checkpoint(
    toy_teacher, tmp_path
):
    cli = cli_main(
        [
            "--config",
            "recipes/toy2d/lagrangian.yaml",
            *TINY_NET,
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.teacher={toy_teacher[1]}",
            "--data.name=8gaussians",
            "--checkpoint.every_n_train_steps=5",
            "--trainer.max_steps=50",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(_NaNAfter(7))
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss at step 7: .*'loss'") as err:
        cli.trainer.fit(cli.model, cli.datamodule)
    # what it says is true of this run: the checkpoint exists, and clipping is already on
    said = str(err.value)
    assert f"The last good checkpoint is {tmp_path / 'checkpoints' / 'last.ckpt'};" in said
    assert "lower --model.lr in a new run" in said and "clipping at 1 is already on" in said
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step5.ckpt"]
    good = load_module(FlowMapModule, tmp_path / "checkpoints" / "last.ckpt")
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert all(torch.isfinite(p).all() for p in good.parameters())


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


def test_a_checkpoint_of_an_older_format_is_refused_in_one_sentence(toy_teacher, tmp_path):
    ckpt = read_checkpoint(toy_teacher[1])
    del ckpt["flowmap_format"]  # as written by flowmap 0.1, whose nets compute another function
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(
        CheckpointError, match=r"older flowmap \(checkpoint format 1, this version reads 2\)"
    ):
        load_module(VelocityModule, old)


def test_a_distillation_from_a_python_teacher_does_not_resume_as_self_distillation(tmp_path):
    from flowmap.data import Toy2DDataModule
    from flowmap.nets import MLP
    from flowmap.oracles import GaussianMixtureTarget

    def trainer(steps):
        return L.Trainer(
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )

    data = Toy2DDataModule(name="8gaussians", batch_size=32)
    gmm = GaussianMixtureTarget.ring()
    first = trainer(2)
    first.fit(FlowMapModule(MLP((2,), width=8, depth=1), teacher=gmm, warm_start=False), data)
    path = tmp_path / "distilled.ckpt"
    first.save_checkpoint(path)
    # (the test wrote this file itself, so it lets Lightning unpickle it: weights_only=False)
    orphan = FlowMapModule(MLP((2,), width=8, depth=1), warm_start=False)
    with pytest.raises(
        ValueError, match=r"distilled from a Python teacher \(GaussianMixtureTarget\)"
    ):
        trainer(4).fit(orphan, data, ckpt_path=path, weights_only=False)
    again = FlowMapModule(MLP((2,), width=8, depth=1), teacher=gmm, warm_start=False)
    resumed = trainer(4)
    resumed.fit(again, data, ckpt_path=path, weights_only=False)
    assert resumed.global_step == 4


def test_a_teacher_that_declares_no_path_needs_the_schedule():
    from flowmap.nets import MLP

    def contraction(x, t):  # a Velocity with no .path
        return -x

    with pytest.raises(ValueError, match=r"declares no path .* pass schedule"):
        FlowMapModule(MLP((2,), width=8, depth=1), teacher=contraction)
    module = FlowMapModule(MLP((2,), width=8, depth=1), teacher=contraction, schedule="cosine")
    assert module.path.name == "cosine"
