"""Statistics of normal training data that the scorer stands on, and when a fit writes them.

- ``LikelihoodStatistics``: mean and std of the log-likelihood per scale (standardises each scale's map).
- ``PositionStatistics``: what a normal image's score map looks like at each position (the image score is the
  maximum of the map standardised per position, so a border or the part's own edges do not decide it).

``NormalStatisticsLifeCycle`` (a callback every flow model installs) is the one place that writes them during a fit:

- ``on_train_epoch_start``: forget the previous epoch's likelihood values; each optimizer step adds its own
  (``FlowAnomalibModule.training_step``);
- ``on_validation_epoch_start``: commit them before validation scores anything (Lightning validates *before*
  ``on_train_epoch_end``), and before the last validation of a fit fit ``PositionStatistics`` in one inference pass
  over the training images (those are the weights and thresholds the model keeps);
- ``on_train_epoch_end``: commit for epochs without validation (a no-op after the first commit).

Under DDP the sums are all-reduced, so every rank writes the same values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.nn import functional as F

# A position's std is shrunk toward the typical normal std, σ_eff² = σ_p² + (POSITION_STD_SHRINK·σ̄)², so a place where
# normal maps barely vary (a plain background) does not turn a tiny systematic shift (bf16 rounding, ±2/255
# brightness) into a large score. Chosen on validation of bottle and tire (docs/selection.md,
# benchmarks/results/decisions.md): the highest mean image AUROC among the shrinkages that keep the false-alarm rate
# under brightness and bf16 drift; statistics fitted on shifted maps as well lost 0.01–0.02 AUROC.
POSITION_STD_SHRINK = 1.0


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


class PositionStatistics(nn.Module):
    """Per-position mean and (shrunk) std of the unsmoothed score map over normal training images (``H×W`` buffers).

    Empty until fitted; a checkpoint restores whatever shape it holds, and maps of another size get the statistics
    bilinearly resized.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0, 0))
        self.register_buffer("std", torch.ones(0, 0))

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    @torch.no_grad()
    def fit(self, maps: Iterable[torch.Tensor], shrink: float = POSITION_STD_SHRINK) -> None:
        """Fit from batches of unsmoothed maps ``B×1×H×W`` (or ``B×H×W``) of normal images."""
        sums = None
        for batch in maps:
            values = batch.detach().double().reshape(-1, *batch.shape[-2:])
            part = torch.stack([torch.full(values.shape[1:], float(len(values)), dtype=torch.float64,
                                           device=values.device), values.sum(dim=0), values.pow(2).sum(dim=0)])
            sums = part if sums is None else sums + part
        if sums is None:
            return
        count, total, squares = _all_reduce(sums)
        mean = total / count
        variance = (squares / count - mean.pow(2)).clamp_min(0)
        typical_variance = variance.mean().clamp_min(1e-12)
        self.mean = mean.float().to(self.mean.device)
        self.std = (variance + shrink**2 * typical_variance).sqrt().float().to(self.std.device)

    def standardise(self, maps: torch.Tensor) -> torch.Tensor:
        """``(maps − mean)/std`` per position for ``B×1×H×W`` maps (statistics resized to the maps if needed)."""
        mean, std = self.mean, self.std
        if tuple(mean.shape) != tuple(maps.shape[-2:]):
            mean, std = (F.interpolate(v[None, None], size=tuple(maps.shape[-2:]), mode="bilinear",
                                       align_corners=False)[0, 0] for v in (mean, std))
        return (maps - mean) / std

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Take the checkpoint's shapes (the statistics have the shape of the maps they were fitted on)."""
        for name in ("mean", "std"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@torch.no_grad()
def fit_position_statistics(module: LightningModule, loader: Iterable) -> None:
    """One eval pass of a flow ``AnomalibModule`` (pre-processor + torch model) over ``loader``'s normal images."""
    model = module.model
    was_training = model.training
    model.eval()
    try:
        def maps() -> Iterable[torch.Tensor]:
            with model.encoder.cache.active():  # the training images' features are cached during the fit
                for batch in loader:
                    images = batch.image.to(module.device)
                    images = module.pre_processor(images) if module.pre_processor else images
                    yield model.scorer.score_map(model.likelihood_maps(images), images.shape[-2:])
        model.scorer.positions.fit(maps())
    finally:
        model.train(was_training)


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
        pl_module.model.scorer.statistics.commit()
        if (pl_module.model.scorer.per_position and trainer.state.fn == TrainerFn.FITTING
                and is_last_validation_of_fit(trainer)):
            fit_position_statistics(pl_module, trainer.train_dataloader)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del trainer
        pl_module.model.scorer.statistics.commit()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A fit without validation fits the position statistics here, so the kept model scores as any other."""
        scorer = pl_module.model.scorer
        if scorer.per_position and not scorer.positions.fitted and scorer.statistics.fitted:
            fit_position_statistics(pl_module, trainer.train_dataloader)
