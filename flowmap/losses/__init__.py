"""Losses: CFM for the teacher; the Lagrangian, Eulerian and semigroup flow-map losses, and
MeanFlow's Eulerian loss on the conditional velocity.

Each flow-map loss is a :class:`FlowMapLoss`: an ``nn.Module`` called as
``loss(flow_map, x1, teacher, step=k) -> {"loss": …, <terms>}``, injected into
:class:`~flowmap.training.FlowMapModule` by ``class_path``. A new loss is one subclass that
defines ``off_diagonal``.
"""

from flowmap.losses.base import FlowMapLoss, diagonal_residual, mean_square, regression_loss
from flowmap.losses.cfm import cfm_loss
from flowmap.losses.eulerian import (
    EulerianLoss,
    discrete_eulerian_target,
    eulerian_residual,
    tangent_warmup,
)
from flowmap.losses.lagrangian import LagrangianLoss, lagrangian_residual
from flowmap.losses.meanflow import MeanFlowLoss
from flowmap.losses.pairs import OneTimePairSampler, TimePairs, TimePairSampler, sample_times
from flowmap.losses.semigroup import SemigroupLoss, semigroup_residual, semigroup_target
from flowmap.losses.weighting import LossWeighting

#: The flow-map losses flowmap ships (what ``--model.loss=NAME`` and ``flowmap fit --help`` list).
LOSSES: tuple[type[FlowMapLoss], ...] = (LagrangianLoss, EulerianLoss, SemigroupLoss, MeanFlowLoss)

__all__ = [
    "LOSSES",
    "FlowMapLoss",
    "LagrangianLoss",
    "EulerianLoss",
    "SemigroupLoss",
    "MeanFlowLoss",
    "TimePairSampler",
    "OneTimePairSampler",
    "TimePairs",
    "LossWeighting",
    "cfm_loss",
    "lagrangian_residual",
    "eulerian_residual",
    "discrete_eulerian_target",
    "tangent_warmup",
    "semigroup_residual",
    "semigroup_target",
    "diagonal_residual",
    "regression_loss",
    "mean_square",
    "sample_times",
]
