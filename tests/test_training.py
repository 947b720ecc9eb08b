"""CLI fits of the toy teacher and of a flow map: losses go down, checkpoints reload and sample."""

import csv
from pathlib import Path

import pytest
import torch

from flowmap.training.checkpoints import CheckpointError, load_module
from flowmap.training import FlowMapModule, VelocityModule
from tests.helpers import fit_cli as _fit


def _train_losses(root: Path) -> list[float]:
    rows = list(csv.DictReader(open(next(root.rglob("metrics.csv")))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_cli_teacher_fit_lowers_the_loss_and_reloads_without_arguments(toy_teacher):
    root, ckpt = toy_teacher
    losses = _train_losses(root)
    assert len(losses) >= 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    teacher = VelocityModule.load_from_checkpoint(ckpt, weights_only=True)
    assert teacher.data_shape == (2,)
    sol = teacher.generate(torch.randn(256, 2), nfe=8, method="heun")
    assert sol.nfe == 8 and torch.isfinite(sol.x).all()
    # 8 Gaussians sit on a circle: samples should have moved far from the noise's radius ~1.25
    assert sol.x.norm(dim=1).mean() > 1.5
    assert (root / "logs" / "version_0" / "config.yaml").exists()


@pytest.mark.parametrize("loss", ["lagrangian", "eulerian", "semigroup"])
def test_cli_flow_map_fit_runs_each_loss(toy_teacher, tmp_path, loss):
    _, teacher_ckpt = toy_teacher
    ckpt = _fit(
        f"recipes/toy2d/{loss}.yaml",
        tmp_path,
        f"--model.teacher={teacher_ckpt}",
        "--trainer.max_steps=20",
        "--data.batch_size=128",
        "--trainer.val_check_interval=10",
        "--data.name=8gaussians",
    )
    fm = load_module(FlowMapModule, ckpt)
    assert fm.teacher is None  # the teacher is not part of the student's checkpoint
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("_teacher") for k in state)
    sol = fm.generate(torch.randn(64, 2), nfe=2)
    assert sol.nfe == 2 and torch.isfinite(sol.x).all()


def test_teacher_checkpoint_problems_are_one_sentence(toy_teacher, tmp_path):
    root, teacher_ckpt = toy_teacher
    with pytest.raises(CheckpointError, match="Teacher checkpoint 'nope.ckpt' does not exist"):
        _fit("recipes/toy2d/lagrangian.yaml", tmp_path, "--model.teacher=nope.ckpt")
    fm_ckpt = tmp_path / "fm"
    fm_ckpt.mkdir()
    flow = _fit(
        "recipes/toy2d/lagrangian.yaml",
        fm_ckpt,
        f"--model.teacher={teacher_ckpt}",
        "--trainer.max_steps=2",
        "--data.name=8gaussians",
    )
    with pytest.raises(
        CheckpointError, match="is a FlowMapModule checkpoint, but a VelocityModule"
    ):
        _fit(
            "recipes/toy2d/lagrangian.yaml",
            tmp_path / "x",
            f"--model.teacher={flow}",
            "--trainer.max_steps=2",
        )
