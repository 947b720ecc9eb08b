import pytest
import torch

from flowmap.flowmap import FlowMap
from flowmap.losses import (
    EulerianLoss,
    FlowMapLoss,
    LagrangianLoss,
    LossWeighting,
    SemigroupLoss,
    TimePairs,
    TimePairSampler,
    diagonal_residual,
    discrete_eulerian_target,
    eulerian_residual,
    lagrangian_residual,
    semigroup_residual,
)
from flowmap.nets import MLP
from flowmap.oracles import GaussianTarget
from tests.helpers import ExactPhi

NONE = LossWeighting("none")

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
        "eulerian_discrete": fm.phi(x, s, t)
        - discrete_eulerian_target(fm, target.velocity, x, s, t, share=0.5, steps=64),
        "diagonal": diagonal_residual(fm, x, t, target.velocity(x, t)),
    }


def test_every_residual_vanishes_at_the_exact_map_and_not_at_a_perturbed_one(gaussian):
    x = torch.randn(B, 2, dtype=torch.float64)
    s, t = _pairs()
    exact = _residuals(FlowMap(ExactPhi(gaussian)), gaussian, x, s, t)
    perturbed = _residuals(FlowMap(ExactPhi(gaussian, perturb=0.05)), gaussian, x, s, t)
    for name, r in exact.items():
        teacher_steps = name in ("semigroup_teacher", "eulerian_discrete")  # 64 Heun steps
        tol = 1e-3 if teacher_steps else 1e-10
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
    # FlowMap.jvp: d/dt phi and d/dt X, and a mixed tangent (dx, ds, dt) against central differences
    j = fm.jvp(x, s, t, dt=torch.ones_like(t))
    fd = (fm.phi(x, s, t + h) - fm.phi(x, s, t - h)) / (2 * h)
    assert torch.allclose(j.dphi, fd, atol=1e-6)
    assert torch.allclose(j.dX, (fm(x, s, t + h) - fm(x, s, t - h)) / (2 * h), atol=1e-6)
    dx, ds, dt = torch.randn_like(x), torch.randn_like(s), torch.randn_like(t)
    j = fm.jvp(x, s, t, dx=dx, ds=ds, dt=dt)
    fd_x = (fm(x + h * dx, s + h * ds, t + h * dt) - fm(x - h * dx, s - h * ds, t - h * dt)) / (
        2 * h
    )
    assert torch.allclose(j.dX, fd_x, atol=1e-6) and torch.equal(j.X, fm(x, s, t))
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
        LagrangianLoss(),
        EulerianLoss(),
        SemigroupLoss(),
        LagrangianLoss(form="regression"),
        LagrangianLoss(form="backprop"),
        EulerianLoss(form="regression", tangent_norm=0.1, tangent_warmup_steps=10),
        EulerianLoss(form="sg_advective"),
        EulerianLoss(form="full"),
        EulerianLoss(form="discrete", teacher_share=0.25, teacher_steps=2),
        EulerianLoss(form="discrete", teacher_max_gap=None),
        SemigroupLoss(split="uniform"),
        SemigroupLoss(split="midpoint", teacher_gap=0.3),
    ],
    ids=lambda loss: f"{loss.name}-{getattr(loss, 'form', getattr(loss, 'split', ''))}",
)
def test_losses_are_zero_at_exact_map_and_give_finite_gradients(gaussian, loss):
    x1 = gaussian.sample(B)
    loss = loss.double()
    solves = loss.name == "semigroup" or getattr(loss, "form", "") == "discrete"
    if solves:  # the teacher's Heun steps: fine enough that their error is not the map's
        loss.teacher_steps = 16
    torch.manual_seed(1)
    exact = loss(FlowMap(ExactPhi(gaussian)), x1, gaussian.velocity, step=50)
    torch.manual_seed(1)
    perturbed = loss(FlowMap(ExactPhi(gaussian, perturb=0.05)), x1, gaussian.velocity, step=50)
    tol = 1e-5 if solves else 1e-16
    assert exact["loss"].item() < tol, exact
    assert perturbed["loss"].item() > 10 * max(exact["loss"].item(), 1e-12), (exact, perturbed)
    net = MLP((2,), width=16, depth=1).double()
    out = loss(FlowMap(net), x1, gaussian.velocity, step=50)
    assert set(out) == {"loss", "diagonal", loss.name}
    out["loss"].backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def _param_grads(loss, net, x1, teacher, x0, pairs):
    net.zero_grad()
    loss(FlowMap(net), x1, teacher, x0=x0, pairs=pairs)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def test_lagrangian_forms_share_their_value_and_differ_in_gradient_as_derived(gaussian):
    r"""Both forms are :math:`\|r_L\|^2` in value; their gradients differ by the term through the JVP:
    backprop gives :math:`2 r\cdot\partial_\theta(\phi + (t-s)\partial_t\phi)`, regression
    :math:`2 r\cdot\partial_\theta\phi`. Check both against those formulas, built by hand."""
    torch.manual_seed(0)
    x1 = gaussian.sample(B)
    net = MLP((2,), width=16, depth=1).double()
    for p in net.parameters():  # off the zero init, so the gap branch (hence ∂_t φ) matters
        p.data.normal_(0, 0.3)
    x0 = torch.randn_like(x1)
    s, t = _pairs()
    pairs = TimePairs(s, t, torch.zeros(B, dtype=torch.bool))
    v = gaussian.velocity
    backprop = _param_grads(
        LagrangianLoss(form="backprop", weighting=NONE).double(), net, x1, v, x0, pairs
    )
    regression = _param_grads(
        LagrangianLoss(form="regression", weighting=NONE).double(), net, x1, v, x0, pairs
    )
    x_s = gaussian.path.sample(x0, x1, s).x_t
    fm = FlowMap(net)
    r, phi = lagrangian_residual(fm, v, x_s, s, t)
    a = LagrangianLoss(form="backprop", weighting=NONE).double()(fm, x1, v, x0=x0, pairs=pairs)[
        "loss"
    ]
    b = LagrangianLoss(form="regression", weighting=NONE).double()(fm, x1, v, x0=x0, pairs=pairs)[
        "loss"
    ]
    assert torch.allclose(a, b)  # same value ...
    params = [p for p in net.parameters()]
    n = r[0].numel() * B
    by_hand_regression = torch.autograd.grad(
        (2 * r.detach() * phi).sum() / n, params, retain_graph=True
    )
    by_hand_backprop = torch.autograd.grad((r**2).sum() / n, params)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert torch.allclose(regression, flat(by_hand_regression), atol=1e-10)
    assert torch.allclose(backprop, flat(by_hand_backprop), atol=1e-10)
    # ... and the gradients differ by the JVP's term, which is not small here
    assert (backprop - regression).norm() > 0.05 * backprop.norm()


def test_pair_sampler_shapes_diagonal_and_curriculum():
    p = TimePairSampler("uniform", eta=0.25)(100)
    assert p.diagonal.sum() == 25 and torch.equal(p.s[p.diagonal], p.t[p.diagonal])
    assert (p.s[~p.diagonal] < p.t[~p.diagonal]).all()
    cur = TimePairSampler("gap", eta=0.0, gap_start=0.1, max_gap=1.0, gap_warmup_steps=100)
    early, late = cur(2000, step=0), cur(2000, step=100)
    assert (early.t - early.s).max() <= 0.1 + 1e-6
    assert (late.t - late.s).max() > 0.5
    assert (late.t <= 1 + 1e-6).all() and (late.s >= 0).all()
    back = TimePairSampler(eta=0.0, backward_fraction=0.5)(1000)
    assert 0.3 < (back.s > back.t).float().mean() < 0.7
    ln = TimePairSampler("logit_normal", eta=0.0, max_gap=0.5, gap_warmup_steps=0)(500)
    assert (ln.t - ln.s).max() <= 0.5 + 1e-6


def test_learned_weighting_left_on_another_device_is_one_sentence():
    """A plain loop that moves the net but not the loss (the sCD preset on CUDA) is told how."""
    w = LossWeighting("learned")
    ell = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match=r"on cpu but the batch on meta; move the loss"):
        w(ell, ell, ell)


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
        (lambda: FlowMapLoss(), "abstract"),
        (lambda: TimePairSampler(eta=1.5), r"eta .* must lie in \[0, 1\]"),
        (lambda: LagrangianLoss(form="exact"), "Unknown Lagrangian form"),
        (lambda: EulerianLoss(form="half"), "Unknown Eulerian form"),
        (lambda: EulerianLoss(form="discrete", teacher_share=0.0), "teacher_share must lie"),
        (lambda: EulerianLoss(form="discrete", teacher_steps=0), "teacher_steps must be"),
        (lambda: EulerianLoss(form="discrete", teacher_max_gap=0.0), "teacher_max_gap must lie"),
        (lambda: SemigroupLoss(split="thirds"), "Unknown semigroup split"),
        (lambda: LossWeighting("focal"), "Unknown loss weighting"),
    ],
)
def test_bad_loss_configs_fail_early(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_diagonal_rows_are_found_by_the_mask_wherever_they_are(gaussian):
    """The loss reads the diagonal from ``TimePairs.diagonal``, not from the row order."""
    torch.manual_seed(0)
    x1 = gaussian.sample(B)
    x0 = torch.randn_like(x1)
    s, t = _pairs()
    mask = torch.zeros(B, dtype=torch.bool)
    mask[::5] = True
    s = torch.where(mask, t, s)
    perm = torch.randperm(B)
    fm = FlowMap(MLP((2,), width=16, depth=1).double())
    loss = LagrangianLoss().double()
    a = loss(fm, x1, gaussian, x0=x0, pairs=TimePairs(s, t, mask))
    b = loss(fm, x1[perm], gaussian, x0=x0[perm], pairs=TimePairs(s[perm], t[perm], mask[perm]))
    for k in ("loss", "diagonal", "lagrangian"):
        assert torch.allclose(a[k], b[k]), k
    with pytest.raises(ValueError, match="one shape"):
        TimePairs(s, t, mask[:-1])
    with pytest.raises(ValueError, match="marked diagonal must have s == t"):
        TimePairs(s, t, ~mask)


def test_a_teacher_on_another_schedule_is_refused(gaussian):
    cosine = GaussianTarget(gaussian.mu, gaussian.c, "cosine")
    fm = FlowMap(MLP((2,), width=16, depth=1).double())  # linear path
    with pytest.raises(ValueError, match="teacher follows the 'cosine' schedule"):
        LagrangianLoss()(fm, gaussian.sample(8), cosine)


def test_every_loss_has_its_measured_defaults_and_one_diagonal_fraction():
    """The defaults chosen by benchmarks/exact_teacher.py (see its report)."""
    for loss in (LagrangianLoss(), EulerianLoss(), SemigroupLoss()):
        assert loss.pairs.eta == TimePairSampler().eta == 0.25
    assert EulerianLoss().weighting.kind == SemigroupLoss().weighting.kind == "none"
    # the Lagrangian's adaptive weighting at power 1/2 (benchmarks/results/exact-teacher/uneven6)
    assert LagrangianLoss().weighting.kind == "adaptive" and LagrangianLoss().weighting.p == 0.5
    assert LagrangianLoss().form == "backprop" and EulerianLoss().form == "discrete"
    assert EulerianLoss().teacher_max_gap == 0.125 and EulerianLoss().teacher_steps == 1
    assert LagrangianLoss(weighting=LossWeighting("adaptive")).weighting.kind == "adaptive"


@pytest.mark.parametrize("loss", [SemigroupLoss(), EulerianLoss(form="discrete")], ids=str)
def test_zero_length_off_diagonal_pair_is_finite(gaussian, loss):
    """An off-diagonal row with s == t (a gap curriculum starting at 0) takes the velocity as its
    chord slope instead of dividing 0 by 0."""
    torch.manual_seed(0)
    fm = FlowMap(MLP((2,), width=16, depth=1).double())
    s = torch.tensor([0.2, 0.5, 0.5, 0.9], dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9], dtype=torch.float64)
    pairs = TimePairs(s, t, torch.tensor([True, False, False, False]))
    out = loss.double()(fm, gaussian.sample(4), gaussian.velocity, pairs=pairs)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out[loss.name])


def test_discrete_eulerian_tends_to_the_eulerian_residual(gaussian):
    """Moving the start time by a share δ of the jump, target - φ = δ·r_E + O(δ²): consistency
    distillation's continuous-time limit is the Eulerian residual (LSD paper, App. C.1)."""
    torch.manual_seed(0)
    fm = FlowMap(MLP((2,), width=32, depth=2).double())
    x = torch.randn(B, 2, dtype=torch.float64)
    s, t = _pairs()
    r, phi = eulerian_residual(fm, gaussian.velocity, x, s, t)  # r = -r_E
    gaps = []
    for share in (1e-3, 1e-4):
        target = discrete_eulerian_target(fm, gaussian.velocity, x, s, t, share=share)
        gaps.append(((target - phi) / share + r).abs().max().item())
    assert r.abs().mean() > 1e-2  # an untrained map: the residual is not small
    assert gaps[1] < 1e-3 and gaps[1] < gaps[0] / 5, gaps  # O(δ)


def test_discrete_eulerian_max_gap_caps_the_teachers_move_only_on_long_jumps(gaussian):
    """With ``max_gap`` Δ the teacher moves min(δ(t−s), Δ): a long jump's target is the uncapped
    target at the share Δ/(t−s); a short jump's is unchanged."""
    torch.manual_seed(0)
    fm = FlowMap(MLP((2,), width=32, depth=2).double())
    x = torch.randn(2, 2, dtype=torch.float64)
    s = torch.tensor([0.0, 0.5], dtype=torch.float64)
    t = torch.tensor([1.0, 0.6], dtype=torch.float64)

    def target(share, rows, max_gap=None):
        return discrete_eulerian_target(
            fm, gaussian.velocity, x[rows], s[rows], t[rows], share=share, max_gap=max_gap
        )

    capped = discrete_eulerian_target(fm, gaussian.velocity, x, s, t, share=0.5, max_gap=0.2)
    assert torch.allclose(capped[:1], target(0.2, [0]), atol=1e-12)  # long: u = 0 + 0.2
    assert torch.allclose(capped[1:], target(0.5, [1]), atol=1e-12)  # short: u = 0.55
    assert (capped[:1] - target(0.5, [0])).abs().max() > 1e-3  # the cap changed the long jump
