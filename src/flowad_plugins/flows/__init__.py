"""Invertible building blocks shared by the three flow heads.

- ``affine_coupling``: the coupling block of CFLOW-AD and FastFlow (forward, inverse, log-det per position).
- ``coupling``: subnets and the two stacks built from it (fibers, maps).
- ``fiber_pass``: CFLOW-AD's fast path (positional condition projected once per position).
- ``cross_scale``: CS-Flow's cross-scale coupling with soft clamp.
- ``positional``: the 2D positional encoding.
"""

from .affine_coupling import AffineCouplingBlock, CouplingFlow, clamped_log_scale
from .coupling import conv_flow, conv_subnet, fiber_flow, linear_subnet
from .cross_scale import CrossScaleCoupling, CrossScaleFlow, CrossScaleSubnet, MultiScaleActNorm, soft_clamp
from .fiber_pass import FiberStep, fiber_flow_forward, fold_conditional_flow, map_flow_forward
from .positional import PositionalEncoding2D, positional_encoding_2d

__all__ = [
    "AffineCouplingBlock",
    "CouplingFlow",
    "CrossScaleCoupling",
    "CrossScaleFlow",
    "CrossScaleSubnet",
    "FiberStep",
    "MultiScaleActNorm",
    "PositionalEncoding2D",
    "clamped_log_scale",
    "conv_flow",
    "conv_subnet",
    "fiber_flow",
    "fiber_flow_forward",
    "fold_conditional_flow",
    "linear_subnet",
    "map_flow_forward",
    "positional_encoding_2d",
    "soft_clamp",
]
