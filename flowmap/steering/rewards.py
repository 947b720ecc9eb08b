r"""Rewards :math:`r(x)`: differentiable scores of data-space samples, ``(B, *shape) -> (B,)``.

Any callable of that signature is a reward (a Python function, an ``nn.Module``, or a
``class_path`` spec built by :func:`build_reward`). Two ship with the package:

* :class:`ClassReward` — :math:`r(x) = \log p(k \mid x)` under a classifier (default: the digits
  CNN shipped for FID), to steer towards class :math:`k`;
* :class:`ObservationReward` — :math:`r(x) = -\|M \odot (x - y)\|^2`, an inverse problem
  (inpainting with a mask :math:`M`, denoising without one) as a reward.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flowmap.metrics import load_digits_classifier
from flowmap.teachers.spec import build_component, is_spec

__all__ = [
    "Reward",
    "RewardError",
    "ClassReward",
    "ObservationReward",
    "build_reward",
    "import_reward",
    "evaluate_reward",
]

Reward = Callable[[Tensor], Tensor]


class RewardError(ValueError):
    """A reward that does not return one finite, differentiable value per sample."""


def evaluate_reward(reward: Reward, x: Tensor) -> Tensor:
    """``reward(x)``, checked: one finite value per sample, shape ``(B,)``, differentiable where
    ``x`` is (:class:`RewardError`, one sentence each)."""
    name = getattr(reward, "__name__", type(reward).__name__)
    r = reward(x)
    if not isinstance(r, Tensor):
        raise RewardError(f"The reward {name} returned a {type(r).__name__}; return a tensor (B,).")
    if r.shape != (x.shape[0],):
        raise RewardError(
            f"The reward {name} returned shape {tuple(r.shape)} for a batch of {x.shape[0]}; "
            "return one value per sample, shape (B,) (e.g. sum over the other dimensions)."
        )
    if not bool(torch.isfinite(r).all()):
        bad = int((~torch.isfinite(r)).sum())
        raise RewardError(
            f"The reward {name} returned {bad} non-finite value(s) of {x.shape[0]}; clamp or "
            "smooth it (a log of a probability needs log_softmax, not log(softmax))."
        )
    if x.requires_grad and torch.is_grad_enabled() and not r.requires_grad:
        raise RewardError(
            f"The reward {name} is not differentiable in x (its value does not depend on x "
            "through torch operations); compute it with torch from x, not with numpy or detach."
        )
    return r


def import_reward(path: str) -> Any:
    """The object an import path names, ``package.module:name`` or ``package.module.Name``."""
    try:
        return pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"Cannot import the reward {path!r}; give 'package.module:function' or "
            "'package.module.Class' of an installed module."
        ) from None


def build_reward(spec: Reward | str | Mapping[str, Any]) -> Reward:
    """A reward from a callable, a ``class_path`` spec (``{"class_path", "init_args"}``), or an
    import path: ``"package.module.Class"`` (built without arguments) or ``"package.module:fn"``."""
    if callable(spec) and not isinstance(spec, str):
        return spec
    if is_spec(spec):
        return build_component(spec)
    if isinstance(spec, str):
        target = import_reward(spec)
        try:
            reward = target() if isinstance(target, type) else target
        except TypeError as err:
            raise ValueError(
                f"Cannot build the reward {spec!r} without arguments ({err}); give a class_path "
                "spec with its init_args."
            ) from None
        if callable(reward):
            return reward
    raise ValueError(
        f"Cannot make a reward of {spec!r}; give a callable x -> (B,), an import path "
        "('package.module:function' or 'package.module.Class'), or a class_path spec."
    )


class ClassReward(nn.Module):
    r""":math:`r(x) = \log p(k \mid x)`, the log-softmax of a classifier's logits at class ``target``.

    Args:
        target: the class :math:`k`.
        classifier: a module mapping samples to logits ``(B, K)``; ``None``: the shipped digits
            CNN (:func:`~flowmap.metrics.load_digits_classifier`), frozen.
    """

    def __init__(self, target: int, classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.classifier = classifier if classifier is not None else load_digits_classifier()
        self.classifier.requires_grad_(False).eval()
        classes = getattr(getattr(self.classifier, "head", None), "out_features", None)
        if target < 0 or (classes is not None and target >= classes):
            raise ValueError(
                f"target {target} is not a class of this classifier"
                + (f" (0..{classes - 1})." if classes else " (a class is a number from 0).")
            )
        self.target = int(target)

    def forward(self, x: Tensor) -> Tensor:
        weight = next(self.classifier.parameters(), None)
        logits = self.classifier(x if weight is None else x.to(weight.dtype))
        return torch.log_softmax(logits.float(), dim=1)[:, self.target].to(x.dtype)


class ObservationReward(nn.Module):
    r""":math:`r(x) = -\|M \odot (x - y)\|^2` (summed per sample): agreement with an observation.

    Args:
        observed: :math:`y`, one observation ``(*shape)`` for every sample or one per sample
            ``(B, *shape)``.
        mask: :math:`M`, 1 where :math:`y` is observed (inpainting) and 0 where it is missing,
            broadcast like ``observed``; ``None``: every entry (denoising, :math:`A = I`).
    """

    def __init__(self, observed: Tensor, mask: Tensor | None = None) -> None:
        super().__init__()
        observed = torch.as_tensor(observed, dtype=torch.float32)
        m = torch.ones_like(observed) if mask is None else torch.as_tensor(mask).to(observed)
        try:
            torch.broadcast_shapes(observed.shape, m.shape)
        except RuntimeError:
            raise ValueError(
                f"The mask's shape {tuple(m.shape)} does not broadcast against the observation's "
                f"{tuple(observed.shape)}; give a mask of the observation's shape."
            ) from None
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("The mask must hold only 0 (missing) and 1 (observed) entries.")
        self.register_buffer("observed", observed)
        self.register_buffer("mask", m)

    def _aligned(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, m = self.observed.to(x), self.mask.to(x)
        if y.shape[-x.dim() + 1 :] != x.shape[1:] and tuple(y.shape) != tuple(x.shape):
            raise ValueError(
                f"The observation has shape {tuple(y.shape)} but the samples {tuple(x.shape)}; "
                "give one observation of the sample shape, or one per sample."
            )
        if y.dim() == x.dim() and y.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"There are {y.shape[0]} observations for {x.shape[0]} samples; give one, or "
                "one per sample."
            )
        return y, m

    def forward(self, x: Tensor) -> Tensor:
        y, m = self._aligned(x)
        return -(m * (x - y)).pow(2).flatten(1).sum(1)

    def masked_error(self, x: Tensor, truth: Tensor) -> Tensor:
        """Mean square error against the clean ``truth`` on the missing entries :math:`1 - M`
        (on every entry where nothing is missing, as in denoising), per sample ``(B,)``."""
        _, m = self._aligned(x)
        miss = (1 - m).expand_as(x) if bool((m == 0).any()) else torch.ones_like(x)
        err = (miss * (x - truth.to(x))).pow(2).flatten(1).sum(1)
        return err / miss.flatten(1).sum(1)
