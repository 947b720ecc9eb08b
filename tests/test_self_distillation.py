"""Self-distillation from scratch: a loss with no teacher takes the settings that train (or refuses
the ones that collapse), and a run that leaves the data's scale stops naming the step, its last
good weights kept, in a plain loop (DivergenceGuard) and in Lightning."""

import math

import lightning as L
import pytest
import torch
from torch import nn

from flowmap import FlowMap, LagrangianLoss
from flowmap.apps.lightning_cli import cli_main
from flowmap.data.toy2d import toy2d_sample
from flowmap.losses import (
    EulerianLoss,
    LossWeighting,
    MeanFlowLoss,
    SemigroupLoss,
    TimePairSampler,
)
from flowmap.metrics.two_d import wasserstein2
from flowmap.nets import MLP
from flowmap.ode import sample_consistency, sample_flow_map
from flowmap.presets import PRESETS, build_loss
from flowmap.training import DivergenceError, DivergenceGuard, FlowMapModule
from flowmap.training.checkpoints import load_module, read_checkpoint
from tests.helpers import TINY_NET


def pinwheel(n: int, g: torch.Generator) -> torch.Tensor:
    """A 2D target the package does not ship: five curved arms."""
    k = torch.randint(5, (n,), generator=g).float()
    r = 1 + 0.3 * torch.randn(n, generator=g)
    ang = k * 2 * math.pi / 5 + 0.5 + 0.9 * (r - 1) + 0.05 * torch.randn(n, generator=g)
    return 2 * torch.stack([r * ang.cos(), r * ang.sin()], 1)


class SinusoidalNet(nn.Module):
    """A user's own φ(x, s, t): an MLP on x and DDPM-style sinusoidal features of s and t."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.register_buffer("freq", 1000 * torch.exp(-math.log(1e4) * torch.arange(8) / 8))
        layers = [nn.Linear(34, width), nn.SiLU()]
        for _ in range(2):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feats = [
            torch.cat([(u[:, None] * self.freq).sin(), (u[:, None] * self.freq).cos()], 1)
            for u in (s, t)
        ]
        return self.mlp(torch.cat([x, *feats], 1))


def _train_from_scratch(loss, steps=600, guard=None):
    """The README's plain loop, teacher=None: returns the map, the one-jump W2 before and after
    and the mean one-jump displacement |X(0, 1, z) - z| (about 0 for the identity map)."""
    torch.manual_seed(0)
    fm = FlowMap(SinusoidalNet())
    ref = pinwheel(1000, torch.Generator().manual_seed(2))
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3))

    def one_jump():
        with torch.no_grad():
            return sample_flow_map(fm, z, steps=1).x

    before = wasserstein2(one_jump(), ref)
    opt = torch.optim.Adam(fm.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        x1 = pinwheel(256, g)
        out = loss(fm, x1, None, step=k)
        if guard is not None:
            guard(fm, x1, step=k, loss=out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    x = one_jump()
    return fm, before, wasserstein2(x, ref), float((x - z).norm(dim=1).mean())


def test_the_issues_plain_loop_now_trains_where_it_collapsed():
    """The issue's case: LagrangianLoss() with teacher=None in a plain loop, a user's MLP with
    sinusoidal time features, a new 2D target. From scratch the unset defaults are 75% diagonal
    rows and no weighting, and the map learns; with the distillation defaults (25% diagonal,
    adaptive weighting) the same run collapsed onto the identity map, whose one jump barely moves
    the noise."""
    guard = DivergenceGuard()
    _, before, after, moved = _train_from_scratch(LagrangianLoss(), guard=guard)
    assert after < 0.85 * before and moved > 0.3, (before, after, moved)
    assert guard.last_ratio < 3 and guard.last_good_step == 590


def test_the_distillation_defaults_collapse_from_scratch_which_is_why_they_are_refused(
    monkeypatch,
):
    """The cause, shown: let the refused settings through and the identity map wins."""
    old = LagrangianLoss(
        pairs=TimePairSampler(eta=0.25), weighting=LossWeighting("adaptive", p=0.5)
    )
    with pytest.raises(ValueError, match="pairs.eta = 0.25 the off-diagonal rows"):
        old(FlowMap(MLP((2,), 8, 1)), torch.randn(8, 2))
    monkeypatch.setattr(LagrangianLoss, "trivial_at_identity", False)
    _, before, after, moved = _train_from_scratch(old)
    assert moved < 0.15 and after > 0.9 * before, (before, after, moved)


@pytest.mark.parametrize(
    "loss",
    [
        LagrangianLoss(pairs=TimePairSampler(eta=0.75), weighting=LossWeighting("learned")),
        EulerianLoss(
            form="regression", pairs=TimePairSampler(eta=0.75), weighting=LossWeighting("learned")
        ),
        SemigroupLoss(pairs=TimePairSampler(eta=0.3)),
    ],
)
def test_settings_that_collapse_from_scratch_are_refused_and_kept_for_distillation(loss):
    fm, x1 = FlowMap(MLP((2,), 8, 1)), torch.randn(8, 2)
    with pytest.raises(
        ValueError, match="identity map fits exactly|pull the map onto the identity"
    ):
        loss(fm, x1)
    teacher = FlowMap(MLP((2,), 8, 1)).velocity
    assert torch.isfinite(loss(fm, x1, teacher)["loss"])


def test_unset_defaults_depend_on_the_teacher_and_meanflow_keeps_its_own():
    loss = LagrangianLoss()
    with_teacher, scratch = loss.settings(True), loss.settings(False)
    assert (with_teacher[0].eta, with_teacher[1].kind) == (0.25, "adaptive")
    assert (scratch[0].eta, scratch[1].kind) == (0.75, "none")
    given = LagrangianLoss(pairs=TimePairSampler(eta=0.6), weighting=LossWeighting("adaptive"))
    assert given.settings(False) == given.settings(True)
    # MeanFlow's target holds the data's velocity: no trivial minimiser, a learned weighting is fine
    mf = MeanFlowLoss(pairs=TimePairSampler(eta=0.25), weighting=LossWeighting("learned"))
    assert torch.isfinite(mf(FlowMap(MLP((2,), 8, 1)), torch.randn(8, 2))["loss"])


def test_the_guard_stops_a_run_that_leaves_the_data_scale_and_keeps_the_last_good_weights():
    torch.manual_seed(0)
    fm = FlowMap(MLP((2,), 16, 2))
    guard = DivergenceGuard(max_scale=100, every=5)
    x1 = 2 * torch.randn(64, 2)
    for k in range(6):
        assert (guard(fm, x1, step=k) is not None) == (k % 5 == 0)
    assert guard.last_good_step == 5 and guard.data_rms == pytest.approx(2, rel=0.2)
    good = {k: v.clone() for k, v in fm.state_dict().items()}
    with torch.no_grad():
        fm.net.out[-1].weight.mul_(1e4)  # a runaway update
        fm.net.out[-1].bias.add_(1e4)
    with pytest.raises(
        DivergenceError, match=r"diverged at step 10: one jump from noise lands"
    ) as err:
        for k in range(6, 11):
            guard(fm, x1, step=k)
    assert "guard.last_good" in str(err.value) and "step 5" in str(err.value)
    fm.load_state_dict(guard.last_good)
    assert all(torch.equal(fm.state_dict()[k], v) for k, v in good.items())
    with pytest.raises(DivergenceError, match="The loss is nan at step 11"):
        guard(fm, x1, step=11, loss=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="max_scale must exceed 1"):
        DivergenceGuard(max_scale=0.5)


class _RunawayAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                last = [m for m in module.net.modules() if isinstance(m, nn.Linear)][-1]
                last.bias.add_(1e5)  # a finite loss, a map far off the data's scale


@pytest.mark.slow
def test_a_lightning_run_that_diverges_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path,
):
    cli = cli_main(
        [
            "--config",
            "recipes/presets/lsd.yaml",
            *TINY_NET,
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.batch_size=64",
            "--checkpoint.every_n_train_steps=5",
            "--trainer.max_steps=40",
            "--trainer.val_check_interval=100",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(_RunawayAt(12))
    with pytest.raises(DivergenceError, match=r"diverged at step 15: one jump from noise") as err:
        cli.trainer.fit(cli.model, cli.datamodule)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert f"The last good checkpoint is {last}" in str(err.value)
    assert read_checkpoint(last)["global_step"] == 10  # step 15's save was refused
    good = load_module(FlowMapModule, last)
    guard = DivergenceGuard()
    assert guard(good.student, torch.randn(64, 2), step=0) < 10


#: every preset that trains from scratch (no teacher)
SCRATCH = [n for n, p in PRESETS.items() if not p.needs_teacher]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRATCH)
def test_every_from_scratch_preset_learns_a_2d_target_without_diverging(name):
    """300 steps of each preset's defaults on eight Gaussians with a small MLP: one jump's W2 ends
    well below the untrained map's, and the guard never fires."""
    torch.manual_seed(0)
    fm, loss = FlowMap(MLP((2,), width=64, depth=2)), build_loss(name)
    one_time = loss.pairs.one_time
    ref = toy2d_sample("8gaussians", 1000, torch.Generator().manual_seed(2))
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3))

    def w2():
        with torch.no_grad():
            if one_time:
                x = sample_consistency(fm, z, fm.path, steps=1).x
            else:
                x = sample_flow_map(fm, z, steps=1).x
        return wasserstein2(x, ref)

    before = w2()
    opt = torch.optim.Adam([*fm.parameters(), *loss.parameters()], lr=2e-3)
    guard, g = DivergenceGuard(keep=False), torch.Generator().manual_seed(1)
    for k in range(300):
        x1 = toy2d_sample("8gaussians", 256, g)
        out = loss(fm, x1, None, step=k)
        guard(fm, x1, step=k, loss=out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = w2()
    # sCT regresses the one-time map onto the noisy conditional velocity and learns slowest
    assert after < (0.7 if name == "sct" else 0.6) * before, (name, before, after)
