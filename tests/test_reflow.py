"""Reflow: couplings come from the teacher's ODE (the Gaussian oracle, whose rectified flow is
straight), straightness and the Euler error measure it, a rectified flow trained on couplings is
straighter than its teacher, and the couplings travel through `flowmap couple` into `flowmap fit`."""

import pytest
import torch

from flowmap.apps.cli import main
from flowmap.apps.lightning_cli import cli_main
from flowmap.data import CouplingDataModule
from flowmap.io import UnsafeFileError
from flowmap.losses import cfm_loss
from flowmap.nets import MLP
from flowmap.ode import solve_adaptive
from flowmap.oracles import GaussianMixtureTarget
from flowmap.paths import AffinePath
from flowmap.reflow import (
    draw_couplings,
    euler_error,
    load_couplings,
    save_couplings,
    straightness,
)
from flowmap.training import VelocityModule, load_module, read_checkpoint
from tests.helpers import TINY_NET, fails


def _rectified_gaussian(gaussian):
    """The 1-rectified velocity of a Gaussian on the linear path, in closed form: its couplings
    are x1 = μ + c·x0, so x_t = (1 - t + t c) x0 + t μ and b'_t(x) = μ + (c - 1)(x - t μ)/(1 - t + t c)."""
    mu, c = gaussian.mu, gaussian.c

    def velocity(x, t):
        t = t.to(x.dtype)[:, None]
        return mu + (c - 1) * (x - t * mu) / (1 - t + t * c)

    return velocity


def test_couplings_are_the_teachers_ode_endpoints(gaussian):
    out = draw_couplings(gaussian.velocity, 3000, (2,), batch=1000, seed=3)
    x0 = torch.randn(3000, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out["x0"], x0) and set(out) == {"x0", "x1"}
    exact = gaussian.flow_map(x0.double(), 0.0, 1.0)
    gap = (out["x1"].double() - exact).abs()  # dopri5 at rtol = atol = 1e-5, in float32
    assert gap.max() < 1e-3 and gap.mean() < 1e-4


def test_the_rectified_flow_of_a_gaussian_is_straight_and_its_teacher_is_not(gaussian):
    x0 = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rectified = _rectified_gaussian(gaussian)
    x1 = gaussian.flow_map(x0, 0.0, 1.0)  # both flows end at the same coupling
    assert straightness(rectified, x0) < 1e-12 and euler_error(rectified, x0, x1) < 1e-12
    # the teacher's one Euler step lands every x0 on μ (b_0(x) = μ - x): its error is E|c x0|
    expected = (gaussian.c * x0).norm(dim=1).mean()
    assert euler_error(gaussian.velocity, x0, x1) == pytest.approx(float(expected), rel=1e-9)
    assert straightness(gaussian.velocity, x0) > 0.05


def test_a_rectified_flow_trained_on_couplings_halves_the_euler_error_of_its_teacher():
    """The exact velocity of an 8-mode ring (curved paths) couples 4096 noises; a small net
    trained by flow matching on those pairs follows an ODE that one Euler step tracks at least
    twice as well as the teacher's."""
    torch.manual_seed(0)
    ring = GaussianMixtureTarget.ring(k=8, radius=2.0, std=0.2)
    pairs = draw_couplings(ring.velocity, 4096, (2,), seed=1)
    net = MLP((2,), width=64, depth=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    path, g = AffinePath("linear"), torch.Generator().manual_seed(2)

    def velocity(x, t):
        return net(x, t, t)

    for _ in range(600):
        i = torch.randint(4096, (256,), generator=g)
        loss = cfm_loss(velocity, pairs["x1"][i], path, x0=pairs["x0"][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0 = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        teacher_error = euler_error(ring.velocity, x0, solve_adaptive(ring.velocity, x0).x)
        own_end = solve_adaptive(velocity, x0).x
        rectified_error = euler_error(velocity, x0, own_end)
    assert rectified_error < 0.5 * teacher_error, (rectified_error, teacher_error)
    assert straightness(velocity, x0) < 0.5 * straightness(ring.velocity, x0)


def test_couplings_files_round_trip_and_bad_ones_are_refused(tmp_path):
    pairs = {"x0": torch.randn(10, 2), "x1": torch.randn(10, 2), "y": torch.arange(10)}
    path = save_couplings(tmp_path / "c.safetensors", pairs, teacher="t.ckpt sha256:00")
    back = load_couplings(path)
    assert all(torch.equal(back[k], v) for k, v in pairs.items())
    with pytest.raises(UnsafeFileError, match="need tensors x0 and x1 of one shape"):
        save_couplings(
            tmp_path / "d.safetensors", {"x0": torch.randn(10, 2), "x1": torch.randn(9, 2)}
        )
    with pytest.raises(UnsafeFileError, match="is a pickle file"):
        load_couplings(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="not more than n_val=10"):
        _ = CouplingDataModule(str(path), n_val=10).data_shape
    with pytest.raises(ValueError, match="labels must have shape"):
        draw_couplings(lambda x, t: x, 4, (2,), labels=torch.arange(3))


def test_a_velocity_module_trains_on_the_couplings_own_noise():
    """A net that outputs 0 has CFM loss E|x1 - x0|^2: exactly 0 when the batch couples x1 with
    itself, which only the batch's own x0 can give."""
    net = MLP((2,), width=8, depth=1)
    torch.nn.init.zeros_(net.out[-1].weight)
    torch.nn.init.zeros_(net.out[-1].bias)
    module = VelocityModule(net, data_shape=[2])
    x = torch.randn(16, 2)
    assert float(module.training_step({"x0": x, "x1": x}, 0)) == 0.0
    assert float(module.training_step(x, 0)) > 0.1


@pytest.mark.slow
def test_flowmap_couple_feeds_a_warm_started_reflow_fit(toy_teacher, tmp_path, capsys):
    couplings = tmp_path / "couplings.safetensors"
    main(["couple", "--teacher", str(toy_teacher[1]), "--n", "600", "--out", str(couplings)])
    said = capsys.readouterr().out
    assert "600 couplings of VelocityModule" in said and "one-Euler-step error" in said
    pairs = load_couplings(couplings)
    teacher = load_module(VelocityModule, toy_teacher[1])
    with torch.no_grad():
        ends = solve_adaptive(teacher, pairs["x0"][:50]).x
    assert (ends - pairs["x1"][:50]).abs().max() < 1e-3
    run = tmp_path / "reflow"
    cli_main(
        [
            "fit",
            "--config",
            "recipes/toy2d/teacher_reflow.yaml",
            *TINY_NET,  # the toy teacher's net
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={run}",
            f"--model.warm_start={toy_teacher[1]}",
            f"--data.path={couplings}",
            "--data.batch_size=64",
            "--data.n_val=100",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
        ]
    )
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["warm_start"] == str(
        toy_teacher[1]
    )
    reflowed = load_module(VelocityModule, run / "checkpoints" / "last.ckpt")
    start = dict(teacher.sampling_net.named_parameters())
    moved = [float((p - start[k]).abs().max()) for k, p in reflowed.net.named_parameters()]
    assert 0 < max(moved) < 0.05  # started at the teacher's weights, then moved a little
    # the reflowed teacher stands for its teacher's data: it distils on it (and resumes)
    student = tmp_path / "student"
    cli_main(
        [
            "fit",
            "--config",
            "recipes/toy2d/lagrangian.yaml",
            *TINY_NET,
            f"--model.teacher={run / 'checkpoints' / 'last.ckpt'}",
            "--data.name=8gaussians",
            "--data.batch_size=64",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={student}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
        ]
    )
    assert read_checkpoint(student / "checkpoints" / "last.ckpt")["global_step"] == 2
    with pytest.raises(
        ValueError, match="needs the student net to have the teacher's architecture"
    ):
        cli_main(["fit", "--config", "recipes/toy2d/teacher_reflow.yaml", "--trainer.callbacks=[]",
                  f"--trainer.default_root_dir={tmp_path / 'other'}", "--trainer.max_steps=1",
                  f"--model.warm_start={toy_teacher[1]}", f"--data.path={couplings}",
                  "--data.n_val=100", "--trainer.enable_progress_bar=false"])  # fmt: skip
    # a file that is no checkpoint is not a teacher to couple
    err = fails(
        capsys, "couple", "--teacher", "nope.ckpt", "--out", str(tmp_path / "x.safetensors")
    )
    assert "nope.ckpt" in err
    err = fails(capsys, "couple", "--teacher", str(toy_teacher[1]), "--out", str(tmp_path / "x.pt"))
    assert "must end in .safetensors" in err
