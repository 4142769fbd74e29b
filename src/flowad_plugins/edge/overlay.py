"""Overlay PNGs with numpy and Pillow: the image, the anomaly map as a heat colouring, the mask's contour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Control points of a blue → cyan → green → yellow → red colour ramp ("jet"-like) over [0, 1].
_RAMP_POSITIONS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_RAMP_COLOURS = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]], dtype=np.float32)
CONTOUR_COLOUR = np.array([1.0, 1.0, 1.0], dtype=np.float32)

__all__ = ["heat_colours", "mask_contour", "overlay_image", "save_overlay"]


def heat_colours(values: np.ndarray) -> np.ndarray:
    """``h×w`` values in [0, 1] (0.5 = threshold) → ``h×w×3`` float32 RGB; non-finite values are shown as 1 (red)."""
    clean = np.clip(np.nan_to_num(values.astype(np.float32), nan=1.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return np.stack([np.interp(clean, _RAMP_POSITIONS, _RAMP_COLOURS[:, c]) for c in range(3)], axis=-1).astype(
        np.float32
    )


def _resize_plane(plane: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    if plane.shape == (height, width):
        return plane
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize((width, height), resample))


def mask_contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boolean ``h×w`` outline of ``mask``: mask pixels with a 4-neighbour outside it, grown to ``thickness``."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    contour = mask & ~interior
    for _ in range(max(0, thickness - 1)):
        grown = np.pad(contour, 1, constant_values=False)
        contour = grown[1:-1, 1:-1] | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
    return contour


def overlay_image(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``H×W×3`` uint8: ``image`` (``H×W×3`` in [0, 1]) blended with the heat colours of ``anomaly_map`` (``h×w``,
    resized to H×W) and the contour of ``mask`` (``h×w``) drawn on top."""
    height, width = image.shape[:2]
    heat = heat_colours(_resize_plane(np.nan_to_num(anomaly_map, nan=1.0, posinf=1.0, neginf=0.0), height, width))
    big_mask = _resize_plane(mask.astype(np.float32), height, width, nearest=True) > 0.5
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    blended[mask_contour(big_mask, thickness=max(1, round(max(height, width) / 256)))] = CONTOUR_COLOUR
    return (np.clip(blended, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def save_overlay(path: str | Path, image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray) -> Path:
    """Write ``overlay_image(image, anomaly_map, mask)`` as PNG to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_image(image, anomaly_map, mask)).save(path)
    return path
