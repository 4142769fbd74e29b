"""The log-likelihood every flow head scores a position with."""

from __future__ import annotations

import math

import torch

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_likelihood(
    z: torch.Tensor, log_jac_det: torch.Tensor, channel_dim: int = 1, with_constant: bool = True
) -> torch.Tensor:
    """Log-likelihood per dimension under a standard normal latent: ``(log|det J| − ½‖z‖²)/C − ½·log 2π``.

    ``z`` is ``N×C`` (fibers) or ``B×C×h×w``; ``log_jac_det`` broadcasts to the result (``N``, ``B×h×w``, or a
    scalar 0 when the head has none). ``with_constant=False`` leaves out ``−½·log 2π``. Always float32.
    """
    z = z.float()
    channels = z.shape[channel_dim]
    per_dimension = (log_jac_det.float() - 0.5 * z.pow(2).sum(dim=channel_dim)) / channels
    return per_dimension - HALF_LOG_2PI if with_constant else per_dimension
