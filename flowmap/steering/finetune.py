r"""Reward fine-tuning of a few-jump map :math:`X_\theta` against its frozen reference
:math:`X_{\mathrm{ref}}`, with one of two penalties.

``penalty="distance"`` (DRaFT through the map): gradient ascent on the reward near the
reference's samples on the same noise,

.. math::
   L(\theta) = E_z\big[-\lambda\, r(X_\theta(0, 1, z))
               + \beta\,\mathrm{mean}\,(X_\theta(0, 1, z) - X_{\mathrm{ref}}(0, 1, z))^2\big]

(the mean over the :math:`d` entries; :math:`d` times it bounds :math:`W_2^2` between the maps'
laws).

``penalty="kl"``: the maximiser of :math:`E_q[\lambda r] - \mathrm{KL}(q \,\|\, p_{\mathrm{ref}})` is
the tilt :math:`q^* \propto p_{\mathrm{ref}}\, e^{\lambda r}`, and the map is fitted to it: each
step draws ``candidates`` reference samples :math:`y_j`, weighs them
:math:`\pi_j = \mathrm{softmax}_j(\lambda r(y_j))`, couples the batch's samples :math:`x_i` to
them by exact optimal transport (POT) from uniform to :math:`\pi`, and regresses each
:math:`x_i` on its barycentric target :math:`B\sum_j P_{ij} y_j`. The reward is only evaluated,
never differentiated (a black-box reward serves), and the map moves no sample off the
reference's samples. With :math:`r = \log p(k \mid x)` and :math:`\lambda = 1`, :math:`q^*` is
:math:`p(x \mid k)` by Bayes' rule.

With ``jumps`` > 1 both maps compose that many uniform jumps and the gradient runs through all of
them; the tuned map is trained for that many jumps only. In
:class:`~flowmap.training.FlowMapModule` the reference is the teacher: a flow-map checkpoint,
which the student also starts from.
"""

from __future__ import annotations

from typing import Any

import ot
import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowmap.flowmap import FlowMap
from flowmap.losses import FlowMapLoss
from flowmap.losses.base import mean_square
from flowmap.ode import sample_flow_map
from flowmap.steering.rewards import build_reward, evaluate_reward

__all__ = ["PENALTIES", "RewardLoss", "own_noise", "reference_map"]

PENALTIES = ("distance", "kl")


def reference_map(teacher: Any) -> FlowMap:
    """The frozen reference map a teacher carries (``teacher.flow_map``, as a flow-map
    checkpoint loaded as a teacher does), or the teacher itself if it is a :class:`FlowMap`."""
    ref = teacher if isinstance(teacher, FlowMap) else getattr(teacher, "flow_map", None)
    if not isinstance(ref, FlowMap):
        raise ValueError(
            "RewardLoss fine-tunes a flow map against its frozen reference; give as the teacher "
            f"the flow map's checkpoint (a FlowMapModule .ckpt), not a {type(teacher).__name__}."
        )
    return ref


def own_noise(like: Tensor) -> Tensor:
    """Standard normal noise shaped like ``like``, different on every rank of a distributed run
    (whose ranks share a seed): the reward's batch is noise only, not data the sampler splits."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    seed = int(torch.randint(0, 2**62, ())) + rank  # the shared stream advances alike
    g = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=g, device=like.device, dtype=like.dtype)


class RewardLoss(FlowMapLoss):
    r"""Maximise a reward of the map's samples near a frozen reference map (module docstring).

    Args:
        reward: :math:`r`, a callable ``(B, *shape) -> (B,)`` or its ``class_path`` spec (e.g.
            :class:`~flowmap.steering.ClassReward`).
        scale: :math:`\lambda`.
        beta: :math:`\beta`, the weight of the distance to the reference's samples
            (``penalty="distance"``).
        jumps: jumps per sample, back-propagated through (1: the one-jump map).
        penalty: ``"distance"`` or ``"kl"`` (module docstring).
        candidates: reference samples a step with ``penalty="kl"`` weighs and transports to.
    """

    name = "reward"
    accepts_teacher = True
    takes_map_teacher = True
    trivial_at_identity = False

    def __init__(
        self,
        reward: nn.Module | Any,
        scale: float = 1.0,
        beta: float = 1.0,
        jumps: int = 1,
        penalty: str = "distance",
        candidates: int = 1024,
    ) -> None:
        super().__init__()
        built = build_reward(reward)
        self.reward = built  # an nn.Module reward is a submodule, frozen below
        if isinstance(built, nn.Module):
            built.requires_grad_(False)
        if beta < 0 or scale < 0 or jumps < 1 or candidates < 2:
            raise ValueError(
                f"RewardLoss needs scale >= 0, beta >= 0, jumps >= 1 and candidates >= 2; got "
                f"scale={scale}, beta={beta}, jumps={jumps}, candidates={candidates}."
            )
        if penalty not in PENALTIES:
            raise ValueError(f"Unknown penalty {penalty!r}; choose one of {PENALTIES}.")
        self.penalty, self.candidates = penalty, int(candidates)
        self.scale, self.beta, self.jumps = float(scale), float(beta), int(jumps)

    @property
    def self_taught(self) -> bool:
        return False

    def check_teacher(self, has_teacher: bool) -> None:
        if not has_teacher:
            raise ValueError(
                "RewardLoss fine-tunes a distilled map against its frozen reference; give "
                "teacher: the flow map's checkpoint (the student starts from it)."
            )

    def check_reference(self, teacher: Any) -> None:
        """Refuse, before the first step, a teacher that carries no flow map to stay near."""
        reference_map(teacher)

    def off_diagonal(self, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError("RewardLoss has no time pairs; it scores whole samples.")

    def forward(
        self,
        flow_map: FlowMap,
        x1: Tensor,
        teacher: Any = None,
        *,
        step: int = 0,
        x0: Tensor | None = None,
        pairs: Any = None,
        y: Tensor | None = None,
        w: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``{"loss", "reward", "distance"}`` (``"transport"`` for ``penalty="kl"``: the mean
        square from the samples to their targets); ``x1`` only gives the batch's shape."""
        self.check_teacher(teacher is not None)
        ref = reference_map(teacher)
        z = own_noise(x1) if x0 is None else x0
        cond = {"y": y, "w": w}
        if self.penalty == "kl" and (y is not None or w is not None):
            raise ValueError(
                "RewardLoss with penalty kl draws unlabelled reference candidates; fine-tune an "
                "unconditional map, or use penalty distance for a class-conditional one."
            )
        x = sample_flow_map(flow_map, z, steps=self.jumps, cond=cond).x
        with torch.no_grad():
            x_ref = sample_flow_map(ref, z, steps=self.jumps, cond=cond).x
        distance = mean_square(x - x_ref)  # differentiated for penalty distance
        if self.penalty == "kl":
            with torch.no_grad():
                r = evaluate_reward(self.reward, x)
            transport = mean_square(x - self._tilted_targets(ref, x))
            out = {"loss": transport.mean(), "transport": transport.mean().detach()}
        else:
            r = evaluate_reward(self.reward, x)
            out = {"loss": (-self.scale * r + self.beta * distance).mean()}
        return {**out, "reward": r.mean().detach(), "distance": distance.mean().detach()}

    @torch.no_grad()
    def _tilted_targets(self, ref: FlowMap, x: Tensor) -> Tensor:
        r"""Each sample's barycentric target in the reference's candidates weighted by
        :math:`\mathrm{softmax}(\lambda r)`, under the exact optimal transport plan."""
        shape = (self.candidates, *x.shape[1:])
        y = sample_flow_map(ref, own_noise(x.new_empty(shape)), steps=self.jumps).x
        weights = torch.softmax(self.scale * evaluate_reward(self.reward, y).double(), 0)
        flat = y.flatten(1).double()
        cost = torch.cdist(x.detach().flatten(1).double(), flat) ** 2
        uniform = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64)
        plan = ot.emd(uniform, weights.cpu(), cost.cpu())
        return (len(x) * plan.to(flat) @ flat).to(x.dtype).view_as(x)
