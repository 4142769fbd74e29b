"""Invertible building blocks shared by the three flow heads."""

from .coupling import conv_flow, conv_subnet, fiber_flow, linear_subnet
from .cross_scale import CrossScaleCoupling, CrossScaleFlow, CrossScaleSubnet, soft_clamp
from .positional import PositionalEncoding2D, positional_encoding_2d

__all__ = [
    "CrossScaleCoupling",
    "CrossScaleFlow",
    "CrossScaleSubnet",
    "PositionalEncoding2D",
    "conv_flow",
    "conv_subnet",
    "fiber_flow",
    "linear_subnet",
    "positional_encoding_2d",
    "soft_clamp",
]
