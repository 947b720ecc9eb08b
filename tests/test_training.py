"""CLI fits of the toy teacher and of a flow map: losses go down, checkpoints reload and sample."""

import csv
from pathlib import Path

import pytest
import torch

from flowmap.training import FlowMapModule, VelocityModule
from flowmap.training.checkpoints import CheckpointError, load_module
from tests.helpers import fit_cli as _fit


def _train_losses(root: Path) -> list[float]:
    rows = list(csv.DictReader(open(next(root.rglob("metrics.csv")))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_teacher_checkpoint_problems_are_one_sentence(toy_teacher, tmp_path):
    root, teacher_ckpt = toy_teacher
    with pytest.raises(CheckpointError, match="Teacher checkpoint 'nope.ckpt' does not exist"):
        _fit("recipes/toy2d/lagrangian.yaml", tmp_path, "--model.teacher=nope.ckpt")
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before any step
    fm_ckpt = tmp_path / "fm"
    fm_ckpt.mkdir()
    moved_teacher = tmp_path / "teacher-copy.ckpt"
    moved_teacher.write_bytes(Path(teacher_ckpt).read_bytes())
    flow = _fit(
        "recipes/toy2d/lagrangian.yaml",
        fm_ckpt,
        f"--model.teacher={moved_teacher}",
        "--trainer.max_steps=2",
        "--data.name=8gaussians",
    )
    moved_teacher.unlink()  # a trained student still loads and samples without its teacher
    assert load_module(FlowMapModule, flow).generate(torch.randn(8, 2), nfe=1).x.shape == (8, 2)
    with pytest.raises(
        CheckpointError, match="is a FlowMapModule checkpoint, but a VelocityModule"
    ):
        _fit(
            "recipes/toy2d/lagrangian.yaml",
            tmp_path / "x",
            f"--model.teacher={flow}",
            "--trainer.max_steps=2",
        )


def test_a_python_teacher_is_distilled_through_lightning_and_kept_out_of_the_checkpoint(tmp_path):
    """Any Velocity (here the exact mixture oracle, on the cosine path) can be the teacher; the
    student adopts its schedule, and the checkpoint holds plain data only."""
    import lightning as L

    from flowmap.data import Toy2DDataModule
    from flowmap.nets import MLP
    from flowmap.oracles import GaussianMixtureTarget

    ring = GaussianMixtureTarget.ring()
    gmm = GaussianMixtureTarget(ring.weights, ring.means, ring.stds, schedule="cosine")
    with pytest.raises(ValueError, match="teacher follows the 'cosine' schedule"):
        FlowMapModule(MLP((2,), width=16, depth=1), teacher=gmm, schedule="linear")
    module = FlowMapModule(MLP((2,), width=16, depth=1), teacher=gmm, warm_start=False, lr=1e-3)
    assert module.path.name == "cosine" and module.teacher is gmm
    assert "teacher" not in module.hparams and module.hparams["schedule"] == "cosine"
    trainer = L.Trainer(
        max_steps=30,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, Toy2DDataModule(name="8gaussians", batch_size=64))
    assert torch.isfinite(trainer.callback_metrics["train/lagrangian"])
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    # saved from Python objects, not a config: nets and losses are pickled objects, so such a
    # checkpoint is refused by the safe loader (build() or the CLI make loadable ones)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_module(FlowMapModule, path)
    # the default warm_start has nothing to copy from a function teacher: the student starts as
    # built (it used to refuse the fit; issue 2/7)
    FlowMapModule(MLP((2,), width=16, depth=1), teacher=gmm).setup("fit")


def test_build_gives_checkpoints_that_reload_with_no_arguments(tmp_path):
    import lightning as L

    from flowmap.data import Toy2DDataModule
    from flowmap.losses import EulerianLoss
    from flowmap.training import build

    module = build(
        FlowMapModule,
        {
            "net": {"class_path": "flowmap.nets.MLP", "init_args": {"width": 16, "depth": 1}},
            "loss": {
                "class_path": "flowmap.losses.EulerianLoss",
                "init_args": {"pairs": {"eta": 0.5}},
            },
            "lr": 1e-3,
        },
    )
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, Toy2DDataModule(name="moons", batch_size=32))
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    again = load_module(FlowMapModule, tmp_path / "s.ckpt")
    assert isinstance(again.loss, EulerianLoss) and again.loss.pairs.eta == 0.5
    assert again.teacher is None and again.path.name == "linear"  # self-distilled
    for a, b in zip(module.net.parameters(), again.net.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_a_new_loss_is_one_class_injected_by_class_path(toy_teacher, tmp_path):
    ckpt = _fit(
        "recipes/toy2d/lagrangian.yaml",
        tmp_path,
        f"--model.teacher={toy_teacher[1]}",
        "--model.loss=tests.helpers.EulerChordLoss",
        "--model.loss.pairs.eta=0.5",
        "--model.warm_start=false",
        "--trainer.max_steps=60",
        "--trainer.log_every_n_steps=5",
        "--data.batch_size=128",
        "--data.name=8gaussians",
        "--model.lr=3e-3",
    )
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    chord = [float(r["train/euler_chord"]) for r in rows if r.get("train/euler_chord")]
    assert len(chord) >= 10 and sum(chord[-3:]) < 0.5 * sum(chord[:3]), chord
    student = load_module(FlowMapModule, ckpt)
    assert type(student.loss).__name__ == "EulerChordLoss" and student.loss.pairs.eta == 0.5


def test_the_teacher_is_one_frozen_submodule_kept_out_of_the_state_dict():
    """The resolved teacher moves with the module but never trains, never enters the optimiser
    and never the state dict; a state dict without it (every checkpoint, old ones too) loads
    strictly into a module that holds it."""
    from flowmap.nets import MLP
    from flowmap.training.teachers import ResolvedTeacher

    torch.manual_seed(0)
    teacher = VelocityModule(MLP((2,), width=8, depth=1), ema_decay=None)
    module = FlowMapModule(MLP((2,), width=8, depth=1), teacher=teacher, warm_start=False)
    assert isinstance(module._teacher, ResolvedTeacher) and module.teacher is teacher
    assert module._teacher.path.name == "linear" and module._teacher.identity is None
    assert module._teacher.spec == "python:VelocityModule"
    assert not any(p.requires_grad for p in teacher.parameters())
    state = module.state_dict()
    assert not any("_teacher" in k for k in state) and any(k.startswith("net.") for k in state)
    fresh = FlowMapModule(MLP((2,), width=8, depth=1), teacher=teacher, warm_start=False)
    fresh.load_state_dict(state)  # strict: the teacher's own keys are not missing
    assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), fresh.net.parameters()))
    with pytest.raises(RuntimeError, match="Missing key"):  # a student's own keys still are
        fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("net.")})
    module.train()
    assert not teacher.training and module.net.training
    module.double()
    assert next(teacher.parameters()).dtype == torch.float64
    ids = {id(p) for p in module.trainable_parameters()}
    assert ids and not ids & {id(p) for p in teacher.parameters()}
