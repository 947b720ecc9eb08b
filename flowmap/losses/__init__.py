"""Losses: CFM for the teacher; Lagrangian, Eulerian and semigroup flow-map losses (DESIGN §4)."""

from flowmap.losses.cfm import cfm_loss
from flowmap.losses.core import FlowMapLoss, diagonal_residual, phi_jvp, regression_loss
from flowmap.losses.eulerian import EulerianLoss, eulerian_residual
from flowmap.losses.lagrangian import LagrangianLoss, lagrangian_residual
from flowmap.losses.pairs import TimePairs, TimePairSampler, sample_times
from flowmap.losses.semigroup import SemigroupLoss, semigroup_residual, semigroup_target
from flowmap.losses.weighting import LossWeighting

__all__ = [
    "cfm_loss",
    "FlowMapLoss",
    "LagrangianLoss",
    "EulerianLoss",
    "SemigroupLoss",
    "LOSSES",
    "make_loss",
    "lagrangian_residual",
    "eulerian_residual",
    "semigroup_residual",
    "semigroup_target",
    "diagonal_residual",
    "phi_jvp",
    "regression_loss",
    "TimePairs",
    "TimePairSampler",
    "sample_times",
    "LossWeighting",
]

LOSSES = {"lagrangian": LagrangianLoss, "eulerian": EulerianLoss, "semigroup": SemigroupLoss}


def make_loss(name: str, **kwargs) -> FlowMapLoss:
    """Build a flow-map loss by name (``lagrangian``, ``eulerian``, ``semigroup``)."""
    if name not in LOSSES:
        raise ValueError(f"Unknown flow-map loss {name!r}; choose one of {sorted(LOSSES)}.")
    return LOSSES[name](**kwargs)
