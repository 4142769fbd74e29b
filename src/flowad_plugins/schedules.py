"""Learning-rate schedules shared by the flow models (stepped once per training batch)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int | float,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 1e-3,
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to ``min_lr_ratio``·lr; an
    unknown length (``total_steps`` infinite or < 1, e.g. ``max_epochs=-1``) keeps the LR constant after warm-up."""
    if not 0 <= warmup_fraction < 1:
        msg = f"warmup_fraction must be in [0, 1), got {warmup_fraction}."
        raise ValueError(msg)
    known = math.isfinite(total_steps) and total_steps >= 1
    total = int(total_steps) if known else 0
    warmup = int(warmup_fraction * total) if known else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not known:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
