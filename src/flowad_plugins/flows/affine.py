"""The affine coupling maths every flow here shares: the clamped log-scale and the affine map with its inverse.

The coefficients have ``2·D`` channels on axis 1 (``N×2D`` or ``B×2D×h×w``): the raw log-scale ``a``, then the shift
``t``. With a clamp ``σ`` (``|σ(a)| < α``): ``y = x·exp(σ(a)) + t``, ``x = (y − t)·exp(−σ(a))``, ``log|det J| =
Σ_c σ(a)_c`` per position. Clamps: ``α·tanh(a)`` (FrEIA's, CFLOW-AD and FastFlow: ``tanh_clamp`` and
``tanh_clamp_via_sigmoid``, two evaluations of one function) and ``soft_clamp`` ``(2α/π)·atan(a/α)`` (CS-Flow).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

LogScaleClamp = Callable[[torch.Tensor, float], torch.Tensor]


def tanh_clamp(raw: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·tanh(raw)`` as one ``Tanh`` (any shape, elementwise)."""
    return alpha * torch.tanh(raw)


def tanh_clamp_via_sigmoid(raw: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·tanh(raw)`` evaluated as ``α·(2σ(2·raw) − 1)``: the same function to float32 rounding (and gradient)."""
    return torch.sigmoid(2.0 * raw) * (2.0 * alpha) - alpha


def soft_clamp(raw: torch.Tensor, alpha: float) -> torch.Tensor:
    """CS-Flow's soft clamp ``(2α/π)·atan(raw/α)``: smooth, ≈ ``raw`` near 0, bounded by ``±α``."""
    return (2 * alpha / math.pi) * torch.atan(raw / alpha)


def affine_forward(
    x: torch.Tensor, coefficients: torch.Tensor, alpha: float, clamp: LogScaleClamp
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (``N×D`` or ``B×D×h×w``) → ``(x·exp(σ(a)) + t, σ(a))`` for ``coefficients = [a; t]`` (``2D`` on axis 1)."""
    raw, shift = coefficients.chunk(2, dim=1)
    log_scale = clamp(raw, alpha)
    return torch.addcmul(shift, x, torch.exp(log_scale)), log_scale


def affine_inverse(y: torch.Tensor, coefficients: torch.Tensor, alpha: float, clamp: LogScaleClamp) -> torch.Tensor:
    """``x`` with ``affine_forward(x, coefficients, alpha, clamp)[0] == y``."""
    raw, shift = coefficients.chunk(2, dim=1)
    return (y - shift) * torch.exp(-clamp(raw, alpha))
