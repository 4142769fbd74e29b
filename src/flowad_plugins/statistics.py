"""Normal-data likelihood statistics: what they hold and when they are written during training.

Every flow head scores a position by its log-likelihood per dimension (``scoring.gaussian_log_likelihood``);
``AnomalyScorer`` standardises those values with their mean and standard deviation on normal training data,
one pair per scale, held by ``LikelihoodStatistics`` (buffers: they live in the checkpoint and the exported
graph). Their whole life cycle during a Lightning fit is ``NormalStatisticsLifeCycle``, a callback that
``FlowAnomalibModule`` installs:

- ``on_train_epoch_start``: forget the values of the previous epoch (``reset``);
- every optimizer step: ``FlowAnomalibModule.training_step`` adds the step's normal-data values (``update``);
- ``on_validation_epoch_start``: write mean and std (``commit``) before validation scores anything (Lightning
  validates *before* ``on_train_epoch_end``; thresholds must be set on this epoch's scoring);
- ``on_train_epoch_end``: commit again, for epochs without validation (a no-op after the first commit).

With ``AnomalyScorer(position_score=True)`` the callback also fits the per-position statistics of the score map
(``position_statistics``) in one inference pass over the training images, right after the commit of the *last*
validation of a fit (the last epoch, or the one at which the trainer stops; every validation when the fit has
no epoch budget): those are the weights and thresholds the model keeps, and one pass per fit keeps training time
nearly unchanged. Earlier validations score without them (the plain maximum).

Under DDP ``commit`` sums the accumulated counts and sums over the ranks, so every rank writes the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn


class LikelihoodStatistics(nn.Module):
    """Mean and standard deviation of the log-likelihood of normal data, one pair per scale.

    Accumulate with ``update(scale, values)`` during a training epoch, then ``commit()`` writes the
    buffers ``mean``/``std`` (summed across processes under DDP). ``fitted`` is 1 once committed.
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
    def update(self, scale: int, values: torch.Tensor) -> None:
        """Add the log-likelihoods ``values`` (any shape) of normal data at ``scale``."""
        values = values.detach().double().flatten().cpu()
        self._sums[scale] += torch.stack([torch.tensor(values.numel(), dtype=torch.float64), values.sum(),
                                          values.pow(2).sum()])

    def update_all(self, log_likelihoods: Sequence[torch.Tensor | None]) -> None:
        """``update`` every scale: ``log_likelihoods[l]`` holds scale ``l``'s values (``None``: none this step)."""
        if len(log_likelihoods) != self.num_scales:
            msg = f"Expected log-likelihoods for {self.num_scales} scales, got {len(log_likelihoods)}."
            raise ValueError(msg)
        for scale, values in enumerate(log_likelihoods):
            if values is not None:
                self.update(scale, values)

    @torch.no_grad()
    def commit(self) -> None:
        """Write ``mean``/``std`` from the accumulated sums; no-op when nothing was accumulated."""
        sums = self._sums.to(self.mean.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        count = sums[:, 0]
        if bool((count < 2).any()):
            return
        mean = sums[:, 1] / count
        variance = (sums[:, 2] / count - mean.pow(2)).clamp_min(1e-12)
        self.mean.copy_(mean.float())
        self.std.copy_(variance.sqrt().float())
        self.fitted.fill_(True)
        self.reset()


def is_last_validation_of_fit(trainer: Trainer) -> bool:
    """Whether the validation now starting is the last of a fit (its scoring and thresholds are the ones kept):
    the last epoch, or the trainer is stopping (time budget, early stopping). ``True`` outside a fit, and at every
    validation of a fit without an epoch budget."""
    state = getattr(trainer, "state", None)
    if state is None or state.fn != TrainerFn.FITTING:
        return True
    known_end = trainer.max_epochs is not None and trainer.max_epochs >= 0
    last_epoch = known_end and trainer.current_epoch + 1 >= trainer.max_epochs
    return bool(last_epoch or trainer.should_stop or not known_end)


class NormalStatisticsLifeCycle(Callback):
    """Reset at each training epoch's start, commit before validation and at the epoch's end (module docstring).

    Works on ``pl_module.likelihood_statistics`` (``FlowAnomalibModule``); the per-step updates come from
    the module's ``training_step``.
    """

    @staticmethod
    def _statistics(pl_module: LightningModule) -> LikelihoodStatistics:
        return pl_module.likelihood_statistics

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a fresh accumulation of normal-data statistics."""
        del trainer
        self._statistics(pl_module).reset()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write this epoch's statistics before validation scores (no-op when nothing is pending); before the last
        validation of a fit, also fit the score map's per-position statistics when the scorer uses them."""
        self._statistics(pl_module).commit()
        scorer = pl_module.model.scorer
        if not getattr(scorer, "position_score", False) or trainer.state.fn != TrainerFn.FITTING:
            return
        if is_last_validation_of_fit(trainer):
            from flowad_plugins.position_statistics import fit_score_map_statistics

            fit_score_map_statistics(pl_module, trainer.train_dataloader)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write this epoch's statistics when the epoch had no validation (gathered across DDP ranks)."""
        del trainer
        self._statistics(pl_module).commit()
