"""Invertible building blocks of the three flow heads, all with one API.

Every flow module (a coupling block, a stack of them, CS-Flow's cross-scale flow and its parts) has
``forward(x, …) -> (y, log_det)`` and ``inverse(y, …) -> x``, with ``inverse(forward(x)[0]) == x``. The channel axis
is 1: ``x`` is fibers ``N×C`` or maps ``B×C×H×W`` (CS-Flow: a list of maps ``B×C×h_l×w_l``, one per scale); ``y`` has
the shape of ``x``. ``log_det`` is ``log|det J|`` per position (``N`` or ``B×H×W``) for the coupling flows, whose
Jacobian factorises over positions, and per image (``B``) for CS-Flow, whose subnets mix positions and scales. A
conditional flow takes its condition as the second argument of both (``N×P`` or ``B×P×H×W``).

- ``affine``: the coupling maths written once: the clamped log-scale and the affine map with its inverse.
- ``affine_coupling``: the coupling block of CFLOW-AD and FastFlow and the stack of them.
- ``coupling``: subnets and the two stacks built from them (fibers, maps).
- ``fiber_pass``: CFLOW-AD's fast path (positional condition projected once per position; fibers or maps).
- ``cross_scale``: CS-Flow's cross-scale coupling flow.
- ``positional``: the 2D positional encoding.
"""

from .affine import affine_forward, affine_inverse, soft_clamp, tanh_clamp, tanh_clamp_via_sigmoid
from .affine_coupling import COEFFICIENT_SCALE, GLOBAL_SCALE_FACTOR, AffineCouplingBlock, CouplingFlow
from .coupling import conv_flow, conv_subnet, fiber_flow, linear_subnet
from .cross_scale import CrossScaleCoupling, CrossScaleFlow, CrossScaleSubnet, MultiScaleActNorm
from .fiber_pass import FiberStep, fiber_flow_forward, fold_conditional_flow, map_flow_forward
from .positional import PositionalEncoding2D, positional_encoding_2d

__all__ = [
    "COEFFICIENT_SCALE",
    "GLOBAL_SCALE_FACTOR",
    "AffineCouplingBlock",
    "CouplingFlow",
    "CrossScaleCoupling",
    "CrossScaleFlow",
    "CrossScaleSubnet",
    "FiberStep",
    "MultiScaleActNorm",
    "PositionalEncoding2D",
    "affine_forward",
    "affine_inverse",
    "conv_flow",
    "conv_subnet",
    "fiber_flow",
    "fiber_flow_forward",
    "fold_conditional_flow",
    "linear_subnet",
    "map_flow_forward",
    "positional_encoding_2d",
    "soft_clamp",
    "tanh_clamp",
    "tanh_clamp_via_sigmoid",
]
