"""Foreign teachers (flowmap.teachers): the Gaussian-mixture oracle written in every convention
converts to the exact velocity, DDIM is Euler, a schedule change keeps the ODE's endpoint, and bad
input is one sentence."""

import math

import pytest
import torch

from flowmap.losses import LagrangianLoss
from flowmap.ode import sample_flow_map, solve_adaptive, solve_ode
from flowmap.oracles import GaussianMixtureTarget
from flowmap.teachers import (
    DiffusionTeacher,
    DiscreteVPSchedule,
    EDMDenoiser,
    FunctionSchedule,
    native_schedule,
)

F64 = torch.float64
TARGET = GaussianMixtureTarget.ring(dtype=F64)


def oracle(schedule, prediction, target=TARGET):
    """The mixture's exact ``prediction`` at ``(x_τ, τ)`` on ``schedule`` (from its denoiser)."""
    s = native_schedule(schedule)

    def model(x, tau):
        a, g = s.coefficients(tau)
        x1 = target.denoise(x, a.to(x.dtype), g.to(x.dtype))
        a, g = a[:, None], g[:, None]
        eps = torch.where(g > 0, (x - a * x1) / g, 0.0)  # the noise is undefined at zero noise
        if prediction == "epsilon":
            return eps
        if prediction == "sample":
            return x1
        if prediction == "v_prediction":
            return a * eps - g * x1
        if prediction == "score":
            return -eps / g
        da, dg = (d[:, None] for d in s.derivatives(tau))
        return da * x1 + dg * eps

    return model


def points(n=256, lo=0.0, hi=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, 2, generator=g, dtype=F64)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    return x, t


CONVENTIONS = [
    # (schedule, prediction, extra arguments): every convention the issue names, and more
    ("ddpm_linear", "epsilon", {"clip": True}),  # DDPM: discrete VP, noise at τ = 999
    ("squaredcos_cap_v2", "epsilon", {"clip": True}),
    ("scaled_linear", "v_prediction", {"clip": True}),
    ("edm", "sample", {"clip": True}),  # EDM denoiser D(x; σ), x = x1 + σ ε
    ("vp_cosine", "v_prediction", {}),  # Salimans–Ho v on the cosine schedule
    ("rectified_flow", "velocity", {}),  # SD3/Flux: x = (1-τ) x1 + τ ε, u = ε - x1
    ("linear", "velocity", {}),  # TorchCFM / Meta flow_matching
    ("cosine", "sample", {"clip": True, "tau_range": (0.0, 0.999)}),
    ("ddpm_linear", "score", {"clip": True}),
    ("edm", "velocity", {"clip": True}),  # dx/dσ = ε̂: a constant a_τ = 1 has no derivative graph
]


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("schedule,prediction,kw", CONVENTIONS)
def test_every_convention_converts_to_the_exact_velocity(schedule, prediction, kw, path):
    teacher = DiffusionTeacher(oracle(schedule, prediction), prediction, schedule, path=path, **kw)
    # inside the schedule's SNR range (a discrete or EDM schedule stops short of both ends)
    lo, hi = (
        teacher.student_time(torch.tensor(v, dtype=F64)).item() for v in teacher.log_snr_range
    )
    x, t = points(lo=max(lo, 1e-3), hi=min(hi, 1 - 1e-3))
    exact = DiffusionTeacher  # noqa: F841 (the student's own oracle below is independent code)
    want = GaussianMixtureTarget(TARGET.weights, TARGET.means, TARGET.stds, path).velocity(x, t)
    got = teacher(x, t)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_the_native_time_has_the_students_snr_and_rectified_flows_take_1000_sigma():
    teacher = DiffusionTeacher(
        lambda x, tau: oracle("rectified_flow", "velocity")(x, tau / 1000),
        "velocity",
        "rectified_flow",
        timestep_scale=1000.0,
    )
    x, t = points()
    torch.testing.assert_close(teacher(x, t), TARGET.velocity(x, t), rtol=1e-9, atol=1e-9)
    # linear student, rectified-flow model: τ = 1 - t exactly
    torch.testing.assert_close(teacher.native_time(t), 1 - t, rtol=0, atol=1e-12)


def test_a_schedule_given_as_two_functions_is_inverted_by_bisection():
    # a VP schedule with no named form: a = exp(-τ²), g = sqrt(1 - a²), noise at τ = 3
    alpha = lambda tau: torch.exp(-(tau**2))  # noqa: E731
    sigma = lambda tau: torch.sqrt(1 - torch.exp(-2 * tau**2))  # noqa: E731
    s = FunctionSchedule(alpha, sigma, 0.05, 3.0)
    assert (s.tau_noise, s.tau_data) == (3.0, 0.05)

    def model(x, tau):
        a, g = s.coefficients(tau)
        x1 = TARGET.denoise(x, a, g)
        return (x - a[:, None] * x1) / g[:, None]

    teacher = DiffusionTeacher(
        model, "epsilon", alpha=alpha, sigma=sigma, tau_range=(0.05, 3.0), clip=True
    )
    lo, hi = (
        teacher.student_time(torch.tensor(v, dtype=F64)).item() for v in teacher.log_snr_range
    )
    x, t = points(lo=lo, hi=hi)
    torch.testing.assert_close(teacher(x, t), TARGET.velocity(x, t), rtol=1e-9, atol=1e-9)


def test_edm_preconditioning_rebuilds_the_denoiser_from_its_raw_network():
    sd = 0.5

    def raw(x_in, c_noise):  # F = (D - c_skip x) / c_out, with x = x_in / c_in
        sigma = torch.exp(4 * c_noise)
        s = sigma[:, None]
        x = x_in * (s**2 + sd**2).sqrt()
        d = TARGET.denoise(x, torch.ones_like(sigma), sigma)
        return (d - sd**2 / (s**2 + sd**2) * x) / (s * sd / (s**2 + sd**2).sqrt())

    teacher = DiffusionTeacher(EDMDenoiser(raw, sd), "sample", "edm", clip=True)
    x, t = points(lo=0.05, hi=0.95)
    torch.testing.assert_close(teacher(x, t), TARGET.velocity(x, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("nfe", [1, 2, 5, 10])
def test_ddim_on_its_timestep_grid_is_euler_of_the_converted_velocity(nfe):
    teacher = DiffusionTeacher(
        oracle("ddpm_linear", "epsilon"),
        "epsilon",
        "ddpm_linear",
        clip=True,
        integer_timesteps=True,
    )
    taus, grid = teacher.ddim_times(nfe)
    assert taus[0] == 999 and bool((taus == taus.round()).all())  # diffusers' trailing timesteps
    x0 = torch.randn(128, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    ddim = teacher.ddim(x0, nfe)
    euler = solve_ode(teacher, x0, "euler", grid=grid)
    assert ddim.nfe == euler.nfe == nfe
    torch.testing.assert_close(ddim.x, euler.x, rtol=1e-12, atol=1e-12)
    # through the Sampler interface too
    torch.testing.assert_close(teacher.generate(x0, nfe, "ddim").x, ddim.x, rtol=0, atol=0)


def test_a_schedule_change_leaves_the_exact_odes_endpoint_unchanged():
    """The same model (v on the cosine VP schedule) integrated through the linear student path,
    the cosine student path and its own time τ (1 = noise): at equal SNR the three states are one
    point rescaled, x_τ = (g_τ/σ_t) x_t, so the samples do not change, only the path."""
    x0 = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    lam = torch.tensor([6.0], dtype=F64)  # the end: SNR e^6, noise scale 0.0025 of the signal
    tol = {"rtol": 1e-10, "atol": 1e-10}
    ends = []
    for path in ("linear", "cosine"):
        teacher = DiffusionTeacher(
            oracle("vp_cosine", "v_prediction"), "v_prediction", "vp_cosine", path=path
        )
        t_end = teacher.student_time(lam).item()
        x = solve_adaptive(teacher, x0, t1=t_end, **tol).x
        ends.append(x / teacher.path.schedule(torch.tensor(t_end, dtype=F64)).sigma)
    s = native_schedule("vp_cosine")
    tau_end = s.log_snr_inverse(lam).item()
    model = oracle("vp_cosine", "velocity")  # the model's own ODE: dx/dτ = ȧ x̂1 + ġ ε̂
    x = solve_adaptive(model, x0, t0=1.0, t1=tau_end, **tol).x
    ends.append(x / s.coefficients(torch.tensor(tau_end, dtype=F64))[1])
    for other in ends[1:]:
        torch.testing.assert_close(other, ends[0], rtol=1e-6, atol=1e-6)
    # the paths differ on the way: halfway in each path's own time the states are different points
    mid = [
        solve_adaptive(
            DiffusionTeacher(
                oracle("vp_cosine", "v_prediction"), "v_prediction", "vp_cosine", path=p
            ),
            x0,
            t1=0.5,
            **tol,
        ).x
        for p in ("linear", "cosine")
    ]
    assert (mid[0] - mid[1]).abs().max() > 0.1


def test_one_schedule_family_foreign_schedules_reuse_flowmaps_linear_and_cosine():
    from flowmap.paths import CosineSchedule, LinearSchedule, Schedule

    assert type(native_schedule("linear")) is LinearSchedule
    assert type(native_schedule("cosine")) is CosineSchedule
    # rectified flow (SD3, T = 1000) is the linear schedule run from data to noise
    rf = native_schedule("rectified_flow", num_train_timesteps=1000)
    tau = torch.linspace(0, 1000, 11, dtype=F64)
    a, g = rf.coefficients(tau)
    assert torch.equal(a, 1 - tau / 1000) and torch.equal(g, tau / 1000)
    assert (rf.tau_noise, rf.tau_data) == (1000.0, 0.0)
    # v-diffusion's VP cosine is the cosine schedule run the same way
    vp = native_schedule("vp_cosine")
    u = tau / 1000
    a, g = vp.coefficients(u)
    assert torch.equal(a, torch.cos(math.pi / 2 * u)) and torch.equal(g, torch.sin(math.pi / 2 * u))
    for s, inner in ((rf, tau[1:-1]), (vp, u[1:-1])):
        # closed-form derivatives and inverse agree with the family's defaults (autograd, bisection)
        for mine, default in zip(s.derivatives(tau), Schedule.derivatives(s, tau), strict=True):
            torch.testing.assert_close(mine, default, rtol=1e-12, atol=0)
        lam = s.log_snr(inner)
        torch.testing.assert_close(s.log_snr_inverse(lam), inner, rtol=0, atol=1e-9)
        torch.testing.assert_close(Schedule.log_snr_inverse(s, lam), inner, rtol=0, atol=1e-9)


def test_discrete_schedules_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for name, kw in [
        ("linear", {}),
        ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("squaredcos_cap_v2", {}),
    ]:
        ours = (
            DiscreteVPSchedule.from_betas(name, **kw) if kw else DiscreteVPSchedule.from_betas(name)
        )
        theirs = diffusers.DDPMScheduler(beta_schedule=name, **kw).alphas_cumprod.double()
        torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=2e-5, atol=1e-7)
        k = torch.arange(1000, dtype=F64)
        a, g = ours.coefficients(k)
        torch.testing.assert_close(a**2, ours.alphas_cumprod, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            ours.log_snr_inverse(ours.log_snr(k + 0.3).clamp(max=float(ours.log_snr(k[:1])))),
            (k + 0.3).clamp(max=999),
            rtol=0,
            atol=1e-9,
        )


# ------------------------------------------------------------------------------ bad input
def test_an_unknown_prediction_or_schedule_is_one_sentence():
    with pytest.raises(ValueError, match="Unknown prediction 'eps'.*epsilon, sample, v_prediction"):
        DiffusionTeacher(lambda x, t: x, "eps", "ddpm_linear", clip=True)
    with pytest.raises(ValueError, match="Unknown schedule 'ddpm'; choose one of"):
        DiffusionTeacher(lambda x, t: x, "epsilon", "ddpm")
    with pytest.raises(ValueError, match="either by name .* or as both alpha= and sigma="):
        DiffusionTeacher(lambda x, t: x, "epsilon", "edm", alpha=lambda t: t)
    with pytest.raises(ValueError, match="Unknown beta schedule 'cosine'"):
        DiscreteVPSchedule.from_betas("cosine")


def test_a_schedule_that_stops_short_of_the_students_times_says_which_end_and_what_to_clip():
    with pytest.raises(ValueError) as err:
        DiffusionTeacher(lambda x, t: x, "epsilon", "ddpm_linear")
    msg = str(err.value)
    assert "does not reach the student's noise and data end" in msg
    assert "noisiest time τ = 999 has log-SNR -5.06" in msg and "t < 0.006" in msg
    assert "cleanest time τ = 0 has log-SNR 4.61" in msg and "t > 0.99" in msg
    assert "pass clip=True" in msg and msg.count(".") <= 8
    with pytest.raises(ValueError, match=r"sigma_max|τ = 80 has log-SNR"):
        DiffusionTeacher(lambda x, t: x, "sample", "edm")
    # an ε-model at exactly zero SNR has no data estimate: clipping needs a finite end
    with pytest.raises(
        ValueError, match=r"ends at τ = 1, where the epsilon prediction .* tau_range=\[0, 0.999\]"
    ):
        DiffusionTeacher(lambda x, t: x, "epsilon", "vp_cosine", clip=True)
    with pytest.raises(ValueError, match="tau_range .* lies outside"):
        DiffusionTeacher(lambda x, t: x, "epsilon", "ddpm_linear", tau_range=(0, 2000), clip=True)


def test_ddim_refuses_more_steps_than_the_schedule_has():
    teacher = DiffusionTeacher(
        oracle("ddpm_linear", "epsilon"), "epsilon", "ddpm_linear", clip=True, tau_range=(0, 500)
    )
    taus, _ = teacher.ddim_times(4)
    assert taus.tolist() == [500, 375, 249, 124]  # trailing spacing over the range, no repeats
    with pytest.raises(
        ValueError, match="DDIM cannot take 502 steps on a schedule of 501 timesteps"
    ):
        teacher.ddim_times(502)


def test_clipping_evaluates_beyond_an_end_at_that_end():
    teacher = DiffusionTeacher(
        oracle("ddpm_linear", "epsilon"), "epsilon", "ddpm_linear", clip=True
    )
    t = torch.tensor([0.0, 1e-4, 0.5, 1.0], dtype=F64)
    tau = teacher.native_time(t)
    assert tau[0] == tau[1] == 999 and tau[3] == 0 and 0 < tau[2] < 999
    x = torch.randn(4, 2, dtype=F64)
    assert torch.isfinite(teacher(x, t)).all()


def test_a_model_whose_output_shape_differs_from_its_input_is_one_sentence():
    teacher = DiffusionTeacher(
        lambda x, t: torch.cat([x, x], 1), "epsilon", "ddpm_linear", clip=True
    )
    with pytest.raises(
        ValueError, match=r"returned shape \[3, 4\] for input \[3, 2\].*learned_variance=True"
    ):
        teacher(torch.randn(3, 2), torch.rand(3))
    split = DiffusionTeacher(
        lambda x, t: torch.cat([x, x], 1),
        "epsilon",
        "ddpm_linear",
        clip=True,
        learned_variance=True,
    )
    assert split(torch.randn(3, 2), torch.rand(3)).shape == (3, 2)
    with pytest.raises(ValueError, match="returned a str, not a tensor"):
        DiffusionTeacher(lambda x, t: "no", "epsilon", "ddpm_linear", clip=True)(
            torch.randn(3, 2), torch.rand(3)
        )


def test_labels_follow_flowmaps_null_class_convention():
    seen = {}

    def model(x, tau, class_labels):
        seen["y"] = class_labels
        return x * 0

    teacher = DiffusionTeacher(
        model,
        "epsilon",
        "ddpm_linear",
        clip=True,
        num_classes=3,
        null_class=3,
        label_keyword="class_labels",
    )
    x = torch.randn(2, 2)
    teacher(x, torch.rand(2), y=torch.tensor([1, -1]))
    assert seen["y"].tolist() == [1, 3]
    teacher(x, torch.rand(2), y=torch.tensor([1, 2]), w=torch.tensor([2.0, 2.0]))
    assert seen["y"].tolist() == [1, 2, 3, 3]  # both branches in one batch
    with pytest.raises(ValueError, match="class-conditional .* give labels y"):
        teacher(x, torch.rand(2))
    no_null = DiffusionTeacher(
        model, "epsilon", "ddpm_linear", clip=True, num_classes=3, label_keyword="class_labels"
    )
    with pytest.raises(ValueError, match="no null class"):
        no_null(x, torch.rand(2), y=torch.tensor([1, -1]))
    assert math.isfinite(float(teacher(x, torch.rand(2), y=torch.tensor([0, 1])).sum()))


@pytest.mark.slow
def test_a_ddpm_teacher_distils_through_the_unchanged_losses():
    """The ε-oracle on DDPM's discrete schedule (clipped at its ends), in float32 as a network
    runs, distilled by the default Lagrangian loss exactly as tests/test_distill.py distils the
    exact teacher (same problem, steps and bound 0.17 of the radius; one Euler step: 1.03)."""
    from tests.test_distill import RADIUS, distil, rms_error

    gmm = GaussianMixtureTarget.ring(k=4, radius=RADIUS, std=0.3)
    teacher = DiffusionTeacher(
        oracle("ddpm_linear", "epsilon", gmm), "epsilon", "ddpm_linear", clip=True
    )
    teacher.sample = gmm.sample  # the loop draws data from the teacher
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    fm = distil(teacher, LagrangianLoss())
    with torch.no_grad():
        err = rms_error(sample_flow_map(fm, x0, steps=1).x, gmm.flow_map(x0, 0.0, 1.0))
    assert err < 0.17, err
