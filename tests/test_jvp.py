"""JVP methods of FlowMap.jvp: autodiff, finite difference, chunks, precision; and the losses'
choice of them."""

import pytest
import torch

from flowmap.flowmap import FlowMap, JVPMethod
from flowmap.losses import EulerianLoss, LagrangianLoss, MeanFlowLoss, TimePairs
from flowmap.nets import MLP, UNet

FD = JVPMethod("finite_difference")


def _net(dtype=torch.float32, width=64, seed=0) -> MLP:
    """An MLP whose zero-initialised layers (gap branch, output) are randomised, so that its
    derivatives in every input are far from zero."""
    torch.manual_seed(seed)
    net = MLP((2,), width=width, depth=2)
    for p in net.parameters():
        if bool((p == 0).all()):
            p.data.normal_(0, 0.3)
    return net.to(dtype)


def _batch(n=256, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    s = torch.rand(n, generator=g, dtype=dtype) * 0.5
    t = s + torch.rand(n, generator=g, dtype=dtype) * (1 - s)
    return x, s, t


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


TANGENTS = {
    "t": lambda x, s, t: {"dt": torch.ones_like(t)},
    "s": lambda x, s, t: {"ds": torch.ones_like(s)},
    "x,s": lambda x, s, t: {"dx": torch.randn_like(x), "ds": torch.ones_like(s)},
}


@pytest.mark.parametrize("tangent", TANGENTS)
def test_finite_difference_equals_autodiff(tangent):
    """float64 with eps 1e-6: to 1e-8; float32 with the default eps: to 1e-3 (measured 3e-4)."""
    for dtype, method, tol in [
        (torch.float64, JVPMethod("finite_difference", eps=1e-6), 1e-8),
        (torch.float32, FD, 1e-3),
    ]:
        fm = FlowMap(_net(dtype))
        x, s, t = _batch(dtype=dtype)
        tang = TANGENTS[tangent](x, s, t)
        exact = fm.jvp(x, s, t, **tang)
        fd = fm.jvp(x, s, t, method=method, tangent_grad=False, **tang)
        assert _relative(fd.dphi, exact.dphi) < tol, (dtype, _relative(fd.dphi, exact.dphi))
        assert torch.allclose(fd.phi, exact.phi, atol=1e-6) and torch.equal(fd.X, exact.X)
        assert _relative(fd.dX, exact.dX) < tol


def test_a_stop_gradient_tangent_has_no_gradient_and_the_primal_has_the_same_one():
    """tangent_grad=False: φ by an ordinary forward (with gradients), φ̇ under no_grad; a
    finite difference must be asked for that way."""
    fm = FlowMap(_net())
    x, s, t = _batch(16)
    one = torch.ones_like(t)
    both = fm.jvp(x, s, t, dt=one)
    (ref,) = torch.autograd.grad(both.phi.sum(), fm.net.out[-1].weight, retain_graph=True)
    for method in (None, FD):
        j = fm.jvp(x, s, t, dt=one, method=method, tangent_grad=False)
        assert j.phi.requires_grad and not j.dphi.requires_grad
        (g,) = torch.autograd.grad(j.phi.sum(), fm.net.out[-1].weight)
        assert torch.allclose(g, ref, atol=1e-6)
    assert torch.allclose(fm.jvp(x, s, t, dt=one, tangent_grad=False).dphi, both.dphi, atol=1e-6)
    with pytest.raises(ValueError, match="carries no gradient in its tangent; call jvp with"):
        fm.jvp(x, s, t, dt=one, method=FD)


class _TimeGuard(MLP):
    """An MLP that records every time it is evaluated at."""

    def forward(self, x, s, t, **kw):
        self.seen.append(torch.cat([s, t]))
        return super().forward(x, s, t, **kw)


def test_finite_difference_stays_in_the_unit_interval_one_sided_at_its_ends():
    torch.manual_seed(0)
    net = _TimeGuard((2,), width=32, depth=1)
    for p in net.parameters():
        if bool((p == 0).all()):
            p.data.normal_(0, 0.3)
    net.seen = []
    fm = FlowMap(net)
    x = torch.randn(4, 2)
    s, t = torch.tensor([0.0, 0.0, 0.3, 0.5]), torch.tensor([1.0, 0.5, 1.0, 0.7])
    for tang in ({"dt": torch.ones_like(t)}, {"ds": torch.ones_like(s)}):
        fd = fm.jvp(x, s, t, method=FD, tangent_grad=False, **tang)
        exact = fm.jvp(x, s, t, **tang)
        # one-sided rows are first order: O(eps) = 1e-3 relative
        assert _relative(fd.dphi, exact.dphi) < 1e-2
    seen = torch.cat(net.seen)
    assert seen.min() >= 0 and seen.max() <= 1


def test_a_loss_that_backpropagates_through_the_tangent_refuses_a_finite_difference():
    for make in (
        lambda: LagrangianLoss(jvp=FD),
        lambda: EulerianLoss(form="full", jvp=FD),
        lambda: EulerianLoss(form="sg_advective", jvp=FD),
    ):
        with pytest.raises(ValueError, match="back-propagates through the JVP's tangent"):
            make()
    LagrangianLoss(form="regression", jvp=FD)  # stop-gradient targets take it
    EulerianLoss(form="regression", jvp=FD)
    MeanFlowLoss(jvp=FD)


def test_jvp_method_refuses_bad_settings_in_one_sentence():
    with pytest.raises(ValueError, match="Unknown JVP mode 'forward'"):
        JVPMethod("forward")
    with pytest.raises(ValueError, match="eps must be positive"):
        JVPMethod("finite_difference", eps=0.0)
    with pytest.raises(ValueError, match="chunks must be at least 1"):
        JVPMethod(chunks=0)
    with pytest.raises(ValueError, match="apply to autodiff only"):
        JVPMethod("finite_difference", chunks=2)


def _gradients(loss, seed=0):
    """The loss's parameter gradients on one fixed batch (noise, pairs and teacher fixed)."""
    fm = FlowMap(_net(seed=seed))
    teacher = _net(seed=7).requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(128, 2, generator=g)
    x0 = torch.randn(128, 2, generator=g)
    s = torch.rand(128, generator=g) * 0.5
    t = s + torch.rand(128, generator=g) * (1 - s)
    diagonal = torch.arange(128) % 4 == 0
    pairs = TimePairs(torch.where(diagonal, t, s), t, diagonal)

    def velocity(x, t, **c):
        return teacher(x, t, t)

    given = velocity if loss.accepts_teacher else None
    out = loss(fm, x1, given, x0=x0, pairs=pairs, step=100)
    out["loss"].backward()
    return torch.cat([p.grad.flatten() for p in fm.parameters()])


@pytest.mark.parametrize(
    "make",
    [
        lambda jvp: LagrangianLoss(form="regression", jvp=jvp),
        lambda jvp: EulerianLoss(form="regression", jvp=jvp),
        lambda jvp: MeanFlowLoss(jvp=jvp),
        lambda jvp: MeanFlowLoss(tangent="model", jvp=jvp),
    ],
    ids=["lagrangian-regression", "eulerian-regression", "meanflow", "improved-meanflow"],
)
def test_each_stop_gradient_loss_has_the_same_gradient_with_a_finite_difference(make):
    exact, fd = _gradients(make(None)), _gradients(make(FD))
    assert _relative(fd, exact) < 2e-3


def test_chunked_jvp_gives_the_gradients_of_one_pass():
    """Activation checkpointing of the tangent pass changes memory, not the gradient."""
    whole = _gradients(LagrangianLoss())
    chunked = _gradients(LagrangianLoss(jvp=JVPMethod(chunks=4)))
    assert _relative(chunked, whole) < 1e-5


def test_autocast_precision_runs_the_jvp_in_the_autocast_dtype():
    fm = FlowMap(_net())
    x, s, t = _batch(64)
    exact = fm.jvp(x, s, t, dt=torch.ones_like(t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f32 = fm.jvp(x, s, t, dt=torch.ones_like(t))
        low = fm.jvp(x, s, t, dt=torch.ones_like(t), method=JVPMethod(precision="autocast"))
    assert low.dphi.requires_grad
    assert torch.equal(f32.dphi, exact.dphi)  # the default turns autocast off
    err = _relative(low.dphi, exact.dphi)
    assert 1e-4 < err < 5e-2, err  # bf16's rounding, and nothing worse


def test_autocast_precision_is_refused_for_a_net_with_group_norm():
    """torch's forward AD under autocast hands a convolution a float32 tangent after GroupNorm."""
    net = UNet(image_size=8, in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(
        ValueError, match=r"GroupNorm \(UNet\); use JVPMethod\(precision='float32'\)"
    ):
        FlowMap(net).jvp(x, t * 0, t, dt=torch.ones_like(t), method=JVPMethod(precision="autocast"))


def test_fsdp_with_an_autodiff_jvp_loss_is_refused_on_a_torch_that_cannot_run_it():
    from flowmap.losses import SemigroupLoss
    from flowmap.training.flow_map import check_strategy

    class FSDPStrategy:  # stands for lightning's, by name
        pass

    fsdp = FSDPStrategy()
    with pytest.raises(ValueError, match=r"FSDP supports from torch 2.14 on, not 2.11.0\+cu130"):
        check_strategy(fsdp, LagrangianLoss(), "2.11.0+cu130")
    check_strategy(fsdp, LagrangianLoss(), "2.14.1")  # supported
    check_strategy(fsdp, LagrangianLoss(form="regression", jvp=FD), "2.11.0")  # no autodiff JVP
    check_strategy(fsdp, EulerianLoss(), "2.11.0")  # discrete: no JVP
    check_strategy(fsdp, SemigroupLoss(), "2.11.0")
    check_strategy(object(), LagrangianLoss(), "2.11.0")  # DDP and one device: any torch
    assert EulerianLoss(form="regression").autodiff_jvp and MeanFlowLoss().autodiff_jvp


def test_sharding_by_tensor_parallelism_is_refused_in_one_sentence():
    from flowmap.training import FlowMapModule

    class Mesh:  # stands for a (data_parallel, tensor_parallel) device mesh of 1 × 2
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return type("Dim", (), {"size": lambda self: 1 if name == "data_parallel" else 2})()

    module = FlowMapModule(net=MLP((2,), width=8, depth=1))
    module._device_mesh = Mesh()
    with pytest.raises(ValueError, match="shards by data only; give ModelParallelStrategy"):
        module.configure_model()
    module._device_mesh = None
    module.configure_model()  # no mesh: nothing to shard
    assert not type(module.net).__name__.startswith("FSDP")


def test_finite_difference_of_a_guided_class_conditional_map_equals_autodiff():
    """Labels and scales go to both ends of the stencil and are never differentiated."""
    torch.manual_seed(0)
    net = MLP((2,), width=32, depth=1, num_classes=3, guidance_input=True)
    for p in net.parameters():
        if bool((p == 0).all()):
            p.data.normal_(0, 0.3)
    fm = FlowMap(net)
    x, s, t = _batch(64)
    cond = {"y": torch.randint(-1, 3, (64,)), "w": 1 + 3 * torch.rand(64)}
    dx, one = torch.randn_like(x), torch.ones_like(s)
    exact = fm.jvp(x, s, t, dx=dx, ds=one, **cond)
    fd = fm.jvp(x, s, t, dx=dx, ds=one, method=FD, tangent_grad=False, **cond)
    assert _relative(fd.dphi, exact.dphi) < 1e-3
    other = fm.jvp(
        x, s, t, dx=dx, ds=one, method=FD, tangent_grad=False, **{**cond, "y": (cond["y"] + 2) % 3}
    )
    assert _relative(other.dphi, exact.dphi) > 1e-2  # the labels reach the net


def test_a_stop_gradient_tangent_keeps_its_primal_in_float32_under_autocast():
    """precision float32: φ of the no-grad path is the float32 JVP's φ, not a bf16 forward."""
    fm = FlowMap(_net())
    x, s, t = _batch(64)
    one = torch.ones_like(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        both = fm.jvp(x, s, t, dt=one)
        for method in (None, FD):
            j = fm.jvp(x, s, t, dt=one, method=method, tangent_grad=False)
            assert j.phi.dtype == torch.float32
            assert torch.allclose(j.phi, both.phi, atol=1e-6)


def test_a_finite_difference_that_fits_in_the_unit_interval_neither_way_is_refused():
    fm = FlowMap(_net())
    x, one = torch.randn(2, 2), torch.ones(2)
    s, t = torch.tensor([0.0, 0.2]), torch.tensor([1.0, 0.7])  # row 0: s - eps < 0, t + eps > 1
    with pytest.raises(ValueError, match="No finite-difference stencil of eps 0.001 fits"):
        fm.jvp(x, s, t, ds=one, dt=one, method=FD, tangent_grad=False)
    fm.jvp(x[1:], s[1:], t[1:], ds=one[1:], dt=one[1:], method=FD, tangent_grad=False)
