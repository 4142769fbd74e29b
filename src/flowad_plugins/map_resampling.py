"""Upsampling (bilinear) and Gaussian smoothing of score maps as products with small constant matrices.

Both operations are linear and separable, so a map ``M`` (``h×w``) upsampled to ``H×W`` and optionally smoothed is
``A · M · Bᵀ`` with ``A = K_H·U_{H←h}`` (``H×h``) and ``B = K_W·U_{W←w}`` (``W×w``): ``U`` the bilinear
interpolation matrix (``align_corners=False``, as ``F.interpolate``) and ``K`` the reflect-padded Gaussian (as
``SeparableGaussianBlur``). Two small GEMMs per map replace an interpolation, a padding and two 1-channel
convolutions, in eager mode and in exported graphs (where OpenVINO runs them as MatMul on constants instead of an
Interpolate and a reference-implementation Pad). Sums over scales stay linear: ``Σ_l A_l M_l B_lᵀ``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from flowad_plugins.tracing import is_exporting

# Larger sides use F.interpolate and the 1-D convolutions instead (matrices would grow quadratically).
MAX_MATRIX_SIZE = 2048


def bilinear_matrix(source: int, target: int) -> torch.Tensor:
    """``target×source`` float64 matrix of 1-D linear interpolation (``align_corners=False``, as ``F.interpolate``)."""
    identity = torch.eye(source, dtype=torch.float64).unsqueeze(0)  # 1×source channels×source samples
    return F.interpolate(identity, size=target, mode="linear", align_corners=False)[0].T


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    """1-D Gaussian of radius ``⌊4σ + 0.5⌋`` truncated to ``size − 1`` taps per side, normalised (float64)."""
    radius = min(int(4 * sigma + 0.5), size - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_matrix(sigma: float, size: int) -> torch.Tensor:
    """``size×size`` float64 matrix of the reflect-padded 1-D Gaussian (row ``i`` = weights of output ``i``)."""
    kernel = gaussian_kernel(sigma, size)
    pad = (kernel.numel() - 1) // 2
    columns = (torch.arange(size).unsqueeze(1) + torch.arange(-pad, pad + 1).unsqueeze(0)).abs()  # reflect at 0
    columns = torch.where(columns > size - 1, 2 * (size - 1) - columns, columns)  # reflect at size − 1
    rows = torch.arange(size).unsqueeze(1).expand_as(columns)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((rows, columns), kernel.expand(size, -1).clone(), accumulate=True)
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
        key = (map_size, output_size, sigma, str(like.device), like.dtype)
        cached = None if is_exporting() else self._cache.get(key)
        if cached is None:
            pair = []
            for source, target in zip(map_size, output_size, strict=True):
                matrix = bilinear_matrix(source, target)
                if sigma > 0:
                    matrix = gaussian_matrix(sigma, target) @ matrix
                pair.append(matrix.to(device=like.device, dtype=like.dtype))
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
