"""Eval-mode inference over a batch in cache-sized passes of whole images.

On a CPU a backbone + flow runs faster on a few images at a time, whose activations stay in cache: CflowAD
(efficientnet_lite0, 256 px, 2 cores) takes 103 ms for a batch of 8 in one pass, 72 ms in two passes of 4
(``benchmarks/results/cflow_cpu_speed.md``). Every image is scored independently, so passes change no output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from anomalib.data import InferenceBatch

from flowad_plugins.tracing import is_exporting

__all__ = ["concatenate_batches", "images_per_pass", "in_image_passes"]


def images_per_pass(image_size: tuple[int, int] | torch.Size, pass_pixels: int) -> int:
    """Whole images of ``image_size`` (H, W) that fit in ``pass_pixels`` input pixels (at least 1)."""
    return max(1, int(pass_pixels) // (int(image_size[0]) * int(image_size[1])))


def concatenate_batches(parts: list[InferenceBatch]) -> InferenceBatch:
    """One ``InferenceBatch`` from consecutive parts (fields concatenated along the batch; ``None`` stays ``None``)."""
    return InferenceBatch(**{
        field: None if getattr(parts[0], field) is None else torch.cat([getattr(part, field) for part in parts])
        for field in InferenceBatch._fields
    })


def in_image_passes(forward: Callable[[torch.nn.Module, torch.Tensor], InferenceBatch | object]) -> Callable:
    """Decorate a torch model's ``forward(images B×3×H×W)`` to run eval batches in passes of whole images.

    A pass holds at most ``module.inference_pass_pixels`` input pixels (≥ 1 image); ``0`` or ``None`` disables
    passes. Train mode, export and tracing call ``forward`` once on the whole batch.
    """

    @functools.wraps(forward)
    def run_in_passes(module: torch.nn.Module, images: torch.Tensor) -> InferenceBatch | object:
        pass_pixels = getattr(module, "inference_pass_pixels", None)
        # correctness: a graph must take any batch size; splitting in Python would fix its batch count
        if module.training or not pass_pixels or is_exporting() or images.dim() != 4:
            return forward(module, images)
        per_pass = images_per_pass(images.shape[-2:], pass_pixels)
        if len(images) <= per_pass:
            return forward(module, images)
        return concatenate_batches([forward(module, part) for part in images.split(per_pass)])

    return run_in_passes
