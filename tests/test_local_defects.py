"""Local synthetic defects: small, on the part, deterministic, and the image changes where the mask says."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.append(str(REPO / "benchmarks"))  # the harness lives next to the scripts, outside the package

from harness.local_defects import KINDS, add_local_defect, foreground_of  # noqa: E402


def _part(height: int = 96, width: int = 128, seed: int = 0) -> torch.Tensor:
    """A textured disc (the part) on a flat dark background, ``3×H×W`` in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    disc = ((ys - height / 2) ** 2 + (xs - width / 2) ** 2).float().sqrt() < 0.4 * min(height, width)
    texture = 0.5 + 0.2 * torch.rand(3, height, width, generator=generator)
    return torch.where(disc, texture, torch.full_like(texture, 0.05))


@pytest.mark.parametrize("kind", KINDS)
def test_a_defect_is_small_on_the_part_and_changes_the_image_inside_its_mask(kind: str) -> None:
    image, donor = _part(seed=0), _part(seed=1)
    defective, mask = add_local_defect(image, donor, np.random.default_rng(3), kind)
    assert defective.shape == image.shape and mask.shape == image.shape[-2:] and mask.dtype == torch.bool
    assert 0 < mask.float().mean() < 0.02, "a local defect covers well under 2 % of the image"
    assert bool(foreground_of(image)[mask].float().mean() > 0.5), "the defect lies on the part"
    change = (defective - image).abs().sum(dim=0)
    assert change[mask].mean() > 0.03 and change[mask].mean() > 5 * change[~mask].mean()
    assert float(defective.min()) >= 0 and float(defective.max()) <= 1


def test_the_same_seed_gives_the_same_defect_and_an_unknown_kind_is_named() -> None:
    image, donor = _part(seed=0), _part(seed=1)
    first = add_local_defect(image, donor, np.random.default_rng(5))
    second = add_local_defect(image, donor, np.random.default_rng(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match=r"kind must be one of \['transplant', 'spot', 'scratch'\]"):
        add_local_defect(image, donor, np.random.default_rng(0), "hole")


@pytest.mark.parametrize(("image_shape", "donor_shape", "message"), [
    ((3, 16, 64), (3, 16, 64), r"image must be 3×H×W with H and W ≥ 32, got shape \(3, 16, 64\)"),
    ((1, 64, 64), (1, 64, 64), r"image must be 3×H×W"),
    ((3, 64, 64), (3, 64, 96), r"donor must have the image's shape \(3, 64, 64\), got \(3, 64, 96\)"),
])
def test_bad_shapes_are_named(image_shape: tuple, donor_shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        add_local_defect(torch.rand(image_shape), torch.rand(donor_shape), np.random.default_rng(0), "spot")
