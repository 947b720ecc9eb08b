import pytest
import torch

from flowmap.flowmap import FlowMap
from flowmap.losses import (
    EulerianLoss,
    LagrangianLoss,
    SemigroupLoss,
    TimePairSampler,
    diagonal_residual,
    eulerian_residual,
    lagrangian_residual,
    make_loss,
    phi_jvp,
    semigroup_residual,
)
from flowmap.losses.weighting import LossWeighting
from flowmap.nets import MLP
from tests.helpers import ExactPhi

B = 64


def _pairs(n=B, gap_min=0.05):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(n, dtype=torch.float64, generator=g) * (0.9 - gap_min)
    t = s + gap_min + torch.rand(n, dtype=torch.float64, generator=g) * (0.95 - gap_min - s)
    return s, t


def _residuals(fm, target, x, s, t):
    return {
        "lagrangian": lagrangian_residual(fm, target.velocity, x, s, t)[0],
        "eulerian": eulerian_residual(fm, target.velocity, x, s, t)[0],
        "semigroup_mid": semigroup_residual(
            fm, target.velocity, x, s, t, gamma=torch.full_like(s, 0.5)
        )[0],
        "semigroup_uniform": semigroup_residual(
            fm, target.velocity, x, s, t, gamma=torch.rand_like(s)
        )[0],
        "semigroup_teacher": semigroup_residual(
            fm,
            target.velocity,
            x,
            s,
            t,
            gamma=torch.full_like(s, 0.5),
            teacher_gap=1.0,
            teacher_steps=64,
        )[0],
        "diagonal": diagonal_residual(fm, x, t, target.velocity(x, t)),
    }


def test_every_residual_vanishes_at_the_exact_map_and_not_at_a_perturbed_one(gaussian):
    x = torch.randn(B, 2, dtype=torch.float64)
    s, t = _pairs()
    exact = _residuals(FlowMap(ExactPhi(gaussian)), gaussian, x, s, t)
    perturbed = _residuals(FlowMap(ExactPhi(gaussian, perturb=0.05)), gaussian, x, s, t)
    for name, r in exact.items():
        tol = 1e-3 if name == "semigroup_teacher" else 1e-10  # teacher: 64 Heun steps
        assert r.abs().max() < tol, (name, r.abs().max())
        assert perturbed[name].abs().mean() > 1e-3, name


def test_backward_pairs_also_vanish(gaussian):
    """s > t (data → noise) is allowed; the residuals still characterise the map there."""
    x = torch.randn(B, 2, dtype=torch.float64)
    t, s = _pairs()
    fm = FlowMap(ExactPhi(gaussian))
    assert lagrangian_residual(fm, gaussian.velocity, x, s, t)[0].abs().max() < 1e-10
    assert eulerian_residual(fm, gaussian.velocity, x, s, t)[0].abs().max() < 1e-10


def test_jvp_residuals_agree_with_finite_differences(gaussian):
    net = MLP((2,), width=32, depth=2).double()
    fm = FlowMap(net)
    x = torch.randn(B, 2, dtype=torch.float64)
    s, t = _pairs()
    h = 1e-6
    # Lagrangian: d/dt X(s, t, x)
    _, dphi_dt = phi_jvp(fm, x, s, t, dt=torch.ones_like(t))
    fd = (fm.phi(x, s, t + h) - fm.phi(x, s, t - h)) / (2 * h)
    assert torch.allclose(dphi_dt, fd, atol=1e-6)
    r_l, phi = lagrangian_residual(fm, gaussian.velocity, x, s, t)
    d_t_X = (fm(x, s, t + h) - fm(x, s, t - h)) / (2 * h)
    assert torch.allclose(r_l, d_t_X - gaussian.velocity(fm(x, s, t), t), atol=1e-6)
    # Eulerian: r_E = d/dε X(s + ε, t, x + ε b_s(x))
    b = gaussian.velocity(x, s)
    r_e, _ = eulerian_residual(fm, gaussian.velocity, x, s, t)
    fd_e = (fm(x + h * b, s + h, t) - fm(x - h * b, s - h, t)) / (2 * h)
    assert torch.allclose(-r_e, fd_e, atol=1e-6)


@pytest.mark.parametrize(
    "loss",
    [
        LagrangianLoss(form="regression"),
        LagrangianLoss(form="backprop"),
        EulerianLoss(form="regression", tangent_norm=0.1, tangent_warmup_steps=10),
        EulerianLoss(form="sg_advective"),
        EulerianLoss(form="full"),
        SemigroupLoss(split="uniform"),
        SemigroupLoss(split="midpoint", teacher_gap=0.3),
    ],
    ids=lambda l: f"{l.name}-{getattr(l, 'form', getattr(l, 'split', ''))}",
)
def test_losses_are_zero_at_exact_map_and_give_finite_gradients(gaussian, loss):
    x1 = gaussian.sample(B)
    loss = loss.double()
    exact = loss(FlowMap(ExactPhi(gaussian)), x1, gaussian.velocity, step=50)
    tol = 1e-5 if loss.name == "semigroup" else 1e-16  # teacher: 2 Heun steps
    assert exact["loss"].item() < tol, exact
    net = MLP((2,), width=16, depth=1).double()
    out = loss(FlowMap(net), x1, gaussian.velocity, step=50)
    assert set(out) == {"loss", "diagonal", loss.name}
    out["loss"].backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_regression_and_backprop_forms_agree_in_value(gaussian):
    x1 = gaussian.sample(B)
    fm = FlowMap(MLP((2,), width=16, depth=1).double())
    x0 = torch.randn_like(x1)
    pairs = TimePairSampler(eta=0.25)(B)
    pairs.s, pairs.t = pairs.s.double(), pairs.t.double()
    a = LagrangianLoss(form="regression").double()(fm, x1, gaussian.velocity, x0=x0, pairs=pairs)
    b = LagrangianLoss(form="backprop").double()(fm, x1, gaussian.velocity, x0=x0, pairs=pairs)
    assert torch.allclose(a["loss"], b["loss"])


def test_pair_sampler_shapes_diagonal_and_curriculum():
    p = TimePairSampler("uniform", eta=0.25)(100)
    assert p.n_diag == 25 and torch.equal(p.s[:25], p.t[:25])
    assert (p.s[25:] <= p.t[25:]).all()
    cur = TimePairSampler("gap", eta=0.0, gap_start=0.1, max_gap=1.0, gap_warmup_steps=100)
    early, late = cur(2000, step=0), cur(2000, step=100)
    assert (early.t - early.s).max() <= 0.1 + 1e-6
    assert (late.t - late.s).max() > 0.5
    assert (late.t <= 1 + 1e-6).all() and (late.s >= 0).all()
    back = TimePairSampler(eta=0.0, backward_fraction=0.5)(1000)
    assert 0.3 < (back.s > back.t).float().mean() < 0.7
    ln = TimePairSampler("logit_normal", eta=0.0, max_gap=0.5, gap_warmup_steps=0)(500)
    assert (ln.t - ln.s).max() <= 0.5 + 1e-6


def test_learned_weighting_reaches_the_loss_scale():
    w = LossWeighting("learned")
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    s = torch.rand(256)
    for _ in range(200):
        opt.zero_grad()
        w(torch.full((256,), 4.0), s, s).mean().backward()
        opt.step()
    assert abs(w.log_variance(s, s).mean().exp().item() - 4.0) < 0.4  # e^w -> E[loss]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: make_loss("hamiltonian"), "Unknown flow-map loss"),
        (lambda: TimePairSampler(eta=1.5), r"eta .* must lie in \[0, 1\]"),
        (lambda: LagrangianLoss(form="exact"), "Unknown Lagrangian form"),
        (lambda: EulerianLoss(form="half"), "Unknown Eulerian form"),
        (lambda: SemigroupLoss(split="thirds"), "Unknown semigroup split"),
        (lambda: LossWeighting("focal"), "Unknown loss weighting"),
    ],
)
def test_bad_loss_configs_fail_early(make, match):
    with pytest.raises(ValueError, match=match):
        make()
