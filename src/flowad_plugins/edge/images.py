"""Reading images for the edge runtime with Pillow and numpy only (no torch).

``read_image`` returns what anomalib's training pipeline feeds the model, RGB ``H×W×3`` float32 in [0, 1], with the
EXIF orientation applied and the full range of 16-bit images kept (Pillow's ``convert("RGB")`` clips them at 255).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flowad_plugins.edge.settings import IMAGE_SUFFIXES

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAXIMUM_16_BIT = 65535.0

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "find_images", "read_image", "resize_image"]


class ImageReadError(ValueError):
    """An image file that cannot be decoded (empty, truncated, not an image)."""


def read_image(path: str | Path) -> np.ndarray:
    """RGB image ``H×W×3`` float32 in [0, 1] from ``path``, EXIF orientation applied; ``ImageReadError`` naming the
    file when it cannot be decoded. 16-bit grayscale is scaled by 1/65535, float (``F``) clipped to [0, 1], any
    other mode converted by Pillow (which decodes 16-bit RGB PNGs to their high byte, so their range is kept too).
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            return _to_rgb_float(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        msg = f"cannot read image {str(path)!r}: {error.__class__.__name__}: {error}"
        raise ImageReadError(msg) from error


def _to_rgb_float(image: Image.Image) -> np.ndarray:
    """``H×W×3`` float32 in [0, 1] from any Pillow mode."""
    if image.mode in SIXTEEN_BIT_MODES:
        gray = np.asarray(image).astype(np.float32) / MAXIMUM_16_BIT
        return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow asks palette images with transparency to go through RGBA
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``image`` ``H×W×C`` float32 resized to ``size = (height, width)`` (bilinear, antialiased when shrinking).

    Each channel is resized as a float Pillow image, so 16-bit precision is kept. Unchanged when already ``size``.
    """
    height, width = int(size[0]), int(size[1])
    if image.shape[:2] == (height, width):
        return image
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)).resize((width, height),
                                                                                      Image.Resampling.BILINEAR))
        for c in range(image.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0).astype(np.float32)


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files among ``inputs``: files as given, folders searched recursively (sorted, suffixes ``IMAGE_SUFFIXES``).

    Raises ``FileNotFoundError`` naming an input that does not exist.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            msg = f"images: {str(path)!r} is neither an image file nor a folder."
            raise FileNotFoundError(msg)
    return found
