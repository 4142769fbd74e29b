"""Small, low-contrast synthetic defects on real normal images: a validation split that looks like real defects.

anomalib's synthetic validation (``val_split_mode="synthetic"``) blends Perlin-noise blobs that cover a large part
of the image; every model separates those from normal images almost perfectly, so that split cannot tell candidate
settings apart, and it says little about real defects that cover well under 1 % of the image (a cut in a tire tread,
a speck on a bottle rim). These defects are local and subtle instead, one per call, placed on the part:

- ``transplant``: a square patch (2–5 % of the shorter side) copied from another normal image at another place,
  rotated by a multiple of 90° — a texture discontinuity;
- ``spot``: an ellipse of the same size whose brightness is scaled by 0.6–0.8 or 1.25–1.5 with a soft edge;
- ``scratch``: a short line (6–12 % of the side, 1–2 % wide) pulled towards a darker or brighter value.

Images are ``3×H×W`` float tensors in [0, 1] (what anomalib's datasets yield before the model's pre-processor);
masks are ``H×W`` booleans. Deterministic for a given generator seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

KINDS = ("transplant", "spot", "scratch")
MIN_SIDE = 32  # smallest image side: a defect of 2 % of it is still at least a few pixels after the size floor


def _place(rng: np.random.Generator, height: int, width: int, side: int,
           foreground: torch.Tensor | None) -> tuple[int, int]:
    """Top-left corner of a ``side``² box inside the image, on the foreground when one is given."""
    for _ in range(50):
        top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
        if foreground is None or bool(foreground[top + side // 2, left + side // 2]):
            return top, left
    return top, left


def part_score(image: torch.Tensor) -> torch.Tensor:
    """``H×W``: how much each pixel of ``image`` (``3×H×W``) looks like the part rather than the background — its
    distance from the border colour plus its local contrast (9×9). Defect-blind: no model, no normal data."""
    gray = image.mean(dim=0)
    border = torch.cat((gray[0], gray[-1], gray[:, 0], gray[:, -1])).median()
    local = F.avg_pool2d(gray[None, None], 9, stride=1, padding=4)[0, 0]
    contrast = (F.avg_pool2d((gray[None, None] - local) ** 2, 9, stride=1, padding=4)[0, 0]).sqrt()
    return (gray - border).abs() + contrast


def foreground_of(image: torch.Tensor) -> torch.Tensor:
    """``H×W``: where the part is, roughly — pixels whose ``part_score`` is above the image's median (a plain
    background gets no defects)."""
    score = part_score(image)
    return score > score.median()


def add_local_defect(
    image: torch.Tensor, donor: torch.Tensor, rng: np.random.Generator, kind: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(defective image 3×H×W, mask H×W)`` from a normal ``image`` and another normal ``donor`` of the same size.

    ``kind``: one of ``KINDS``; ``None`` picks one at random.
    """
    if kind is None:
        kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind not in KINDS:
        msg = f"kind must be one of {list(KINDS)} or None, got {kind!r}."
        raise ValueError(msg)
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < MIN_SIDE:
        msg = f"image must be 3×H×W with H and W ≥ {MIN_SIDE}, got shape {tuple(image.shape)}."
        raise ValueError(msg)
    if donor.shape != image.shape:
        msg = f"donor must have the image's shape {tuple(image.shape)}, got {tuple(donor.shape)}."
        raise ValueError(msg)
    _, height, width = image.shape
    short = min(height, width)
    out = image.clone()
    mask = torch.zeros(height, width, dtype=torch.bool)
    foreground = foreground_of(image)
    if kind == "transplant":
        side = max(4, int(rng.uniform(0.02, 0.05) * short))
        top, left = _place(rng, height, width, side, foreground)
        src_top, src_left = _place(rng, height, width, side, None)
        patch = donor[:, src_top:src_top + side, src_left:src_left + side]
        out[:, top:top + side, left:left + side] = torch.rot90(patch, int(rng.integers(1, 4)), dims=(1, 2))
        mask[top:top + side, left:left + side] = True
        return out, mask
    if kind == "spot":
        side = max(4, int(rng.uniform(0.02, 0.05) * short))
        top, left = _place(rng, height, width, side, foreground)
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
        ratio = float(rng.uniform(0.5, 1.0))
        angle = float(rng.uniform(0, math.pi))
        dy, dx = ys - (top + side / 2), xs - (left + side / 2)
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / (side / 2)
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / (side / 2 * ratio)
        radius = (u ** 2 + v ** 2).sqrt()
        weight = (1.5 - radius).clamp(0, 0.5) * 2  # 1 inside, a soft rim to 0
        factor = float(rng.uniform(0.6, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.5))
        out = (out * (1 + (factor - 1) * weight)).clamp(0, 1)
        mask = radius <= 1.25
        return out, mask
    length = rng.uniform(0.06, 0.12) * short
    thickness = max(1, int(rng.uniform(0.01, 0.02) * short))
    top, left = _place(rng, height, width, int(length) + 1, foreground)
    angle = float(rng.uniform(0, math.pi))
    steps = int(length * 2) + 1
    centre_y, centre_x = top + length / 2, left + length / 2
    offsets = torch.linspace(-length / 2, length / 2, steps)
    rows = (centre_y + offsets * math.sin(angle)).round().long().clamp(0, height - 1)
    cols = (centre_x + offsets * math.cos(angle)).round().long().clamp(0, width - 1)
    mask[rows, cols] = True
    if thickness > 1:
        mask = F.max_pool2d(mask[None, None].float(), 2 * (thickness // 2) + 1, stride=1,
                            padding=thickness // 2)[0, 0] > 0
    target = float(rng.uniform(0.0, 0.15) if rng.random() < 0.5 else rng.uniform(0.85, 1.0))
    strength = float(rng.uniform(0.4, 0.7))
    out[:, mask] = (1 - strength) * out[:, mask] + strength * target
    return out, mask
