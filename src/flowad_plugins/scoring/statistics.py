"""Statistics of normal training data that the scorer stands on, and when a fit writes them.

``LikelihoodStatistics``: mean and std of the log-likelihood per scale. ``NormalStatisticsLifeCycle`` (a callback of
every flow model) is the one place that writes them: it forgets the previous epoch's values at each training epoch's
start (each optimizer step then adds its own), and commits them at the start of validation (Lightning validates
*before* ``on_train_epoch_end``, and thresholds must be set on this epoch's scoring) or, without validation, at the
epoch's end. Under DDP the sums are all-reduced, so every rank writes the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class LikelihoodStatistics(nn.Module):
    """Mean and std of the log-likelihood of normal training data, one pair per scale (buffers ``mean``, ``std``).

    ``update(scale, values)`` during an epoch, then ``commit()``; ``fitted`` is true once committed.
    """

    def __init__(self, num_scales: int) -> None:
        super().__init__()
        self.num_scales = num_scales
        self.register_buffer("mean", torch.zeros(num_scales))
        self.register_buffer("std", torch.ones(num_scales))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._sums = torch.zeros(num_scales, 3, dtype=torch.float64)  # count, Σx, Σx² (not saved)

    def reset(self) -> None:
        """Forget the values accumulated since the last ``commit``."""
        self._sums = torch.zeros(self.num_scales, 3, dtype=torch.float64)

    @torch.no_grad()
    def update_all(self, log_likelihoods: Sequence[torch.Tensor | None]) -> None:
        """Add ``log_likelihoods[l]`` (any shape; ``None`` = nothing new at scale ``l``) of normal data."""
        if len(log_likelihoods) != self.num_scales:
            msg = f"Expected log-likelihoods for {self.num_scales} scales, got {len(log_likelihoods)}."
            raise ValueError(msg)
        for scale, values in enumerate(log_likelihoods):
            if values is not None:
                values = values.detach().double().flatten().cpu()
                self._sums[scale] += torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64),
                                                  values.sum(), values.pow(2).sum()])

    @torch.no_grad()
    def commit(self) -> None:
        """Write ``mean``/``std`` from the accumulated sums; a no-op when nothing was accumulated."""
        sums = _all_reduce(self._sums.to(self.mean.device))
        count = sums[:, 0]
        if bool((count < 2).any()):
            return
        mean = sums[:, 1] / count
        self.mean.copy_(mean.float())
        self.std.copy_((sums[:, 2] / count - mean.pow(2)).clamp_min(1e-12).sqrt().float())
        self.fitted.fill_(True)
        self.reset()


def is_last_validation_of_fit(trainer: Trainer) -> bool:
    """Whether the validation now starting is the last of a fit (its scoring and thresholds are kept): the last
    epoch, or the trainer is stopping. ``True`` outside a fit and at every validation of a fit without an epoch
    budget."""
    state = getattr(trainer, "state", None)
    if state is None or state.fn != TrainerFn.FITTING:
        return True
    known_end = trainer.max_epochs is not None and trainer.max_epochs >= 0
    last_epoch = known_end and trainer.current_epoch + 1 >= trainer.max_epochs
    return bool(last_epoch or trainer.should_stop or not known_end)


class NormalStatisticsLifeCycle(Callback):
    """Writes the scorer's normal-data statistics during a fit (see the module docstring)."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        pl_module.model.scorer.statistics.reset()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        pl_module.model.scorer.statistics.commit()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        pl_module.model.scorer.statistics.commit()
