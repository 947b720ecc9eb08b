import math

import pytest
import torch

from flowmap.flowmap import FlowMap
from flowmap.ode import (
    sample_flow_map,
    solve_adaptive,
    solve_between,
    solve_ode,
    steps_for_nfe,
    time_grid,
)
from flowmap.oracles import GaussianMixtureTarget, GaussianTarget
from flowmap.paths import AffinePath, data_and_noise, get_schedule
from tests.helpers import ExactPhi


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_derivatives_match_finite_differences(name):
    sch = get_schedule(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    up, down, mid = sch(t + h), sch(t - h), sch(t)
    assert torch.allclose((up.alpha - down.alpha) / (2 * h), mid.d_alpha, atol=1e-8)
    assert torch.allclose((up.sigma - down.sigma) / (2 * h), mid.d_sigma, atol=1e-8)
    ends = sch(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ends.alpha.tolist() == pytest.approx([0.0, 1.0], abs=1e-12)
    assert ends.sigma.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_interpolant_endpoints_and_conversions(name):
    path = AffinePath(name)
    x0, x1 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(path.sample(x0, x1, torch.zeros(5, dtype=torch.float64)).x_t, x0)
    assert torch.allclose(path.sample(x0, x1, torch.ones(5, dtype=torch.float64)).x_t, x1)
    t = torch.rand(5, dtype=torch.float64) * 0.8 + 0.1
    sample = path.sample(x0, x1, t)
    x_t, v = sample.x_t, sample.dx_t
    assert sample.x0 is x0 and sample.x1 is x1 and sample.t is t
    # the one converter between predictions, on the student's own path
    c = path.coefficients(t, x_t)
    k = (c.alpha, c.sigma, c.d_alpha, c.d_sigma)
    data, noise = data_and_noise("velocity", v, x_t, *k)  # velocity -> data, velocity -> noise
    assert torch.allclose(data, x1)
    assert torch.allclose(noise, x0)
    data, noise = data_and_noise("sample", x1, x_t, *k)  # data -> velocity
    assert torch.allclose(c.d_alpha * data + c.d_sigma * noise, v)
    data, noise = data_and_noise("epsilon", x0, x_t, *k)  # noise -> velocity
    assert torch.allclose(c.d_alpha * data + c.d_sigma * noise, v)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown schedule 'sigmoid'"):
        get_schedule("sigmoid")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_log_snr_inverse_inverts_log_snr_and_matches_bisection(name):
    sch = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 33, dtype=torch.float64)
    lam = sch.log_snr(t)
    assert bool((lam.diff() > 0).all())  # noise (low SNR) at t = 0
    torch.testing.assert_close(sch.log_snr_inverse(lam), t, rtol=0, atol=1e-12)
    # the closed form agrees with the family's default inverse (bisection)
    bisected = super(type(sch), sch).log_snr_inverse(lam)
    torch.testing.assert_close(bisected, t, rtol=0, atol=1e-12)
    assert (sch.tau_noise, sch.tau_data) == (0.0, 1.0)


def test_a_path_must_run_from_noise_at_zero_to_data_at_one():
    from flowmap.teachers import native_schedule

    with pytest.raises(ValueError, match="noise at t = 0 to data at t = 1.*vp_cosine"):
        AffinePath(native_schedule("vp_cosine"))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_fixed_step_solvers_converge_at_their_order(schedule, method, order):
    g = GaussianTarget(
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([0.5, 2.0], dtype=torch.float64),
        schedule,
    )
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = g.flow_map(x, 0.0, 1.0)
    steps = [8, 16, 32, 64]
    errs = [(solve_ode(g.velocity, x, method, steps=n).x - exact).abs().max().item() for n in steps]
    slope = -torch.tensor(errs).log2().diff().mean().item()  # error ~ h^slope, h halves per entry
    assert order - 0.25 < slope < order + 1.25, (errs, slope)


def test_nfe_is_what_was_asked_for():
    g = GaussianMixtureTarget.ring()
    x = torch.randn(8, 2)
    for method, k in [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)]:
        for nfe in (k, 2 * k, 8 * k):
            assert solve_ode(g.velocity, x, method, nfe=nfe).nfe == nfe
    assert steps_for_nfe("rk4", 8) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="heun", nfe=3), "cannot take exactly 3 NFE"),
        (dict(method="euler", nfe=0), "at least 1"),
        (dict(method="euler", steps=0), "at least 1"),
        (dict(method="euler", grid=[0.0, 0.5, 0.4, 1.0]), "not strictly monotone"),
        (dict(method="rk45", steps=2), "Unknown solver"),
        (dict(method="euler"), "exactly one of"),
    ],
)
def test_bad_solver_requests_fail_early(kwargs, match):
    g = GaussianMixtureTarget.ring()
    with pytest.raises(ValueError, match=match):
        solve_ode(g.velocity, torch.randn(4, 2), **kwargs)


def test_adaptive_solve_matches_closed_form_and_reports_the_nfe_it_used(gaussian):
    x = torch.randn(32, 2, dtype=torch.float64)
    calls = []

    def counted(x, t):
        calls.append(1)
        return gaussian.velocity(x, t)

    sol = solve_adaptive(counted, x, rtol=1e-9, atol=1e-9)
    assert (sol.x - gaussian.flow_map(x, 0.0, 1.0)).abs().max() < 1e-5
    assert sol.nfe == len(calls) and sol.nfe > 6  # what the solver used, counted independently
    loose = solve_adaptive(gaussian.velocity, x, rtol=1e-3, atol=1e-3)
    assert loose.nfe < sol.nfe  # a looser tolerance takes fewer evaluations


def test_custom_grid_and_per_row_intervals(gaussian):
    x = torch.randn(16, 2, dtype=torch.float64)
    grid = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0])  # non-uniform: the steps follow the grid
    sol = solve_ode(gaussian.velocity, x, "rk4", grid=grid)
    assert sol.nfe == 16
    assert (sol.x - gaussian.flow_map(x, 0.0, 1.0)).abs().max() < 5e-3
    half = solve_ode(gaussian.velocity, x, "euler", grid=[0.0, 0.5])  # a grid may stop early
    assert torch.allclose(half.x, x + 0.5 * gaussian.velocity(x, 0.0))
    back = solve_ode(gaussian.velocity, sol.x, "rk4", grid=grid.flip(0))  # and run backwards
    assert (back.x - x).abs().max() < 5e-3
    s = torch.rand(16, dtype=torch.float64) * 0.5
    t = s + 0.25
    end = solve_between(gaussian.velocity, x, s, t, steps=8, method="rk4").x
    assert (end - gaussian.flow_map(x, s, t)).abs().max() < 1e-6


def test_flow_map_identity_and_exact_one_step_sampling(gaussian):
    fm = FlowMap(ExactPhi(gaussian))
    x = torch.randn(32, 2, dtype=torch.float64)
    s = torch.rand(32, dtype=torch.float64)
    assert torch.equal(fm(x, s, s), x)  # X(s, s, x) = x exactly
    one = sample_flow_map(fm, x, steps=1)
    assert one.nfe == 1
    assert torch.allclose(one.x, gaussian.flow_map(x, 0.0, 1.0), atol=1e-12)
    # inverse: data -> noise returns the noise
    back = sample_flow_map(fm, one.x, steps=2, t0=1.0, t1=0.0)
    assert back.nfe == 2 and torch.allclose(back.x, x, atol=1e-10)
    assert math.isclose(float(time_grid(4)[-1]), 1.0)
