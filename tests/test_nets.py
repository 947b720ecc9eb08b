import pytest
import torch

from flowmap.flowmap import FlowMap
from flowmap.nets import MLP, TwoTimeEmbedding, UNet


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


def test_warm_start_copy_equals_the_teacher_on_the_diagonal_and_is_an_euler_step_off_it():
    teacher = MLP((2,), width=32, depth=2)
    for p in teacher.parameters():  # make the gap branch non-trivial but keep it zero-initialised
        p.data.normal_(0, 0.3) if p.ndim > 1 else None
    torch.nn.init.zeros_(teacher.time.gap[-1].weight)
    torch.nn.init.zeros_(teacher.time.gap[-1].bias)
    fm = FlowMap.from_velocity_net(teacher)
    x, s, t = torch.randn(16, 2), torch.rand(16) * 0.5, torch.rand(16) * 0.5 + 0.5
    assert torch.allclose(fm.velocity(x, t), teacher(x, t, t))
    # gap branch zero at init: X(s,t,x) = x + (t-s) b_s(x), one Euler step of the teacher
    assert torch.allclose(fm(x, s, t), x + (t - s)[:, None] * teacher(x, s, s), atol=1e-6)
