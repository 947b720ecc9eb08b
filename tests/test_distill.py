"""Short distillations from the exact Gaussian-mixture teacher (DESIGN §5), one per loss, in a
hand-written training loop with no Lightning (as users embed the losses in their own trainers):
the one-step map must land far closer to the teacher's ODE endpoint than one Euler step does."""

import pytest
import torch

from flowmap.flowmap import FlowMap
from flowmap.losses import EulerianLoss, LagrangianLoss, SemigroupLoss
from flowmap.nets import MLP
from flowmap.ode import sample_flow_map, solve_ode
from flowmap.oracles import GaussianMixtureTarget

STEPS = 300


@pytest.fixture(scope="module")
def gmm_endpoints():
    gmm = GaussianMixtureTarget.ring(k=4, radius=2.0, std=0.3)
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    ref = gmm.flow_map(x0, 0.0, 1.0)  # tight float64 dopri5 solve
    euler1 = (solve_ode(gmm.velocity, x0, "euler", nfe=1).x - ref).norm(dim=1).mean().item()
    return gmm, x0, ref, euler1


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: LagrangianLoss(form="regression"),
        LagrangianLoss,
        EulerianLoss,
        SemigroupLoss,
    ],
    ids=["lagrangian-regression", "lagrangian", "eulerian", "semigroup"],
)
def test_distillation_from_the_mixture_teacher_beats_one_euler_step(gmm_endpoints, make_loss):
    gmm, x0, ref, euler1 = gmm_endpoints
    torch.manual_seed(0)
    fm = FlowMap(MLP((2,), width=64, depth=2), gmm.path)
    loss = make_loss()  # the recommended defaults
    opt = torch.optim.Adam(fm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for step in range(STEPS):
        opt.zero_grad()
        out = loss(fm, gmm.sample(256, generator=g), gmm, step=step)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(fm.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        one = sample_flow_map(fm, x0, steps=1)
        err = (one.x - ref).norm(dim=1).mean().item()
    assert one.nfe == 1
    assert err < 0.5 * euler1, (loss.name, err, euler1)
