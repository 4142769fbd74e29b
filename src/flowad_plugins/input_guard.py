"""A frame with non-finite pixels is never reported as normal.

A broken camera frame (a NaN or ±inf pixel, e.g. a failed read or an overflowed conversion) would otherwise flow
through the backbone as NaN and end as a NaN score, which every threshold comparison reads as "not above": normal.
``flags_non_finite_frames`` wraps a torch model's eval ``forward(images B×3×H×W)``: such frames are computed on
zeros (so nothing non-finite reaches the other images or the graph's reductions) and then get ``pred_score = +inf``
and an anomaly map of ``+inf`` everywhere, so every threshold labels them anomalous and the whole mask is set. The
rule is part of the forward, so the exported ONNX/OpenVINO graphs give the same outcome as torch. Eager calls also
log a warning naming how many frames of the batch were affected.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from anomalib.data import InferenceBatch

from flowad_plugins.tracing import is_exporting

logger = logging.getLogger(__name__)

__all__ = ["check_channels", "finite_frames", "flags_non_finite_frames"]


def finite_frames(images: torch.Tensor) -> torch.Tensor:
    """``B`` booleans: whether every pixel of each image (``B×C×H×W``) is finite."""
    return torch.isfinite(images).flatten(1).all(dim=1)


def flags_non_finite_frames(forward: Callable[[torch.nn.Module, torch.Tensor], object]) -> Callable:
    """Decorate an eval ``forward(images) -> InferenceBatch`` with the non-finite frame rule (see the module)."""

    @functools.wraps(forward)
    def guarded(module: torch.nn.Module, images: torch.Tensor) -> object:
        if module.training or images.dim() != 4:
            return forward(module, images)
        finite = finite_frames(images)
        if not is_exporting() and not bool(finite.all()):
            logger.warning("%d of %d images hold NaN or infinite pixel values: scored +inf and labelled anomalous. "
                           "Check the camera frames or the pre-processing.", int((~finite).sum()), len(finite))
        valid = finite.view(-1, 1, 1, 1)
        result = forward(module, torch.where(valid, images, torch.zeros((), dtype=images.dtype)))
        if not isinstance(result, InferenceBatch):
            return result
        infinity = torch.full((), float("inf"), dtype=result.pred_score.dtype)
        anomaly_map = result.anomaly_map
        if anomaly_map is not None:
            anomaly_map = torch.where(valid, anomaly_map, infinity.to(anomaly_map.dtype))
        return result._replace(pred_score=torch.where(finite, result.pred_score, infinity), anomaly_map=anomaly_map)

    return guarded


def check_channels(images: torch.Tensor) -> None:
    """Raise ``ValueError`` for a ``B×C×H×W`` batch whose ``C`` is neither 3 (RGB) nor 1 (grayscale, broadcast)."""
    if images.dim() == 4 and images.shape[1] not in (1, 3) and not is_exporting():
        msg = (f"images must have 3 (RGB) or 1 (grayscale) channels, got {images.shape[1]} channels "
               f"(shape {tuple(images.shape)}): convert RGBA or multi-spectral frames to RGB first.")
        raise ValueError(msg)
