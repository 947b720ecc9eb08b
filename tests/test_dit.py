"""The DiT backbone: images in, images out; its JVP matches a float64 finite difference; it
warm-starts a flow map from a DiT teacher; it learns digits; its recipe fits through the CLI."""

import copy
from pathlib import Path

import pytest
import torch

from flowmap import FlowMap
from flowmap.apps.lightning_cli import cli_main
from flowmap.data import load_digits_split
from flowmap.losses import cfm_loss
from flowmap.nets import DiT
from flowmap.paths import as_path
from flowmap.training import read_checkpoint

RECIPE = Path(__file__).resolve().parents[1] / "recipes/digits/teacher_dit.yaml"
TINY = {"width": 32, "depth": 2, "heads": 2}


def _randomised(net: DiT, keep: str = "") -> DiT:
    """``net`` with every all-zero parameter (adaLN-Zero, the last layer, the gap and scale
    branches) drawn from N(0, 0.2²), except those whose name starts with ``keep``."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.any() and not (keep and name.startswith(keep)):
                p.normal_(0, 0.2)
    return net


@pytest.mark.parametrize("side, ch, patch", [(8, 1, 2), (28, 1, 4), (32, 3, 2)])
def test_dit_maps_images_to_images_and_starts_at_zero(side, ch, patch):
    torch.manual_seed(0)
    net = DiT(side, ch, patch, **TINY)
    x, s, t = torch.randn(3, ch, side, side), torch.rand(3), torch.rand(3)
    assert torch.equal(net(x, s, t), torch.zeros_like(x))  # adaLN-Zero: a fresh DiT is 0
    out = _randomised(net)(x, s, t)
    assert out.shape == x.shape and out.abs().min() > 0  # every pixel reached by unpatchify
    assert "pos" in dict(net.named_buffers()) and "pos" not in net.state_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"image_size": 28, "patch_size": 3},
            r"patch_size 3 does not divide image_size 28; .*\[1, 2, 4, 7\]",
        ),
        ({"size": "M"}, "Unknown DiT size 'M'; choose one of S, B, L, XL"),
        ({"width": 30, "heads": 4}, "width divisible by heads"),
    ],
)
def test_dit_refuses_a_shape_it_cannot_build(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**{"depth": 1, **kwargs})


def test_dit_refuses_an_image_of_another_shape():
    net = DiT(8, 1, 2, **TINY)
    with pytest.raises(
        ValueError, match=r"built for images \(B, 1, 8, 8\) but got \(2, 1, 16, 16\)"
    ):
        net(torch.randn(2, 1, 16, 16), torch.rand(2), torch.rand(2))


COND = {
    "unconditional": {},
    "labels": {"num_classes": 10},
    "guided": {"num_classes": 10, "guidance_input": True},
}


@pytest.mark.parametrize("cond", COND)
@pytest.mark.parametrize("tangent", ["t", "s", "xs"])
def test_dit_jvp_matches_a_float64_finite_difference(cond, tangent):
    torch.manual_seed(0)
    net = _randomised(DiT(8, 1, 2, **TINY, **COND[cond]))
    b = 4
    x, s, t = torch.randn(b, 1, 8, 8), torch.rand(b) * 0.5, torch.rand(b) * 0.5 + 0.5
    kw = {}
    if cond != "unconditional":
        kw["y"] = torch.tensor([0, 3, 9, -1])
    if cond == "guided":
        kw["w"] = torch.tensor([0.0, 1.5, 4.0, 1.0])
    dx = torch.randn_like(x) if "x" in tangent else None
    ds = torch.randn(b) if "s" in tangent else None
    dt = torch.randn(b) if "t" in tangent else None
    got = FlowMap(net).jvp(x, s, t, dx=dx, ds=ds, dt=dt, **kw).dphi

    net64, eps = copy.deepcopy(net).double(), 1e-6

    def phi(h: float) -> torch.Tensor:
        def move(v, d):
            return v.double() + h * d.double() if d is not None else v.double()

        return net64(move(x, dx), move(s, ds), move(t, dt), **kw)

    ref = (phi(eps) - phi(-eps)) / (2 * eps)
    assert ref.norm() > 1e-2 * phi(0.0).norm()  # the derivative is not vacuous
    assert (got.double() - ref).norm() / ref.norm() <= 1e-4


@pytest.mark.parametrize("conditional", [False, True])
def test_warm_start_from_a_dit_teacher_is_the_teacher_on_the_diagonal_and_an_euler_step_off_it(
    conditional,
):
    torch.manual_seed(0)
    args = {"num_classes": 10} if conditional else {}
    # a trained teacher: every layer moved except the gap branch, which diagonal training never moves
    teacher = _randomised(DiT(8, 1, 2, **TINY, **args), keep="time.gap.")
    student = DiT(8, 1, 2, **TINY, **args, guidance_input=conditional)
    fm = FlowMap(student).warm_start(teacher)
    x, s, t = torch.randn(16, 1, 8, 8), torch.rand(16) * 0.5, torch.rand(16) * 0.5 + 0.5
    kw = {"y": torch.randint(0, 10, (16,))} if conditional else {}
    assert torch.equal(fm.velocity(x, t, **kw), teacher(x, t, t, **kw))
    euler = x + (t - s)[:, None, None, None] * teacher(x, s, s, **kw)
    assert torch.allclose(fm(x, s, t, **kw), euler, atol=1e-5)
    assert not torch.allclose(euler, x, atol=1e-3)  # the teacher is not the zero field
    with pytest.raises(ValueError, match="teacher's architecture"):
        FlowMap(DiT(8, 1, 2, **{**TINY, "width": 64}, **args)).warm_start(teacher)


@pytest.mark.slow
def test_a_tiny_dit_learns_digits_by_cfm():
    torch.manual_seed(0)
    x_train = load_digits_split()[0]
    net = DiT(8, 1, 2, width=64, depth=2, heads=4)
    velocity, path = FlowMap(net).velocity, as_path("linear")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(150):
        loss = cfm_loss(velocity, x_train[torch.randint(len(x_train), (64,))], path)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_the_digits_dit_recipe_fits_through_the_cli(tmp_path):
    cli_main(
        [
            "fit",
            "--config",
            str(RECIPE),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.callbacks=[]",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--logger=none",
            "--data.batch_size=32",
        ]
    )
    raw = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert raw["global_step"] == 2
    assert raw["hyper_parameters"]["net"]["class_path"] == "flowmap.nets.DiT"
