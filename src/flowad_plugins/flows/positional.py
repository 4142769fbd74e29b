"""2D sinusoidal positional encoding: the condition of CFLOW-AD's fiber flows."""

from __future__ import annotations

import math

import torch
from torch import nn


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """``dim×height×width`` encoding: the first half codes x, the second y, each interleaving ``sin``/``cos`` of the
    coordinate at frequencies ``10000^(-2i/(dim/2))`` (the Transformer's, on two axes: CFLOW-AD, §3.3)."""
    if dim <= 0 or dim % 4 != 0:
        msg = f"condition_dim must be a positive multiple of 4, got {dim}."
        raise ValueError(msg)
    half = dim // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(1e4) / half))
    xs = torch.arange(width, dtype=torch.float64)[:, None] * frequencies  # W×half/2
    ys = torch.arange(height, dtype=torch.float64)[:, None] * frequencies  # H×half/2
    encoding = torch.zeros(dim, height, width, dtype=torch.float64)
    encoding[0:half:2] = torch.sin(xs).T[:, None, :]
    encoding[1:half:2] = torch.cos(xs).T[:, None, :]
    encoding[half::2] = torch.sin(ys).T[:, :, None]
    encoding[half + 1 :: 2] = torch.cos(ys).T[:, :, None]
    return encoding.float()


class PositionalEncoding2D(nn.Module):
    """Positional condition for every fiber of a feature map, cached per map size: ``forward(height, width) ->
    (height·width)×dim`` in row-major (y, x) order, the order of ``features.flatten(2)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        positional_encoding_2d(dim, 1, 1)  # validates dim
        self.dim = dim
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def forward(self, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Condition vectors ``(H·W)×dim`` for a ``height×width`` feature map, on ``device``."""
        key = (int(height), int(width), str(device))
        encoding = self._cache.get(key)
        if encoding is None:
            encoding = positional_encoding_2d(self.dim, key[0], key[1]).flatten(1).T.contiguous().to(device)
            self._cache[key] = encoding
        return encoding
