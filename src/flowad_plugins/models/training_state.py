"""Process-group and random-number-state helpers for training (DDP-aware, checkpoint-safe)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def distributed_world_size() -> int:
    """Number of processes of the initialised default process group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_max(value: int, device: torch.device) -> int:
    """Largest ``value`` over all DDP ranks (``value`` itself in a single process)."""
    if distributed_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def collect_rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (initialised) CUDA generator states, as tensors and plain Python values
    (so ``torch.load(..., weights_only=True)`` still loads the checkpoint)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {"python": random.getstate(),
                              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                                        float(cached_gaussian)),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of ``collect_rng_states`` (CUDA states only when this machine has as many GPUs)."""
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
