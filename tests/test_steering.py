"""Steering by a reward (flowmap.steering) on the Gaussian-mixture oracle, whose flow map and
class posterior are exact: look-ahead guidance, search, reward fine-tuning, inverse problems."""

import math

import pytest
import torch
from torch import nn

from flowmap import FlowMap
from flowmap.nets import MLP
from flowmap.oracles import ClassConditionalMixture, GaussianTarget
from flowmap.paths import AffinePath, as_time
from flowmap.steering import (
    ClassReward,
    ObservationReward,
    RewardError,
    RewardGuidance,
    RewardLoss,
    best_of_n,
    build_reward,
    denoiser_lookahead,
    evaluate_reward,
    guided_sample,
    importance_resample,
)
from tests.helpers import ExactPhi


class MixturePhi(nn.Module):
    r"""The exact :math:`\phi(x, s, t)` of a Gaussian mixture (one time pair per call), from a tight
    differentiable float64 solve; :math:`b_t` on the diagonal."""

    def __init__(self, target) -> None:
        super().__init__()
        self.target = target

    def forward(self, x, s, t):
        a, b = float(s[0]), float(t[0])
        if a == b:
            return self.target.velocity(x, t)
        return (self.target.flow_map(x, a, b, rtol=1e-7, atol=1e-7) - x) / (b - a)


@pytest.fixture(scope="module")
def oracle():
    return ClassConditionalMixture.rings(num_classes=2, per_class=4)


@pytest.fixture(scope="module")
def exact_map(oracle):
    return FlowMap(MixturePhi(oracle.unconditional))


def class_one(oracle):
    def reward(x):
        return oracle.log_class_posterior(x)[:, 1]

    return reward


def noise(n, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def share_of_class_one(oracle, x):
    return float((oracle.log_class_posterior(x).argmax(1) == 1).double().mean())


def test_the_maps_lookahead_is_the_exact_endpoint_and_the_denoisers_is_the_posterior_mean(
    oracle, exact_map
):
    z, t = noise(256), 0.3
    x_t = oracle.unconditional.flow_map(z, 0.0, t, rtol=1e-7, atol=1e-7)
    x1 = oracle.unconditional.flow_map(z, 0.0, 1.0, rtol=1e-7, atol=1e-7)
    tt = as_time(t, x_t)
    map_hat = exact_map(x_t, tt, as_time(1.0, x_t))
    den_hat = denoiser_lookahead(exact_map.path, x_t, tt, oracle.unconditional.velocity(x_t, tt))
    # the denoiser's look-ahead is E[x1 | x_t] (the oracle's exact posterior mean) ...
    torch.testing.assert_close(
        den_hat, oracle.unconditional.denoise(x_t, tt, 1 - tt), rtol=1e-8, atol=1e-8
    )
    # ... the map's is where the ODE from x_t lands, which the mean misses by far at t = 0.3
    assert (map_hat - x1).norm(dim=1).max() < 1e-4
    assert (den_hat - x1).norm(dim=1).mean() > 0.3


def test_lookahead_guidance_by_the_class_posterior_moves_the_histogram_to_the_class(
    oracle, exact_map
):
    z = noise(300)
    plain = oracle.unconditional.flow_map(z, 0.0, 1.0)
    reward = class_one(oracle)
    by_map = guided_sample(exact_map, z, RewardGuidance(reward, scale=1.0), steps=4)
    teacher = guided_sample(
        oracle.unconditional, z, RewardGuidance(reward, lookahead="denoiser"), steps=16
    )
    before = share_of_class_one(oracle, plain)
    assert 0.35 < before < 0.65
    assert share_of_class_one(oracle, by_map.x) > 0.97
    assert share_of_class_one(oracle, teacher.x) > 0.97
    # gradient calls are counted: a jump step 3 (look-ahead forward, backward, jump); Euler 2
    assert by_map.nfe == 3 * 4 and teacher.nfe == 2 * 16
    # the gradient at the endpoint, applied at x_t, needs no backward call through the network
    at_end = guided_sample(
        exact_map, z, RewardGuidance(reward, scale=1.0, gradient="endpoint"), steps=4
    )
    assert at_end.nfe == 2 * 4 and share_of_class_one(oracle, at_end.x) > 0.9
    # the guided samples stay on the data (near a class-1 component)
    means = oracle.classes[1].means
    nearest = torch.cdist(by_map.x, means).min(1).values
    assert nearest.median() < 0.4


def test_the_tilt_weight_is_the_score_to_velocity_factor():
    g = RewardGuidance(lambda x: x.sum(1), max_weight=20.0)  # FMTT's clip
    x = torch.zeros(3, 2, dtype=torch.float64)
    t = torch.tensor([0.25, 0.5, 0.01], dtype=torch.float64)
    w = g.weight(AffinePath("linear"), t, x).flatten()
    torch.testing.assert_close(w, torch.tensor([3.0, 1.0, 20.0], dtype=torch.float64))
    # on any schedule: sigma (alpha' sigma / alpha - sigma'), by the velocity-score relation
    # b = (alpha'/alpha) x + w * score, checked on a Gaussian target's closed form
    target, path = GaussianTarget(torch.zeros(2), torch.ones(2), "cosine"), AffinePath("cosine")
    t = torch.tensor([0.3], dtype=torch.float64)
    k = path.schedule(t)
    xx = torch.tensor([[0.7, -0.2]], dtype=torch.float64)
    v_t = k.alpha**2 + k.sigma**2  # the Gaussian's variance at t (c = 1, mu = 0)
    velocity = target.velocity(xx, t).double()
    expected = k.d_alpha / k.alpha * xx + g.weight(path, t, xx) * (-xx / v_t)
    torch.testing.assert_close(velocity, expected, rtol=1e-5, atol=1e-6)


def test_best_of_n_keeps_the_argmax_and_resampling_follows_the_tilt():
    target = GaussianTarget(torch.tensor([0.5, -1.0]), torch.tensor([0.8, 0.3]))
    fm = FlowMap(ExactPhi(target))
    z = torch.randn(50, 6, 2, generator=torch.Generator().manual_seed(0))

    def reward(x):
        return -(x - torch.tensor([2.0, 0.0])).pow(2).sum(1)

    out = best_of_n(fm, reward, z, jumps=2)
    everyone = reward(target.flow_map(z.reshape(-1, 2), 0.0, 1.0)).reshape(50, 6)
    torch.testing.assert_close(out.candidate_rewards, everyone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reward, everyone.max(1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.noise, z[torch.arange(50), everyone.argmax(1)])
    assert out.nfe == 6 * 2
    sharp = importance_resample(fm, reward, z, lam=1e4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sharp.x, out.x)
    # lam = 0: a uniform draw among the candidates (chi-square, 5 dof, p < 1e-4 at 25.7)
    many = torch.randn(3000, 6, 2, generator=torch.Generator().manual_seed(2))
    flat = importance_resample(
        fm, reward, many, lam=0.0, generator=torch.Generator().manual_seed(3)
    )
    index = (flat.candidate_rewards == flat.reward[:, None]).double().argmax(1)
    counts = torch.bincount(index, minlength=6).double()
    assert float(((counts - 500) ** 2 / 500).sum()) < 25.7


def test_importance_resampling_draws_the_tilted_law():
    """A Gaussian tilted by a linear reward, exp(lam a.x) N(mu, C), is N(mu + lam C a, C)."""
    target = GaussianTarget(torch.tensor([0.5, -1.0]), torch.tensor([0.8, 0.3]))
    fm = FlowMap(ExactPhi(target))
    z = torch.randn(4000, 64, 2, generator=torch.Generator().manual_seed(4))

    def reward(x):
        return x[:, 0] - 2.0 * x[:, 1]

    out = importance_resample(fm, reward, z, lam=0.5, generator=torch.Generator().manual_seed(5))
    expected = torch.tensor([0.5 + 0.5 * 0.64, -1.0 - 0.5 * 2.0 * 0.09])
    torch.testing.assert_close(out.x.mean(0), expected, atol=0.04, rtol=0)
    assert out.nfe == 64


def test_the_kl_penalty_transports_the_samples_to_the_tilted_reference():
    """penalty kl: the targets' mean is the reference's tilted mean, N(mu + lam C a, C) for a
    linear reward; the reward is never differentiated; labels are refused."""
    target = GaussianTarget(torch.tensor([0.5, -1.0]), torch.tensor([0.8, 0.3]))
    reference = FlowMap(ExactPhi(target))

    def reward(x):
        return (x[:, 0] - 2.0 * x[:, 1]).detach()  # a black box: no gradient

    torch.manual_seed(0)
    loss = RewardLoss(reward, scale=0.5, penalty="kl", candidates=8192)
    x = reference(torch.randn(1024, 2), 0.0, 1.0)
    targets = loss._tilted_targets(reference, x)
    expected = torch.tensor([0.5 + 0.5 * 0.64, -1.0 - 0.5 * 2.0 * 0.09])
    torch.testing.assert_close(targets.mean(0), expected, atol=0.03, rtol=0)
    net = MLP(data_shape=[2], width=16, depth=1)
    out = loss(FlowMap(net), torch.zeros(64, 2), reference)
    assert {"loss", "transport", "reward", "distance"} <= set(out)
    out["loss"].backward()  # through the map only
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="unconditional"):
        loss(FlowMap(net), torch.zeros(4, 2), reference, y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="penalty"):
        RewardLoss(reward, penalty="wasserstein")


def test_the_reward_losss_noise_differs_across_ranks(monkeypatch):
    """Every rank draws its own noise (ranks share the seed; the batch is noise only)."""
    import torch.distributed as dist

    from flowmap.steering.finetune import own_noise

    like = torch.zeros(8, 2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    draws = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(0)
        draws.append(own_noise(like))
    assert not torch.allclose(draws[0], draws[1])
    torch.manual_seed(0)
    torch.testing.assert_close(own_noise(like), draws[1])  # reproducible per rank and seed


def test_the_reward_losss_gradient_is_its_finite_difference():
    torch.manual_seed(0)
    net = MLP(data_shape=[2], width=16, depth=1).double()
    reference = FlowMap(MLP(data_shape=[2], width=16, depth=1).double()).requires_grad_(False)
    fm = FlowMap(net)
    x0 = torch.randn(64, 2, dtype=torch.float64)
    x1 = torch.zeros_like(x0)

    def reward(x):
        return torch.sin(x[:, 0]) - 0.5 * x[:, 1] ** 2

    loss = RewardLoss(reward, scale=0.7, beta=0.3, jumps=2)
    params = list(net.parameters())
    out = loss(fm, x1, reference, x0=x0)
    grads = torch.autograd.grad(out["loss"], params)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    h = 1e-5
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * h * d)
            values.append(loss(fm, x1, reference, x0=x0)["loss"])
            for p, d in zip(params, direction):
                p.sub_(sign * h * d)
    numeric = (values[0] - values[1]) / (2 * h)
    assert abs(float(analytic - numeric)) < 1e-6 * max(1.0, abs(float(numeric)))
    # and its value is the formula's: -scale r + beta |X - X_ref|^2 (mean over entries)
    x = fm(fm(x0, 0.0, 0.5), 0.5, 1.0)
    ref = reference(reference(x0, 0.0, 0.5), 0.5, 1.0)
    expected = (-0.7 * reward(x) + 0.3 * (x - ref).pow(2).mean(1)).mean()
    torch.testing.assert_close(out["loss"], expected)


def test_inpainting_as_a_reward_pulls_the_observed_entries_to_the_observation(oracle, exact_map):
    truth = oracle.unconditional.flow_map(noise(200, seed=5), 0.0, 1.0, rtol=1e-7, atol=1e-7)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64)  # coordinate 0 is observed
    reward = ObservationReward(truth * mask, mask)
    z = noise(200, seed=6)
    plain = oracle.unconditional.flow_map(z, 0.0, 1.0, rtol=1e-7, atol=1e-7)

    def observed_error(lookahead):
        x = guided_sample(exact_map, z, RewardGuidance(reward, 2.0, lookahead), steps=4).x
        return (x[:, 0] - truth[:, 0]).abs().mean(), x

    by_map, x = observed_error("flow_map")
    by_mean, _ = observed_error("denoiser")
    assert by_map < 0.15 * (plain[:, 0] - truth[:, 0]).abs().mean()
    assert by_map < 0.5 * by_mean  # the exact look-ahead lands where the mean does not
    # the missing coordinate follows the data: the samples stay near the mixture's components
    assert torch.cdist(x, oracle.unconditional.means).min(1).values.median() < 0.3
    assert reward.masked_error(truth, truth).abs().max() == 0


def test_bad_rewards_and_options_are_one_sentence(exact_map):
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(RewardError, match="shape \\(B,\\)"):
        evaluate_reward(lambda x: x, x)
    with pytest.raises(RewardError, match="non-finite"):
        evaluate_reward(lambda x: torch.log(x[:, 0] - 1), x)
    with pytest.raises(RewardError, match="tensor"):
        evaluate_reward(lambda x: 1.0, x)
    with pytest.raises(RewardError, match="not differentiable"):
        guided_sample(exact_map, x, RewardGuidance(lambda x: x.sum(1).detach()), steps=2)
    with pytest.raises(ValueError, match="rise to t = 1"):
        guided_sample(exact_map, x, RewardGuidance(lambda x: x.sum(1)), grid=[0.0, 0.5])
    with pytest.raises(ValueError, match="finite"):
        RewardGuidance(lambda x: x.sum(1), scale=float("nan"))
    with pytest.raises(ValueError, match="shape \\(B,\\)"):  # before any step is taken
        guided_sample(exact_map, x, RewardGuidance(lambda x: x.sum()), steps=2)
    with pytest.raises(ValueError, match="needs a FlowMap"):
        guided_sample(lambda x, t: x, x, RewardGuidance(lambda x: x.sum(1)), steps=2)
    with pytest.raises(ValueError, match="lookahead"):
        RewardGuidance(lambda x: x.sum(1), lookahead="tweedie")
    with pytest.raises(ValueError, match="gradient"):
        RewardGuidance(lambda x: x.sum(1), gradient="jacobian")
    with pytest.raises(ValueError, match="teacher"):
        RewardLoss(lambda x: x.sum(1))(exact_map, x)
    with pytest.raises(ValueError, match="teacher"):
        RewardLoss(lambda x: x.sum(1))(exact_map, x, lambda x, t: x)
    with pytest.raises(ValueError, match="mask"):
        ObservationReward(torch.zeros(2), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="not a class"):
        ClassReward(10)
    with pytest.raises(ValueError, match="Cannot import"):
        build_reward("flowmap.steering:no_such_reward")
    assert build_reward("math:fabs") is math.fabs
