r"""Reward fine-tuning of a few-jump map against its frozen reference (DRaFT through the map):

.. math::
   L(\theta) = E_z\big[-\lambda\, r(X_\theta(0, 1, z))
               + \beta\,\|X_\theta(0, 1, z) - X_{\mathrm{ref}}(0, 1, z)\|^2\big],

the penalty a mean over the :math:`d` entries (on the same noise, :math:`d` times it bounds
:math:`W_2^2` between the two maps' laws). With ``jumps`` > 1 both maps compose that many
uniform jumps and the gradient runs through all of them; the tuned map is trained for that many
jumps only. In :class:`~flowmap.training.FlowMapModule` the reference is the teacher: a flow-map
checkpoint, which the student also starts from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowmap.flowmap import FlowMap
from flowmap.losses import FlowMapLoss
from flowmap.losses.base import mean_square
from flowmap.ode import sample_flow_map
from flowmap.steering.rewards import build_reward, evaluate_reward

__all__ = ["RewardLoss", "own_noise", "reference_map"]


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
        beta: :math:`\beta`, the weight of the distance to the reference's samples.
        jumps: jumps per sample, back-propagated through (1: the one-jump map).
    """

    name = "reward"
    accepts_teacher = True
    takes_map_teacher = True
    trivial_at_identity = False

    def __init__(
        self, reward: nn.Module | Any, scale: float = 1.0, beta: float = 1.0, jumps: int = 1
    ) -> None:
        super().__init__()
        built = build_reward(reward)
        self.reward = built  # an nn.Module reward is a submodule, frozen below
        if isinstance(built, nn.Module):
            built.requires_grad_(False)
        if beta < 0 or scale < 0 or jumps < 1:
            raise ValueError(
                f"RewardLoss needs scale >= 0, beta >= 0 and jumps >= 1; got scale={scale}, "
                f"beta={beta}, jumps={jumps}."
            )
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
        """``{"loss", "reward", "distance"}``; ``x1`` only gives the batch's shape."""
        self.check_teacher(teacher is not None)
        ref = reference_map(teacher)
        z = own_noise(x1) if x0 is None else x0
        cond = {"y": y, "w": w}
        x = sample_flow_map(flow_map, z, steps=self.jumps, cond=cond).x
        with torch.no_grad():
            x_ref = sample_flow_map(ref, z, steps=self.jumps, cond=cond).x
        r = evaluate_reward(self.reward, x)
        distance = mean_square(x - x_ref)
        loss = (-self.scale * r + self.beta * distance).mean()
        return {"loss": loss, "reward": r.mean().detach(), "distance": distance.mean().detach()}
