"""A broken frame is never reported as normal.

A non-finite pixel (a failed read) would end as a NaN score, which every threshold reads as normal; a frame in the
wrong range (0–255: a missing ``/ 255``) gives a meaningless score. ``flags_non_finite_frames`` wraps a torch
model's eval ``forward(images B×3×H×W)``, which sees the pre-processor's (ImageNet-normalised) output: a frame with
a non-finite pixel or one beyond ``±MAX_NORMALISED_PIXEL`` is computed on zeros (nothing non-finite reaches the
graph's reductions), then gets ``pred_score = +inf`` and an all-``+inf`` anomaly map, so every threshold flags it.
The rule is part of the forward, so exported graphs behave as torch does; eager calls also log a warning.

``checks_images`` runs a torch model's own size check (``module.check_images``) before its forward.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch
from anomalib.data import InferenceBatch

from flowad_plugins.tracing import is_exporting

logger = logging.getLogger(__name__)

__all__ = ["MAX_NORMALISED_PIXEL", "check_channels", "checks_images", "finite_frames", "flags_non_finite_frames",
           "plausible_frames", "validated_input_size"]

# largest |value| of a pre-processed pixel: ImageNet normalisation maps [0, 1] into [-2.2, 2.7] (plus resize
# overshoot), while a 0–255 frame gives up to about 1,100
MAX_NORMALISED_PIXEL = 8.0


def validated_input_size(input_size: Sequence[int]) -> tuple[int, int]:
    """``input_size`` as ``(H, W)`` ints; ``ValueError`` naming it unless it is two positive integers."""
    if isinstance(input_size, str) or len(input_size) != 2 or not all(
            not isinstance(s, bool) and int(s) == s and s > 0 for s in input_size):
        msg = f"input_size must be two positive integers (H, W), e.g. [256, 256]; got {input_size!r}."
        raise ValueError(msg)
    return int(input_size[0]), int(input_size[1])


def finite_frames(images: torch.Tensor) -> torch.Tensor:
    """``B`` booleans: whether every pixel of each image (``B×C×H×W``) is finite."""
    return torch.isfinite(images).flatten(1).all(dim=1)


def plausible_frames(images: torch.Tensor) -> torch.Tensor:
    """``B`` booleans: whether every pixel of each image (``B×C×H×W``) is finite and within ``±MAX_NORMALISED_PIXEL``.

    ``abs(x) <= bound`` is False for NaN, so one comparison covers both rules (and stays one graph op per frame).
    """
    return (images.abs() <= MAX_NORMALISED_PIXEL).flatten(1).all(dim=1)


def flags_non_finite_frames(forward: Callable[[torch.nn.Module, torch.Tensor], object]) -> Callable:
    """Decorate an eval ``forward(images) -> InferenceBatch`` with the non-finite frame rule (see the module)."""

    @functools.wraps(forward)
    def guarded(module: torch.nn.Module, images: torch.Tensor) -> object:
        if module.training or images.dim() != 4:
            return forward(module, images)
        plausible = plausible_frames(images)
        # correctness: reading a tensor's value in Python cannot be captured in a graph (the graph keeps the +inf rule)
        if not is_exporting() and not bool(plausible.all()):
            _warn_broken_frames(images, plausible)
        valid = plausible.view(-1, 1, 1, 1)
        result = forward(module, torch.where(valid, images, torch.zeros((), dtype=images.dtype)))
        if not isinstance(result, InferenceBatch):
            return result
        infinity = torch.full((), float("inf"), dtype=result.pred_score.dtype)
        anomaly_map = result.anomaly_map
        if anomaly_map is not None:
            anomaly_map = torch.where(valid, anomaly_map, infinity.to(anomaly_map.dtype))
        return result._replace(pred_score=torch.where(plausible, result.pred_score, infinity), anomaly_map=anomaly_map)

    return guarded


def checks_images(forward: Callable[[torch.nn.Module, torch.Tensor], object]) -> Callable:
    """Decorate a torch model's ``forward(images B×3×H×W)`` to call ``module.check_images(images)`` first (a clear
    ``ValueError`` for a size the model cannot take)."""

    @functools.wraps(forward)
    def checked(module: torch.nn.Module, images: torch.Tensor) -> object:
        if not is_exporting():  # correctness: a Python check on symbolic sizes would specialise the exported graph
            module.check_images(images)
        return forward(module, images)

    return checked


def _warn_broken_frames(images: torch.Tensor, plausible: torch.Tensor) -> None:
    non_finite = int((~finite_frames(images)).sum())
    out_of_range = int((~plausible).sum()) - non_finite
    reasons = []
    if non_finite:
        reasons.append(f"{non_finite} hold NaN or infinite pixel values")
    if out_of_range:
        reasons.append(f"{out_of_range} have pixel values far outside [0, 1] (an 8-bit frame not divided by 255?)")
    logger.warning("Of %d images, %s: scored +inf and labelled anomalous. Check the camera frames or the "
                   "pre-processing.", len(plausible), " and ".join(reasons))


def check_channels(images: torch.Tensor) -> None:
    """Raise ``ValueError`` for a ``B×C×H×W`` batch whose ``C`` is neither 3 (RGB) nor 1 (grayscale, broadcast)."""
    if images.dim() == 4 and images.shape[1] not in (1, 3):
        msg = (f"images must have 3 (RGB) or 1 (grayscale) channels, got {images.shape[1]} channels "
               f"(shape {tuple(images.shape)}): convert RGBA or multi-spectral frames to RGB first.")
        raise ValueError(msg)
