"""Invertible building blocks shared by the three flow heads."""

from .conv_pass import conv_flow_forward
from .coupling import conv_flow, conv_subnet, coupling_log_scale, fiber_flow, linear_subnet
from .cross_scale import CrossScaleCoupling, CrossScaleFlow, CrossScaleSubnet, MultiScaleActNorm, soft_clamp
from .fiber_pass import FiberStep, fiber_flow_forward, fiber_flow_steps
from .positional import PositionalEncoding2D, positional_encoding_2d

__all__ = [
    "CrossScaleCoupling",
    "CrossScaleFlow",
    "CrossScaleSubnet",
    "FiberStep",
    "MultiScaleActNorm",
    "PositionalEncoding2D",
    "conv_flow",
    "conv_flow_forward",
    "conv_subnet",
    "coupling_log_scale",
    "fiber_flow",
    "fiber_flow_forward",
    "fiber_flow_steps",
    "linear_subnet",
    "positional_encoding_2d",
    "soft_clamp",
]
