"""Mixed precision: the frozen backbone may run in bf16/fp16, the flows and scores always run in float32.

Under Lightning's ``"bf16-mixed"`` / ``"16-mixed"`` every step runs inside ``torch.autocast``. The backbone profits;
a flow does not tolerate it: its log-determinant sums hundreds of log-scales per position and its likelihood is a
difference of large terms, which bf16 (8-bit mantissa) or fp16 (overflow past 65504) would corrupt. So the models
run the flow, the likelihood and the scoring on float32 features inside ``float32_region``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def float32_region(device_type: str) -> Iterator[None]:
    """Disable autocast for ``device_type`` ("cpu", "cuda", …) inside the block, if it is enabled; else no-op."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 (unchanged, no graph op, when it already is)."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()
