"""The flow-map module (flowmap.training.flow_map): a map trained both ways inverts and a forward-only
one refuses; the teacher it is given is checked (its data, its data shape, its path), a function
teacher warm-starts nothing, and a Python teacher's distillation never resumes as self-distillation."""

import lightning as L
import pytest
import torch

from flowmap import FlowMapModule, LagrangianLoss
from flowmap.apps.lightning_cli import cli_main
from flowmap.losses import TimePairSampler
from flowmap.nets import MLP
from flowmap.ode import solve_ode
from flowmap.oracles import GaussianTarget
from tests.helpers import TINY, TINY_NET, fails


def _distil(teacher, backward_fraction: float, steps: int = 250) -> FlowMapModule:
    torch.manual_seed(0)
    loss = LagrangianLoss(pairs=TimePairSampler(backward_fraction=backward_fraction))
    module = FlowMapModule(
        MLP((2,), width=32, depth=1), loss, teacher=teacher, warm_start=False, ema_decay=None
    )
    opt = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    for step in range(steps):
        opt.zero_grad()
        loss(module.student, teacher.sample(256), teacher, step=step)["loss"].backward()
        opt.step()
    return module


@pytest.mark.slow
def test_a_map_trained_both_ways_inverts_and_a_forward_only_one_refuses():
    teacher = GaussianTarget(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5]))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    forward_only, both = _distil(teacher, 0.0), _distil(teacher, 0.5)
    with pytest.raises(ValueError, match="trained only forward"):
        forward_only.invert(forward_only.generate(z, 2).x, 2)
    assert not forward_only.trained_backward and both.trained_backward

    def round_trip(module, n):
        from flowmap.ode import sample_flow_map

        x1 = module.generate(z, n).x
        with torch.no_grad():
            return sample_flow_map(module.sampling_flow_map, x1, steps=n, t0=1.0, t1=0.0).x - z

    miss_both = (both.invert(both.generate(z, 2).x, 2).x - z).norm(dim=1).mean()
    assert torch.allclose(miss_both, round_trip(both, 2).norm(dim=1).mean())
    miss_forward = round_trip(forward_only, 2).norm(dim=1).mean()
    # the untrained backward jumps miss the noise by ~0.7 here, the trained ones by ~0.25
    assert miss_both < 0.45 * miss_forward, (miss_both, miss_forward)
    # and the round trip is a few Euler steps' worth, not the ~1.9 of one Euler step each way
    with torch.no_grad():
        euler = solve_ode(
            teacher.velocity, solve_ode(teacher.velocity, z, nfe=1).x, nfe=1, t0=1, t1=0
        )
    assert miss_both < 0.25 * (euler.x - z).norm(dim=1).mean()


def test_a_function_teacher_distils_with_the_default_warm_start():
    """A teacher with no network (an analytic velocity) leaves nothing to copy: the default
    warm_start=True starts the student as built, where it used to refuse the fit."""
    teacher = GaussianTarget(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.5]))
    module = FlowMapModule(MLP((2,), width=16, depth=1), LagrangianLoss(), teacher=teacher)
    before = [p.detach().clone() for p in module.net.parameters()]
    module.setup("fit")
    assert all(torch.equal(a, b) for a, b in zip(before, module.net.parameters(), strict=True))
    with pytest.raises(ValueError, match="needs a teacher with a network to copy"):
        module.student.warm_start(teacher)  # asked for outright, it still says why not


def test_a_teacher_that_declares_no_path_needs_the_schedule():
    from flowmap.nets import MLP

    def contraction(x, t):  # a Velocity with no .path
        return -x

    with pytest.raises(ValueError, match=r"declares no path .* pass schedule"):
        FlowMapModule(MLP((2,), width=8, depth=1), teacher=contraction)
    module = FlowMapModule(MLP((2,), width=8, depth=1), teacher=contraction, schedule="cosine")
    assert module.path.name == "cosine"


@pytest.mark.slow
def test_distilling_a_teacher_of_another_dataset_is_refused_before_the_first_step(
    toy_teacher, tmp_path, capsys
):
    line = fails(
        capsys,
        "fit",
        "--config",
        "recipes/toy2d/lagrangian.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.teacher={toy_teacher[1]}",
        "--data.name=checkerboard",  # the teacher saw 8gaussians: same shape, other data
        *TINY_NET,
        *TINY,
    )
    assert "was trained on Toy2DDataModule(name='8gaussians')" in line
    assert "this fit's data is Toy2DDataModule(name='checkerboard')" in line
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
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
