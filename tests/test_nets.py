import pytest
import torch

from flowmap.flowmap import FlowMap
from flowmap.losses import cfm_loss
from flowmap.nets import MLP, TwoTimeEmbedding, UNet
from flowmap.oracles import GaussianMixtureTarget
from flowmap.paths import AffinePath


@pytest.mark.parametrize("size,channels,mult", [(8, 1, (1, 2)), (32, 3, (1, 2, 2))])
def test_unet_takes_x_s_t_at_8_and_32(size, channels, mult):
    net = UNet(
        image_size=size,
        in_channels=channels,
        channels=16,
        channel_mult=mult,
        num_res_blocks=1,
        attention_resolutions=(size // 2,),
    )
    x = torch.randn(3, channels, size, size)
    s, t = torch.rand(3), torch.rand(3)
    assert net(x, s, t).shape == x.shape


def test_channels_last_unet_is_the_same_function_with_nhwc_weights():
    torch.manual_seed(0)
    kw = dict(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1)
    plain, nhwc = UNet(**kw), UNet(**kw, channels_last=True)
    for p in plain.parameters():
        p.data.normal_(0, 0.2)  # the zero-initialised output layers too
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.inp.weight.is_contiguous(memory_format=torch.channels_last)
    x, s, t = torch.randn(4, 1, 8, 8), torch.rand(4), torch.rand(4)
    out = nhwc(x, s, t)
    assert out.is_contiguous() and out.abs().mean() > 0.1
    assert torch.allclose(out, plain(x, s, t), atol=1e-5)


def test_unet_refuses_an_image_size_it_cannot_take():
    with pytest.raises(ValueError, match="needs an image size divisible by 4, got 10"):
        UNet(image_size=10, channel_mult=(1, 2, 2))
    net = UNet(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1)
    with pytest.raises(ValueError, match=r"built for images \(B, 1, 8, 8\)"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2), torch.rand(2))


def test_mlp_refuses_a_foreign_data_shape():
    with pytest.raises(ValueError, match=r"built for samples of shape \[2\] but got \[3\]"):
        MLP((2,), width=8, depth=1)(torch.randn(4, 3), torch.rand(4), torch.rand(4))


def test_time_embedding_stays_float32_under_autocast():
    emb = TwoTimeEmbedding(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emb(torch.rand(4), torch.rand(4))
    assert out.dtype == torch.float32


def _cfm_trained_mlp(steps: int = 60) -> MLP:
    """A velocity net trained a few Adam steps by CFM on an 8-Gaussians mixture (so every weight a
    teacher can move has moved)."""
    torch.manual_seed(0)
    gmm = GaussianMixtureTarget.ring()
    net = MLP((2,), width=32, depth=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    path = AffinePath("linear")
    for _ in range(steps):
        opt.zero_grad()
        cfm_loss(lambda x, t: net(x, t, t), gmm.sample(128), path).backward()
        opt.step()
    return net


def test_the_gap_embedding_vanishes_on_the_diagonal_whatever_its_weights():
    emb = TwoTimeEmbedding(16)
    for p in emb.gap.parameters():
        p.data.normal_(0, 1.0)  # a gap branch far from its zero init
    s = torch.rand(32)
    assert torch.equal(emb(s, s), emb.start(emb.features(s)))


def test_warm_start_from_a_trained_teacher_is_the_teacher_on_the_diagonal_and_an_euler_step_off_it():
    teacher = _cfm_trained_mlp()
    fm = FlowMap(MLP((2,), width=32, depth=2)).warm_start(teacher)
    x, s, t = torch.randn(64, 2), torch.rand(64) * 0.5, torch.rand(64) * 0.5 + 0.5
    assert torch.equal(fm.velocity(x, t), teacher(x, t, t))
    # X(s, t, x) = x + (t - s) b_s(x): one Euler step of the teacher
    assert torch.allclose(fm(x, s, t), x + (t - s)[:, None] * teacher(x, s, s), atol=1e-6)


def test_warm_start_into_another_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="teacher's architecture"):
        FlowMap(MLP((2,), width=16, depth=1)).warm_start(MLP((2,), width=32, depth=1))
    # same weights' shapes, other time features: the copy would load silently and be wrong
    with pytest.raises(ValueError, match="buffer 'time.features.freqs' differs"):
        FlowMap(MLP((2,), width=16, depth=1)).warm_start(
            MLP((2,), width=16, depth=1, time_scale=100.0)
        )


class _LabelledNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen = None

    def forward(self, x, s, t, y=None):
        self.seen = y
        return torch.zeros_like(x)


def test_flow_map_passes_conditioning_only_to_nets_that_take_it():
    x, s = torch.randn(4, 2), torch.rand(4)
    labelled = FlowMap(_LabelledNet())
    labelled(x, s, s, y=torch.arange(4))
    assert torch.equal(labelled.net.seen, torch.arange(4))
    plain = FlowMap(MLP((2,), width=8, depth=1))
    assert plain(x, s, s, y=None).shape == x.shape  # None is not passed on
    with pytest.raises(ValueError, match="built without classes"):
        plain(x, s, s, y=torch.arange(4))


def test_a_velocity_call_skips_the_gap_branch_and_keeps_it_in_the_graph():
    """φ(x, t, t) with one time tensor: the gap term g(0) - g(0) = 0 is not computed, the output
    equals the computed one bit for bit, and the branch still gets a (zero) gradient, as DDP needs."""
    emb = TwoTimeEmbedding(16)
    for p in emb.gap.parameters():
        p.data.normal_(0, 1.0)
    t = torch.rand(32)
    fast = emb(t, t)
    assert torch.equal(fast, emb(t, t.clone()))  # s, t equal but not one tensor: computed
    fast.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in emb.gap.parameters())
