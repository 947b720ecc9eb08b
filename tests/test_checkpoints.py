"""A run's checkpoints (flowmap.training.checkpoints, the run directory and resume of
flowmap.training.base, InterruptCheckpoint): a fit into another run's directory or a resume under
another config or of nothing is refused; a fit says where its checkpoint went; an interrupted fit
resumes step for step; a non-finite loss keeps the last good checkpoint; unsafe, broken, foreign,
old or misnamed checkpoints are refused in one sentence."""

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
from tests.helpers import TINY, TINY_NET, fails, fit_cli, one_line_error

TEACHER = "recipes/toy2d/teacher.yaml"
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


# --------------------------------------------------------------------------- the run directory


@pytest.mark.slow
def test_a_fresh_fit_into_a_run_directory_is_refused_and_a_resume_under_another_config(
    tmp_path, capsys
):
    root = tmp_path / "teacher"
    fit_cli(TEACHER, root, "--trainer.max_steps=2", *TINY)
    files = sorted((root / "checkpoints").iterdir())
    before = {p.name: p.read_bytes() for p in files}
    line = fails(
        capsys, "fit", "--config", TEACHER, f"--trainer.default_root_dir={root}", *TINY_NET, *TINY
    )
    assert "already holds the checkpoints of a run" in line and "--ckpt_path last" in line
    common = ["fit", "--config", TEACHER, f"--trainer.default_root_dir={root}", *TINY_NET, *TINY]
    line = fails(capsys, *common, "--ckpt_path=last", "--data.name=moons", "--trainer.max_steps=4")
    assert (
        "Cannot resume" in line
        and "data.name: 'checkerboard' in the checkpoint, 'moons' now" in line
    )
    line = fails(capsys, *common, "--ckpt_path=last", "--model.lr=0.01", "--trainer.max_steps=4")
    assert "model.lr: 0.002 in the checkpoint, 0.01 now" in line
    # a checkpoint file named outright: Lightning would take its config over the one given
    last = str(root / "checkpoints" / "last.ckpt")
    line = fails(capsys, *common, f"--ckpt_path={last}", "--model.lr=0.01", "--trainer.max_steps=4")
    assert "model.lr: 0.002 in the checkpoint, 0.01 now" in line
    after = {p.name: p.read_bytes() for p in sorted((root / "checkpoints").iterdir())}
    assert after == before  # nothing written, the run's config.yaml included
    # the same config resumes (and only the trainer's budget changed)
    main([*common, "--ckpt_path=last", "--trainer.max_steps=4"])
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


def test_a_resume_that_finds_no_checkpoint_is_refused_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "typo"
    common = ["fit", "--config", TEACHER, f"--trainer.default_root_dir={root}", *TINY_NET, *TINY]
    line = fails(capsys, *common, "--ckpt_path=last", "--trainer.max_steps=2")
    assert "--ckpt_path last found no checkpoint to resume in" in line and str(root) in line
    line = fails(capsys, *common, f"--ckpt_path={tmp_path / 'nope.ckpt'}")
    assert "nope.ckpt does not exist" in line
    assert not root.exists()


def test_a_fit_says_where_its_checkpoint_went(tmp_path, capsys):
    root = tmp_path / "run"
    fit_cli(TEACHER, root, "--trainer.max_steps=3", *TINY)
    err = capsys.readouterr().err
    last = root / "checkpoints" / "last.ckpt"
    assert f"flowmap: saved {last} at step 3" in err
    assert f"--config {root / 'checkpoints' / 'config.yaml'} --ckpt_path last" in err
    assert "weights_only" not in err


# --------------------------------------------------------------------------- interruption


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


@pytest.mark.slow
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


class _NaNAfter(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0, 0] = float("nan")  # a corrupt sample poisons this step's loss


@pytest.mark.slow
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


# --------------------------------------------------------------------------- refused files


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_checkpoint_of_an_older_format_is_refused_in_one_sentence(toy_teacher, tmp_path):
    ckpt = read_checkpoint(toy_teacher[1])
    del ckpt["flowmap_format"]  # as written by flowmap 0.1, whose nets compute another function
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(
        CheckpointError, match=r"older flowmap \(checkpoint format 1, this version reads 2\)"
    ):
        load_module(VelocityModule, old)


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


@pytest.mark.slow
def test_a_run_folder_or_its_config_given_as_a_checkpoint_names_the_checkpoint(
    toy_teacher, tmp_path, capsys
):
    root, last = toy_teacher
    for given in (root, last.parent / "config.yaml"):
        line = fails(capsys, "sample", "--ckpt", str(given), "--out", str(tmp_path / "s.npz"))
        assert f"did you mean {str(last)!r}?" in line, line
        line = fails(
            capsys,
            "fit",
            "--config",
            "recipes/toy2d/lagrangian.yaml",
            f"--model.teacher={given}",
            f"--trainer.default_root_dir={tmp_path / 'fm'}",
            "--data.name=8gaussians",
            *TINY_NET,
            *TINY,
        )
        assert f"did you mean {str(last)!r}?" in line, line
