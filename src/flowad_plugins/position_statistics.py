"""Per-position statistics of the score map: what a normal image looks like at each place.

A flow's log-likelihood is lower, on every normal image, at some places: the borders (padding), the part's own
edges and printed structure. The plain image score (the maximum of the map) then measures those fixed patterns
as much as a defect. ``ScoreMapStatistics`` holds the mean and standard deviation, at each position of the
scorer's unsmoothed score map (``H×W``, the model's input size), over the *normal training images*, so that
``AnomalyScorer(position_score=True)`` can take the maximum of the map standardised per position instead.

They are fitted with the final weights in one inference pass over the training images
(``fit_score_map_statistics``), which ``NormalStatisticsLifeCycle`` runs before the last validation of a fit
(the one whose thresholds the model keeps), or before any validation when they are missing. The buffers take the
shape of the maps they were fitted on, and a checkpoint restores whatever shape it holds (checkpoints written
before they existed load without them: the score is then the plain maximum).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

POSITION_BUFFERS = ("map_mean", "map_std")
MIN_STD_FRACTION = 1e-3  # a position's std is floored at 0.1 % of the map's overall std (constant places)


def takes_any_shape(state_dict_key: str) -> bool:
    """Whether a state-dict entry is a per-position statistic (its shape is the maps', old checkpoints lack it)."""
    return state_dict_key.rsplit(".", 1)[-1] in POSITION_BUFFERS


class ScoreMapStatistics(nn.Module):
    """Mean and standard deviation of the unsmoothed score map at each position, over normal training images."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("map_mean", torch.zeros(0, 0))
        self.register_buffer("map_std", torch.ones(0, 0))

    @property
    def fitted(self) -> bool:
        return self.map_mean.numel() > 0

    @torch.no_grad()
    def fit(self, maps: Iterable[torch.Tensor]) -> None:
        """Fit from batches of unsmoothed maps ``B×1×H×W`` (or ``B×H×W``) of normal images (summed over DDP ranks)."""
        sums = None
        for batch in maps:
            values = batch.detach().double().reshape(-1, *batch.shape[-2:])
            part = torch.stack([torch.full(values.shape[1:], float(len(values)), dtype=torch.float64,
                                           device=values.device), values.sum(dim=0), values.pow(2).sum(dim=0)])
            sums = part if sums is None else sums + part
        if sums is None:
            return
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        count, total, squares = sums
        mean = total / count
        variance = (squares / count - mean.pow(2)).clamp_min(0)
        overall = float((squares.sum() / count.sum() - (total.sum() / count.sum()) ** 2).clamp_min(1e-12).sqrt())
        self.map_mean = mean.float().to(self.map_mean.device)
        self.map_std = variance.sqrt().clamp_min(MIN_STD_FRACTION * overall).float().to(self.map_std.device)

    def resized(self, size: tuple[int, int] | torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)``, each ``H×W`` for ``size = (H, W)``: bilinearly resized if fitted on maps of another size."""
        mean, std = self.map_mean, self.map_std
        if mean.shape != tuple(size):
            mean, std = (nn.functional.interpolate(v[None, None], size=tuple(size), mode="bilinear",
                                                   align_corners=False)[0, 0] for v in (mean, std))
        return mean, std

    def standardise(self, maps: torch.Tensor) -> torch.Tensor:
        """``(maps − mean)/std`` per position for ``B×1×H×W`` maps; statistics of another size are resized."""
        mean, std = self.resized(maps.shape[-2:])
        return (maps - mean) / std

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Take the checkpoint's shapes; a checkpoint without these buffers loads them empty (not fitted)."""
        for name in POSITION_BUFFERS:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
            else:
                state_dict[prefix + name] = torch.zeros(0, 0)
                setattr(self, name, torch.zeros(0, 0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@torch.no_grad()
def fit_score_map_statistics(module: nn.Module, loader: Iterable) -> None:
    """One eval pass of an ``AnomalibModule`` (pre-processor + torch model) over ``loader``'s normal images."""
    scorer = module.model.scorer
    was_training = module.model.training
    module.model.eval()
    try:
        def maps() -> Iterable[torch.Tensor]:
            with scorer.plain_score_maps(), module.model.encoder.cache.active():  # features cached in training
                for batch in loader:
                    images = batch.image.to(module.device)
                    images = module.pre_processor(images) if module.pre_processor else images
                    yield module.model(images).anomaly_map
        scorer.map_statistics.fit(maps())
    finally:
        module.model.train(was_training)
