r"""Flow maps beyond sampling: steering by a reward :math:`r(x)` through the map's look-ahead.

* :mod:`~flowmap.steering.rewards` — :class:`ClassReward` (:math:`\log p(k \mid x)`),
  :class:`ObservationReward` (:math:`-\|M\odot(x - y)\|^2`: inpainting, denoising), any callable;
* :mod:`~flowmap.steering.guidance` — :func:`guided_sample`: the velocity pushed along
  :math:`\nabla_{x_t} r(\hat x_1)`, :math:`\hat x_1 = X(t, 1, x_t)` or the denoiser's mean;
* :mod:`~flowmap.steering.search` — :func:`best_of_n`, :func:`importance_resample` over noises
  by :math:`r(X(0, 1, z))`;
* :mod:`~flowmap.steering.finetune` — :class:`RewardLoss`, reward fine-tuning of the map near
  its frozen reference, a loss for :class:`~flowmap.training.FlowMapModule`.
"""

from flowmap.steering.finetune import RewardLoss, reference_map
from flowmap.steering.guidance import (
    GRADIENTS,
    LOOKAHEADS,
    NORMALIZATIONS,
    SCHEDULES,
    RewardGuidance,
    denoiser_lookahead,
    guided_sample,
)
from flowmap.steering.rewards import (
    ClassReward,
    ObservationReward,
    Reward,
    RewardError,
    build_reward,
    evaluate_reward,
    import_reward,
)
from flowmap.steering.search import SearchResult, best_of_n, importance_resample

__all__ = [
    "Reward",
    "RewardError",
    "import_reward",
    "ClassReward",
    "ObservationReward",
    "build_reward",
    "evaluate_reward",
    "GRADIENTS",
    "LOOKAHEADS",
    "NORMALIZATIONS",
    "SCHEDULES",
    "RewardGuidance",
    "denoiser_lookahead",
    "guided_sample",
    "SearchResult",
    "best_of_n",
    "importance_resample",
    "RewardLoss",
    "reference_map",
]
