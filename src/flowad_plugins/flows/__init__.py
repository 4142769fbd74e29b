"""Invertible building blocks of the three flow heads, all with one API.

Every flow module has ``forward(x, …) -> (y, log_det)`` and ``inverse(y, …) -> x``. The channel axis is 1: ``x`` is
fibers ``N×C`` or maps ``B×C×H×W`` (CS-Flow: a list of maps ``B×C×h_l×w_l``, one per scale); ``y`` has the shape of
``x``. ``log_det`` is ``log|det J|`` per position (``N`` or ``B×H×W``) for the coupling flows and per image (``B``)
for CS-Flow, whose subnets mix positions and scales. A conditional flow takes its condition (``N×P`` or
``B×P×H×W``) as the second argument of both.
"""

from .affine import soft_clamp, tanh_clamp, tanh_clamp_via_sigmoid
from .coupling import conv_flow, conv_subnet, fiber_flow, linear_subnet
from .cross_scale import CrossScaleFlow
from .fiber_pass import FiberStep, fiber_flow_forward, fold_conditional_flow, map_flow_forward
from .positional import PositionalEncoding2D, positional_encoding_2d

__all__ = [
    "CrossScaleFlow", "FiberStep", "PositionalEncoding2D", "conv_flow", "conv_subnet", "fiber_flow",
    "fiber_flow_forward", "fold_conditional_flow", "linear_subnet", "map_flow_forward", "positional_encoding_2d",
    "soft_clamp", "tanh_clamp", "tanh_clamp_via_sigmoid",
]
