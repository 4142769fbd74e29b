"""Upsampling and Gaussian smoothing of score maps as products with small constant matrices.

Both are linear and separable: a map ``M`` (``h×w``) upsampled to ``H×W`` and smoothed is ``A·M·Bᵀ`` with
``A = K_H·U_{H←h}`` (``U``: bilinear interpolation as ``F.interpolate(align_corners=False)``, ``K``: reflect-padded
Gaussian). The same two GEMMs run in eager mode and in exported graphs (a MatMul on constants instead of Interpolate
+ Pad + convolutions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flowad_plugins.tracing import is_exporting


def bilinear_matrix(source: int, target: int) -> np.ndarray:
    """``target×source`` float64 matrix of 1-D linear interpolation, ``align_corners=False`` (as ``F.interpolate``)."""
    positions = np.maximum((np.arange(target) + 0.5) * (source / target) - 0.5, 0.0)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, source - 1)
    fraction = positions - lower
    matrix = np.zeros((target, source))
    rows = np.arange(target)
    np.add.at(matrix, (rows, lower), 1.0 - fraction)
    np.add.at(matrix, (rows, upper), fraction)
    return matrix


def gaussian_matrix(sigma: float, size: int) -> np.ndarray:
    """``size×size`` float64 matrix of a reflect-padded 1-D Gaussian (radius ``⌊4σ + ½⌋``, truncated to the side)."""
    radius = min(int(4 * sigma + 0.5), size - 1)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    columns = np.abs(np.arange(size)[:, None] + offsets[None, :].astype(np.int64))  # reflect at 0
    columns = np.where(columns > size - 1, 2 * (size - 1) - columns, columns)  # reflect at size − 1
    rows = np.broadcast_to(np.arange(size)[:, None], columns.shape)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (rows, columns), np.broadcast_to(kernel, columns.shape))
    return matrix


def resampling_matrix(source: int, target: int, sigma: float) -> np.ndarray:
    """``target×source``: bilinear upsampling from ``source`` to ``target`` samples, then a Gaussian of ``sigma``
    (0 = none)."""
    matrix = bilinear_matrix(source, target)
    return gaussian_matrix(sigma, target) @ matrix if sigma > 0 else matrix


class MapResampler:
    """``Σ_l w_l·A_l·M_l·B_lᵀ``: maps ``B×h_l×w_l`` → one ``B×1×H×W``, upsampled and smoothed. The matrices are
    cached in eager mode only: a captured graph gets fresh constants, never a tensor cached in another mode."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _matrices(self, map_size: Sequence[int], output_size: Sequence[int], sigma: float,
                  like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (*map(int, map_size), *map(int, output_size), float(sigma), str(like.device), like.dtype)
        cached = None if is_exporting() else self._cache.get(key)
        if cached is None:
            vertical, horizontal = (torch.as_tensor(resampling_matrix(int(s), int(t), sigma), dtype=like.dtype,
                                                    device=like.device)
                                    for s, t in zip(map_size, output_size, strict=True))
            cached = (vertical, horizontal)
            if not is_exporting():
                self._cache[key] = cached
        return cached

    def __call__(self, maps: Sequence[torch.Tensor], output_size: Sequence[int], sigma: float = 0.0,
                 weights: Sequence[float] | None = None) -> torch.Tensor:
        """``maps[l]``: ``B×h_l×w_l`` → ``B×1×H×W`` for ``output_size = (H, W)`` (``weights`` default 1)."""
        total = None
        for index, values in enumerate(maps):
            vertical, horizontal = self._matrices(values.shape[-2:], output_size, sigma, values)
            if weights is not None:
                vertical = vertical * weights[index]
            resampled = torch.matmul(torch.matmul(vertical, values.unsqueeze(1)), horizontal.T)
            total = resampled if total is None else total + resampled
        return total

    def blur(self, maps: torch.Tensor, sigma: float) -> torch.Tensor:
        """``B×1×H×W`` maps smoothed by a Gaussian of ``sigma`` pixels (reflect borders); unchanged for 0."""
        if sigma <= 0:
            return maps
        return self([maps[:, 0]], maps.shape[-2:], sigma)
