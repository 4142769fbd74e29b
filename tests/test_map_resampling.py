"""Upsampling and smoothing as matrix products equal F.interpolate and the separable Gaussian blur."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from flowad_plugins.map_resampling import MapResampler, bilinear_matrix
from flowad_plugins.scoring import SeparableGaussianBlur


@pytest.mark.parametrize(("source", "target"), [(8, 64), (5, 37), (16, 16), (32, 20)])
def test_bilinear_matrix_equals_interpolate(source: int, target: int) -> None:
    values = torch.randn(3, source, dtype=torch.float64)
    expected = F.interpolate(values.unsqueeze(0), size=target, mode="linear", align_corners=False)[0]
    torch.testing.assert_close(values @ torch.as_tensor(bilinear_matrix(source, target)).T, expected)


@pytest.mark.parametrize("sigma", [0.0, 2.0, 4.0])
def test_resampler_equals_interpolate_then_blur(sigma: float) -> None:
    maps = [torch.randn(2, 8, 6), torch.randn(2, 4, 3)]
    size = (48, 40)
    upsampled = sum(F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False) for m in maps)
    expected = SeparableGaussianBlur(sigma)(upsampled) if sigma > 0 else upsampled
    result = MapResampler()(maps, size, sigma)
    assert result.shape == (2, 1, *size)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)
    weighted = MapResampler()(maps, size, sigma, weights=[0.5, 0.5])
    torch.testing.assert_close(weighted, 0.5 * expected, atol=1e-5, rtol=1e-5)
