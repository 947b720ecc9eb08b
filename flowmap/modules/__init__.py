"""LightningModules: the CFM teacher and the flow-map student."""

from flowmap.modules.base import FlowModuleBase, NonFiniteLossError, build
from flowmap.modules.flow_map import FlowMapModule
from flowmap.modules.velocity import VelocityModule

__all__ = ["VelocityModule", "FlowMapModule", "FlowModuleBase", "NonFiniteLossError", "build"]
