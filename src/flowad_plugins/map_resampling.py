"""Upsampling (bilinear) and Gaussian smoothing of score maps as products with small constant matrices.

Both operations are linear and separable, so a map ``M`` (``h×w``) upsampled to ``H×W`` and optionally smoothed is
``A · M · Bᵀ`` with ``A = K_H·U_{H←h}`` (``H×h``) and ``B = K_W·U_{W←w}`` (``W×w``): ``U`` the bilinear
interpolation matrix (``align_corners=False``, as ``F.interpolate``) and ``K`` the reflect-padded Gaussian (as
``SeparableGaussianBlur``). Two small GEMMs per map replace an interpolation, a padding and two 1-channel
convolutions, in eager mode and in exported graphs (where OpenVINO runs them as MatMul on constants instead of an
Interpolate and a reference-implementation Pad). Sums over scales stay linear: ``Σ_l A_l M_l B_lᵀ``.
"""

from __future__ import annotations

import numpy as np
import torch

from flowad_plugins.tracing import is_exporting

# Larger sides use F.interpolate and the 1-D convolutions instead (matrices would grow quadratically).
MAX_MATRIX_SIZE = 2048


def bilinear_matrix(source: int, target: int) -> np.ndarray:
    """``target×source`` float64 matrix of 1-D linear interpolation with ``align_corners=False`` (as
    ``F.interpolate``: source coordinate ``(i + ½)·source/target − ½``, clamped at 0, neighbours clamped at the end).

    Built with NumPy, so a traced or exported graph sees a constant, not the ops that made it.
    """
    source, target = int(source), int(target)
    positions = np.maximum((np.arange(target) + 0.5) * (source / target) - 0.5, 0.0)
    lower = np.floor(positions).astype(np.int64)
    upper = np.minimum(lower + 1, source - 1)
    fraction = positions - lower
    matrix = np.zeros((target, source))
    rows = np.arange(target)
    np.add.at(matrix, (rows, lower), 1.0 - fraction)
    np.add.at(matrix, (rows, upper), fraction)
    return matrix


def gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    """1-D Gaussian of radius ``⌊4σ + 0.5⌋`` truncated to ``size − 1`` taps per side, normalised (float64)."""
    radius = min(int(4 * sigma + 0.5), size - 1)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_matrix(sigma: float, size: int) -> np.ndarray:
    """``size×size`` float64 matrix of the reflect-padded 1-D Gaussian (row ``i`` = weights of output ``i``)."""
    kernel = gaussian_kernel(sigma, size)
    pad = (kernel.size - 1) // 2
    columns = np.abs(np.arange(size)[:, None] + np.arange(-pad, pad + 1)[None, :])  # reflect at 0
    columns = np.where(columns > size - 1, 2 * (size - 1) - columns, columns)  # reflect at size − 1
    rows = np.broadcast_to(np.arange(size)[:, None], columns.shape)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (rows, columns), np.broadcast_to(kernel, columns.shape))
    return matrix


class MapResampler:
    """``Σ_l A_l·M_l·B_lᵀ``: maps ``B×h_l×w_l`` → one ``B×1×H×W``, upsampled and optionally smoothed.

    Matrices are cached per shape, σ, device and dtype in eager mode; while a graph is captured they are built
    afresh, so they become constants of the exported graph (static input size).
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def supports(output_size: tuple[int, int]) -> bool:
        """Whether ``output_size`` is small enough for the matrix form."""
        return max(output_size) <= MAX_MATRIX_SIZE

    def _matrices(self, map_size: tuple[int, int], output_size: tuple[int, int], sigma: float,
                  like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        map_size = (int(map_size[0]), int(map_size[1]))
        output_size = (int(output_size[0]), int(output_size[1]))
        key = (map_size, output_size, sigma, str(like.device), like.dtype)
        cached = None if is_exporting() else self._cache.get(key)
        if cached is None:
            pair = []
            for source, target in zip(map_size, output_size, strict=True):
                matrix = bilinear_matrix(source, target)
                if sigma > 0:
                    matrix = gaussian_matrix(sigma, target) @ matrix
                pair.append(torch.as_tensor(matrix, dtype=like.dtype, device=like.device))
            cached = (pair[0], pair[1])
            if not is_exporting():
                self._cache[key] = cached
        return cached

    def __call__(self, maps: list[torch.Tensor], output_size: tuple[int, int], sigma: float = 0.0,
                 weights: list[float] | None = None) -> torch.Tensor:
        """``Σ_l weights[l]·A_l·maps[l]·B_lᵀ`` as ``B×1×H×W`` (``weights`` default 1)."""
        total = None
        for index, values in enumerate(maps):
            vertical, horizontal = self._matrices(tuple(values.shape[-2:]), output_size, sigma, values)
            if weights is not None:
                vertical = vertical * weights[index]
            resampled = torch.matmul(torch.matmul(vertical, values.unsqueeze(1)), horizontal.T)
            total = resampled if total is None else total + resampled
        return total
