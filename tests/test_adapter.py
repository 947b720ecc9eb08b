"""The student is the teacher's own network: the two-time adapter, the foreign teacher's student,
and a short distillation of a conv teacher that beats one Euler step."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from flowmap import FlowMap
from flowmap.losses import LagrangianLoss
from flowmap.nets import MLP, TwoTimeAdapter, UNet
from flowmap.ode import solve_adaptive
from flowmap.oracles import GaussianTarget
from flowmap.teachers import DiffusionStudent, DiffusionTeacher
from tests.test_teachers_cli import tiny_unet2d, tiny_unet_folder

F64 = torch.float64


def _perturb(module: nn.Module) -> None:
    """Move every gap branch far from its zero initialisation."""
    for name, p in module.named_parameters():
        if "branches" in name or ".gap." in name:
            p.data.normal_(0, 1.0)


def _tiny_dit():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    )


# ----------------------------------------------------------------- flowmap's own nets
@pytest.mark.parametrize(
    "make",
    [
        lambda: MLP((1, 4, 4), width=32, depth=2),
        lambda: UNet(
            image_size=4, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1
        ),
    ],
    ids=["mlp", "unet"],
)
def test_flowmap_nets_warm_start_to_the_teacher_on_the_diagonal_and_an_euler_step_off_it(make):
    torch.manual_seed(0)
    teacher = make()
    for name, p in teacher.named_parameters():  # far from initialisation (zero output layers too);
        if ".gap." not in name:  # a teacher trained on the diagonal never moves its gap branch
            p.data.normal_(0, 0.1)
    fm = FlowMap(make()).warm_start(teacher)
    _perturb(teacher)  # the teacher's own gap branch is never used on its diagonal
    x, s, t = torch.randn(6, 1, 4, 4), torch.rand(6) * 0.5, torch.rand(6) * 0.5 + 0.5
    assert torch.equal(fm.velocity(x, t), teacher(x, t, t))
    euler = x + (t - s)[:, None, None, None] * teacher(x, s, s)
    assert torch.allclose(fm(x, s, t), euler, atol=1e-6)


# ----------------------------------------------------------------- the adapter
def _adapter_checks(adapter: TwoTimeAdapter, call) -> None:
    """Diagonal equals the network bit for bit, before and after the gap branches move; off the
    diagonal the moved branches change the output."""
    torch.manual_seed(1)
    x, tau = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)).float()
    gap = torch.rand(4)
    plain = call(adapter.model, x, tau)
    assert torch.equal(call(adapter, x, tau, gap=torch.zeros(4)), plain)
    assert torch.equal(call(adapter, x, tau, gap=gap), plain)  # zero-initialised branches
    _perturb(adapter)
    assert torch.equal(call(adapter, x, tau, gap=torch.zeros(4)), plain)
    assert not torch.allclose(call(adapter, x, tau, gap=gap), plain, atol=1e-3)
    assert torch.equal(call(adapter, x, tau), plain)  # no gap: the network itself


def test_the_adapter_finds_a_diffusers_unet_time_embedding():
    adapter = TwoTimeAdapter(tiny_unet2d())
    assert adapter.time_modules == ["time_embedding"]
    _adapter_checks(adapter, lambda m, x, tau, **kw: m(x, tau, **kw).sample)


def test_the_adapter_finds_every_dit_timestep_embedder():
    adapter = TwoTimeAdapter(_tiny_dit().eval())  # eval: DiT drops labels at random in training
    assert adapter.time_modules == [
        f"transformer_blocks.{i}.norm1.emb.timestep_embedder" for i in range(2)
    ]
    y = torch.tensor([0, 3, 9, 10])  # 10: DiT's null class
    _adapter_checks(adapter, lambda m, x, tau, **kw: m(x, tau, class_labels=y, **kw).sample)


class _UserNet(nn.Module):
    """A user's one-time network, its time conditioning under a name the adapter does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 16))
        self.body = nn.Conv2d(1, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, tau):
        h = self.body(x) + self.clock(tau[:, None] / 1000)[:, :, None, None]
        return self.head(torch.nn.functional.silu(h))


def test_a_users_network_takes_the_gap_through_the_one_hook_and_is_refused_without_it():
    with pytest.raises(
        ValueError, match=r"Cannot find the time conditioning of _UserNet.*time_modules="
    ):
        TwoTimeAdapter(_UserNet())
    with pytest.raises(ValueError, match="no submodule 'clok'.*time_modules"):
        TwoTimeAdapter(_UserNet(), time_modules=["clok"])
    torch.manual_seed(0)
    _adapter_checks(
        TwoTimeAdapter(_UserNet(), time_modules=["clock"]), lambda m, x, tau, **kw: m(x, tau, **kw)
    )


def test_an_ema_copy_of_an_adapted_network_adds_its_own_gap_branch():
    adapter = TwoTimeAdapter(_UserNet(), time_modules=["clock"])
    twin = copy.deepcopy(adapter)
    _perturb(twin)  # only the copy's branches move
    x, tau, gap = torch.randn(3, 1, 8, 8), torch.full((3,), 500.0), torch.full((3,), 0.5)
    assert torch.equal(adapter(x, tau, gap=gap), adapter.model(x, tau))
    assert not torch.allclose(twin(x, tau, gap=gap), twin.model(x, tau), atol=1e-3)


# ----------------------------------------------------------------- a foreign teacher's student
@pytest.mark.parametrize(
    "prediction, schedule", [("epsilon", "ddpm_linear"), ("v_prediction", "vp_cosine")]
)
def test_a_foreign_teachers_student_is_the_teacher_and_one_jump_is_one_euler_step(
    prediction, schedule
):
    teacher = DiffusionTeacher(tiny_unet2d(F64), prediction, schedule, clip=True)
    fm = FlowMap(DiffusionStudent(teacher).double())
    x = torch.randn(5, 1, 8, 8, dtype=F64)
    s = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9], dtype=F64)
    t = torch.tensor([1.0, 0.6, 0.4, 0.5, 1.0], dtype=F64)
    # float64 tolerance, not bit for bit: a trainable copy takes other attention kernels on the CPU
    assert torch.allclose(fm.velocity(x, t), teacher(x, t), rtol=0, atol=1e-12)
    euler = x + (t - s)[:, None, None, None] * teacher(x, s)
    assert torch.allclose(fm(x, s, t), euler, rtol=0, atol=1e-12)
    # the gap enters through the network's time embedding: once trained, jumps leave Euler
    _perturb(fm.net)
    assert torch.allclose(fm.velocity(x, t), teacher(x, t), rtol=0, atol=1e-12)
    assert not torch.allclose(fm(x, s, t), euler, atol=1e-3)
    # and the JVP in t that the Lagrangian loss takes is exact (central difference)
    inside = slice(1, 4)
    xs, ss, ts = x[inside], s[inside], t[inside]
    j = fm.jvp(xs, ss, ts, dt=torch.ones_like(ts))
    h = 1e-5
    fd = (fm(xs, ss, ts + h) - fm(xs, ss, ts - h)) / (2 * h)
    assert torch.allclose(j.dX, fd, rtol=1e-5, atol=1e-6 * fd.abs().max().item())


def test_a_dit_student_is_the_teacher_with_labels_and_keeps_its_own_label_dropout_off():
    teacher = DiffusionTeacher(
        _tiny_dit(), "epsilon", "squaredcos_cap_v2", clip=True, num_classes=10, null_class=10,
        label_keyword="class_labels", learned_variance=True,
    )  # fmt: skip
    student = DiffusionStudent(teacher).train()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 9, -1])
    for _ in range(3):  # in train mode, with the DiT's own 10% label dropout kept off
        got = FlowMap(student).velocity(x, t, y=y)
        assert torch.allclose(got, teacher(x, t, y=y), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="class-conditional; give labels y"):
        student(x, t, t)


def test_a_students_warm_start_refuses_another_teacher():
    student = DiffusionStudent(DiffusionTeacher(tiny_unet2d(), "epsilon", "ddpm_linear", clip=True))
    other = DiffusionTeacher(tiny_unet2d(), "v_prediction", "ddpm_linear", clip=True)
    with pytest.raises(ValueError, match="converts its network differently.*prediction"):
        student.warm_start(other)
    with pytest.raises(ValueError, match="copies a DiffusionTeacher's network"):
        student.warm_start(GaussianTarget(torch.zeros(2), torch.ones(2)))
    with pytest.raises(ValueError, match="leave the student's net unset"):
        FlowMap(MLP((1, 8, 8), width=8, depth=1)).warm_start(other)


def test_a_diffusers_students_checkpoint_samples_without_the_teachers_files(tmp_path):
    import lightning as L

    from flowmap import FlowMapModule, load_module
    from flowmap.data import DigitsDataModule

    folder = tiny_unet_folder(tmp_path / "teacher")
    module = FlowMapModule(teacher=str(folder), lr=1e-3)  # no net: the teacher's own UNet
    assert module.hparams["net"]["class_path"] == "flowmap.teachers.DiffusionStudent"
    assert "folder" not in str(module.hparams["net"])  # the architecture, inline
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DigitsDataModule(batch_size=8))
    trainer.save_checkpoint(tmp_path / "map.ckpt")
    z = torch.randn(4, 1, 8, 8)
    before = module.eval().generate(z, nfe=2).x
    shutil.rmtree(folder)  # no teacher files from here on
    loaded = load_module(FlowMapModule, tmp_path / "map.ckpt")
    assert isinstance(loaded.net, DiffusionStudent)
    assert torch.allclose(loaded.generate(z, nfe=2).x, before, rtol=1e-4, atol=1e-4)


def test_a_student_without_a_net_needs_a_teacher_to_copy():
    from flowmap import FlowMapModule

    with pytest.raises(ValueError, match="no teacher whose network it could copy"):
        FlowMapModule()


# ----------------------------------------------------------------- distillation of a conv teacher
@pytest.mark.slow
def test_a_short_distillation_of_a_conv_teacher_beats_one_euler_step_by_far():
    """A tiny U-Net CFM teacher of a Gaussian in 1×4×4, copied into its student: at
    initialisation one jump is one Euler step (which sends every sample to nearly the mean, an
    endpoint error of about 2 here); 120 Lagrangian steps take the one-jump error below 0.4 of
    it (0.2 seen)."""
    torch.manual_seed(0)
    target = GaussianTarget(torch.linspace(-1, 1, 16).reshape(1, 4, 4), torch.full((1, 4, 4), 0.5))

    def make() -> UNet:
        return UNet(image_size=4, in_channels=1, channels=8, channel_mult=(1,), num_res_blocks=1)

    net = make()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(200):  # CFM on the linear path
        x1, x0, t = target.sample(64), torch.randn(64, 1, 4, 4), torch.rand(64)
        xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
        loss = (net(xt, t, t) - (x1 - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.requires_grad_(False)
    teacher = FlowMap(net).velocity
    z = torch.randn(128, 1, 4, 4)
    end = solve_adaptive(teacher, z, rtol=1e-4, atol=1e-4).x  # the teacher's own endpoint

    def error(fm: FlowMap) -> float:
        with torch.no_grad():
            return (fm(z, 0.0, 1.0) - end).flatten(1).norm(dim=1).mean().item()

    student = FlowMap(make()).warm_start(net)
    euler = error(student)
    one_step = (z + teacher(z, torch.zeros(128)) - end).flatten(1).norm(dim=1).mean().item()
    assert euler == pytest.approx(one_step, rel=1e-5)
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    loss_fn = LagrangianLoss()
    for step in range(120):
        loss = loss_fn(student, target.sample(64), teacher, step=step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error(student) < 0.4 * euler, (error(student), euler)
