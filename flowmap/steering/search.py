r"""Search over noises with the map's jump: :math:`N` candidates :math:`X(0, 1, z_i)` per sample,
kept by their reward.

* best-of-N keeps :math:`\arg\max_i r(X(0, 1, z_i))`;
* importance resampling draws one candidate with probability
  :math:`\propto \exp(\lambda\, r(X(0, 1, z_i)))`, a self-normalised sample of the tilted law
  :math:`p(x_1)\,e^{\lambda r(x_1)}/Z` (exact as :math:`N \to \infty`).

NFE per sample: :math:`N` times the jumps of one candidate (no gradient calls).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmap.flowmap import FlowMap
from flowmap.ode import sample_flow_map
from flowmap.steering.rewards import Reward, evaluate_reward

__all__ = ["SearchResult", "best_of_n", "importance_resample"]


@dataclass
class SearchResult:
    """The kept samples ``x`` ``(B, *shape)``, their noise, their rewards ``(B,)``, every
    candidate's reward ``(B, N)`` and the NFE per sample."""

    x: Tensor
    noise: Tensor
    reward: Tensor
    candidate_rewards: Tensor
    nfe: int


@torch.no_grad()
def _candidates(
    flow_map: FlowMap,
    reward: Reward,
    x0: Tensor,
    jumps: int,
    cond: Mapping[str, Tensor] | None,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Every candidate's sample and reward, candidate by candidate, so that the reward sees row
    ``b`` of each batch as sample ``b`` (a per-sample observation stays aligned)."""
    if x0.dim() < 3:
        raise ValueError(
            f"The noise must have shape (B, N, *sample_shape) with N candidates per sample, got "
            f"{tuple(x0.shape)}."
        )
    kw = {k: v for k, v in (cond or {}).items() if v is not None}
    xs, rs = [], []
    for i in range(x0.shape[1]):
        x1 = torch.cat(
            [
                sample_flow_map(
                    flow_map,
                    x0[j : j + chunk, i],
                    steps=jumps,
                    cond={k: v[j : j + chunk] for k, v in kw.items()},
                ).x
                for j in range(0, x0.shape[0], chunk)
            ]
        )
        xs.append(x1)
        rs.append(evaluate_reward(reward, x1))
    return torch.stack(xs, dim=1), torch.stack(rs, dim=1)


def _pick(x: Tensor, x0: Tensor, r: Tensor, index: Tensor, nfe: int) -> SearchResult:
    rows = torch.arange(x.shape[0], device=x.device)
    return SearchResult(x[rows, index], x0[rows, index], r[rows, index], r, nfe)


def best_of_n(
    flow_map: FlowMap,
    reward: Reward,
    x0: Tensor,
    *,
    jumps: int = 1,
    cond: Mapping[str, Tensor] | None = None,
    chunk: int = 4096,
) -> SearchResult:
    r"""Per sample, the candidate of highest reward among ``x0`` ``(B, N, *shape)``'s :math:`N`
    noises, each sampled with ``jumps`` jumps; ``cond`` holds one label (scale) per sample."""
    x, r = _candidates(flow_map, reward, x0, jumps, cond, chunk)
    return _pick(x, x0, r, r.argmax(1), x0.shape[1] * jumps)


def importance_resample(
    flow_map: FlowMap,
    reward: Reward,
    x0: Tensor,
    lam: float = 1.0,
    *,
    jumps: int = 1,
    cond: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
) -> SearchResult:
    r"""Per sample, one of ``x0``'s :math:`N` candidates drawn with probability
    :math:`\mathrm{softmax}_i(\lambda\,r_i)`."""
    if not 0 <= lam < float("inf"):
        raise ValueError(f"lam must be a finite non-negative number, got {lam}.")
    x, r = _candidates(flow_map, reward, x0, jumps, cond, chunk)
    p = torch.softmax(lam * r.double(), dim=1)
    index = torch.multinomial(
        p.to(generator.device if generator else p.device), 1, generator=generator
    )
    index = index.squeeze(1).to(x.device)
    return _pick(x, x0, r, index, x0.shape[1] * jumps)
