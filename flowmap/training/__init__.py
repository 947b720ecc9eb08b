"""Training: the LightningModules (CFM teacher, flow-map student), callbacks and checkpoints."""

from flowmap.training.base import FlowModuleBase, NonFiniteLossError, build
from flowmap.training.callbacks import (
    ConfigBesideCheckpoints,
    InterruptCheckpoint,
    MatmulPrecision,
    SampleQuality,
)
from flowmap.training.checkpoints import CheckpointError, load_module, read_checkpoint
from flowmap.training.flow_map import FlowMapModule
from flowmap.training.guard import DivergenceError, DivergenceGuard
from flowmap.training.progress import FlowmapProgressBar
from flowmap.training.velocity import VelocityModule

__all__ = [
    "VelocityModule",
    "FlowMapModule",
    "FlowModuleBase",
    "NonFiniteLossError",
    "DivergenceError",
    "DivergenceGuard",
    "build",
    "SampleQuality",
    "MatmulPrecision",
    "InterruptCheckpoint",
    "ConfigBesideCheckpoints",
    "FlowmapProgressBar",
    "CheckpointError",
    "load_module",
    "read_checkpoint",
]
