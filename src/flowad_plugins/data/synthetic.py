"""A small industrial-looking anomaly dataset generated on the fly (seeded, offline, seconds).

Two categories in MVTec AD's folder layout, so anomalib's ``MVTecAD`` reader handles them:

- ``surface``: a brushed, grainy metal-like texture; defects ``scratch``, ``spot``, ``crack``.
- ``object``: a machined round part (ring with holes) on a dark belt; defects ``scratch``, ``spot``,
  ``missing_part``.

Every defective image has an exact pixel mask (``ground_truth/<defect>/<id>_mask.png``).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

CATEGORIES: dict[str, tuple[str, ...]] = {
    "surface": ("scratch", "spot", "crack"),
    "object": ("scratch", "spot", "missing_part"),
}


@dataclass(frozen=True)
class SyntheticSpec:
    """How much to generate; stored next to the data so a changed spec regenerates it."""

    category: str = "surface"
    image_size: int = 256
    num_train: int = 80
    num_test_good: int = 12
    num_test_per_defect: int = 8
    seed: int = 0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of ``size×size`` made from a ``cells×cells`` random grid."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    noise = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return noise / (np.abs(noise).max() + 1e-6)


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed metal: horizontal streaks, grain and a gentle illumination gradient, ``size×size×3`` float."""
    streaks = cv2.resize(rng.standard_normal((size, 1)).astype(np.float32), (size, size))
    grain = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.0)
    light = _smooth_noise(rng, size, 3)
    gray = 0.55 + 0.06 * streaks + 0.05 * grain + 0.08 * light
    tint = np.array([1.0, 0.98, 0.93], dtype=np.float32) * rng.uniform(0.95, 1.05)
    return np.clip(gray[..., None] * tint, 0, 1)


def _object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A ring-shaped part with four holes on a dark belt; returns (image, part mask)."""
    belt = 0.12 + 0.03 * _smooth_noise(rng, size, 8) + 0.01 * rng.standard_normal((size, size)).astype(np.float32)
    image = np.repeat(belt[..., None], 3, axis=2)
    center = np.array([size / 2, size / 2]) + rng.uniform(-0.03, 0.03, 2) * size
    outer, inner = 0.38 * size, 0.16 * size
    part = np.zeros((size, size), np.uint8)
    cv2.circle(part, tuple(int(c) for c in center), int(outer), 1, -1)
    cv2.circle(part, tuple(int(c) for c in center), int(inner), 0, -1)
    angle0 = rng.uniform(0, np.pi / 2)
    for k in range(4):
        angle = angle0 + k * np.pi / 2
        hole = center + 0.27 * size * np.array([np.cos(angle), np.sin(angle)])
        cv2.circle(part, tuple(int(c) for c in hole), int(0.045 * size), 0, -1)
    shade = 0.62 + 0.05 * _smooth_noise(rng, size, 4) + 0.015 * rng.standard_normal((size, size)).astype(np.float32)
    metal = shade[..., None] * np.array([0.95, 0.97, 1.0], dtype=np.float32)
    image = np.where(part[..., None] > 0, metal, image)
    return np.clip(image, 0, 1), part


def _scratch(rng: np.random.Generator, image: np.ndarray, region: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    ys, xs = np.nonzero(region)
    pick = rng.integers(len(ys))
    start = np.array([xs[pick], ys[pick]], dtype=float)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.2, 0.4) * size
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    cv2.line(mask, tuple(int(v) for v in start), tuple(int(v) for v in end), 1, int(rng.integers(2, 4)))
    mask &= region
    value = rng.choice([0.95, 0.2])
    image[mask > 0] = value
    return mask


def _spot(rng: np.random.Generator, image: np.ndarray, region: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    ys, xs = np.nonzero(region)
    pick = rng.integers(len(ys))
    axes = (int(rng.uniform(0.03, 0.07) * size), int(rng.uniform(0.03, 0.07) * size))
    cv2.ellipse(mask, (int(xs[pick]), int(ys[pick])), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    mask &= region
    color = np.array(rng.choice([[0.35, 0.2, 0.1], [0.1, 0.1, 0.1], [0.6, 0.45, 0.2]]), dtype=np.float32)
    image[mask > 0] = 0.3 * image[mask > 0] + 0.7 * color
    return mask


def _crack(rng: np.random.Generator, image: np.ndarray, region: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    point = rng.uniform(0.25, 0.75, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    points = [point.copy()]
    for _ in range(int(rng.integers(12, 20))):
        angle += rng.normal(0, 0.5)
        point = point + rng.uniform(4, 9) * size / 256 * np.array([np.cos(angle), np.sin(angle)])
        points.append(point.copy())
    cv2.polylines(mask, [np.array(points, dtype=np.int32)], False, 1, 2)
    mask &= region
    image[mask > 0] *= 0.25
    return mask


def _missing_part(rng: np.random.Generator, image: np.ndarray, region: np.ndarray, belt: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    wedge = np.zeros((size, size), np.uint8)
    start = rng.uniform(0, 360)
    cv2.ellipse(wedge, (size // 2, size // 2), (size // 2, size // 2), 0, start, start + rng.uniform(20, 45), 1, -1)
    mask = wedge & region
    image[mask > 0] = belt[mask > 0]
    return mask


def generate_image(spec: SyntheticSpec, index: int, defect: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Render image ``index`` (``uint8 H×W×3``, RGB) and, for a defect, its mask (``uint8 H×W``, 0/255)."""
    rng = np.random.default_rng([spec.seed, index, zlib.crc32((defect or "good").encode())])
    size = spec.image_size
    if spec.category == "surface":
        image = _surface(rng, size)
        region = np.ones((size, size), np.uint8)
        background = None
    else:
        image, region = _object(np.random.default_rng([spec.seed, index, 7]), size)
        background = np.where(region[..., None] > 0, 0.12, image)
    mask = None
    if defect == "scratch":
        mask = _scratch(rng, image, region)
    elif defect == "spot":
        mask = _spot(rng, image, region)
    elif defect == "crack":
        mask = _crack(rng, image, region)
    elif defect == "missing_part":
        mask = _missing_part(rng, image, region, background)
    elif defect is not None:
        msg = f"Unknown defect={defect!r} for category={spec.category!r}; allowed: {CATEGORIES[spec.category]}."
        raise ValueError(msg)
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return pixels, None if mask is None else (mask > 0).astype(np.uint8) * 255


def generate_dataset(root: str | Path, spec: SyntheticSpec) -> Path:
    """Write the category of ``spec`` under ``root`` in MVTec layout (skipped if already there). Returns its path."""
    if spec.category not in CATEGORIES:
        msg = f"Unknown category={spec.category!r}; allowed: {sorted(CATEGORIES)}."
        raise ValueError(msg)
    if spec.image_size < 32 or min(spec.num_train, spec.num_test_good, spec.num_test_per_defect) < 1:
        msg = f"SyntheticSpec needs image_size ≥ 32 and at least one image per split, got {spec}."
        raise ValueError(msg)
    directory = Path(root) / spec.category
    marker = directory / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        return directory
    index = 0
    splits = [("train", "good", spec.num_train), ("test", "good", spec.num_test_good)]
    splits += [("test", defect, spec.num_test_per_defect) for defect in CATEGORIES[spec.category]]
    for split, defect, count in splits:
        (directory / split / defect).mkdir(parents=True, exist_ok=True)
        if defect != "good":
            (directory / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for number in range(count):
            image, mask = generate_image(spec, index, None if defect == "good" else defect)
            index += 1
            cv2.imwrite(str(directory / split / defect / f"{number:03d}.png"), image[..., ::-1])
            if mask is not None:
                cv2.imwrite(str(directory / "ground_truth" / defect / f"{number:03d}_mask.png"), mask)
    marker.write_text(json.dumps(asdict(spec)))
    return directory
