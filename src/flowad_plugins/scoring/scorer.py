"""``AnomalyScorer``: per-scale log-likelihood maps → anomaly map ``B×1×H×W`` and image score ``B``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn

from flowad_plugins.precision import float32_region

from .resampling import MapResampler
from .statistics import LikelihoodStatistics


def _scale_subset(name: str, scales: Sequence[int] | None, num_scales: int) -> list[int]:
    """``scales`` (negative = from the coarsest) as sorted indices; ``None`` = every scale."""
    if scales is None:
        return list(range(num_scales))
    valid = all(-num_scales <= int(scale) < num_scales for scale in scales)
    chosen = sorted({int(scale) % num_scales for scale in scales}) if valid else []
    if not chosen:
        msg = f"{name} must be a non-empty subset of {list(range(num_scales))} (negative counts from the end), " \
              f"got {list(scales)}."
        raise ValueError(msg)
    return chosen


def _non_negative(name: str, value: float) -> float:
    if not value >= 0:
        msg = f"{name} must be ≥ 0 (pixels; 0 = no smoothing), got {value!r}."
        raise ValueError(msg)
    return float(value)


class AnomalyScorer(nn.Module):
    """Combine per-scale log-likelihood maps into an anomaly map and an image score; nothing depends on the batch.

    Each scale ``l`` is made relative to its normal-training statistics (``LikelihoodStatistics``), per
    ``aggregation``: ``"likelihood"`` (CFLOW-AD, FastFlow): ``p_l = exp(log p_l − μ_l)``, upsampled and summed in the
    probability domain as the papers do (the training mean in place of their batch maximum), returned as
    ``−log Σ_l p_l``; ``"standardized"`` (CS-Flow): ``(μ_l − log p_l)/σ_l``, upsampled and averaged.

    The anomaly map combines every scale (``map_scales``), smoothed by ``blur_sigma``. The image score is the
    maximum of the unsmoothed combination of ``score_scales`` smoothed by ``score_blur_sigma``: the plain maximum,
    chosen over the map standardised per position, which turned bf16 and ±2/255 brightness into false alarms
    (``docs/selection.md``).

    Args:
        num_scales: log-likelihood maps per image.
        aggregation: ``"likelihood"`` or ``"standardized"``.
        blur_sigma: Gaussian smoothing of the anomaly map, input pixels (0 = none).
        score_blur_sigma: Gaussian smoothing of the score map before its maximum, input pixels (0 = none).
        score_scales: scales combined into the map the image score is taken from (``None`` = all; negative = from
            the coarsest).
    """

    AGGREGATIONS = ("standardized", "likelihood")
    # exp(log p − μ) is floored at exp(−80) (normal in float32): −log P stays finite, and a position 80 nats per
    # dimension below the training mean is anomalous by any threshold
    MIN_RELATIVE_LOG_LIKELIHOOD = -80.0

    def __init__(self, num_scales: int, aggregation: str, blur_sigma: float = 0.0, score_blur_sigma: float = 0.0,
                 score_scales: Sequence[int] | None = None) -> None:
        super().__init__()
        if aggregation not in self.AGGREGATIONS:
            msg = f"aggregation must be one of {list(self.AGGREGATIONS)}, got {aggregation!r}."
            raise ValueError(msg)
        self.aggregation = aggregation
        self.blur_sigma = _non_negative("blur_sigma", blur_sigma)
        self.score_blur_sigma = _non_negative("score_blur_sigma", score_blur_sigma)
        self.map_scales = list(range(num_scales))
        self.score_scales = _scale_subset("score_scales", score_scales, num_scales)
        self.statistics = LikelihoodStatistics(num_scales)
        self._resample = MapResampler()

    def forward(self, log_likelihoods: Sequence[torch.Tensor], output_size: Sequence[int]) -> InferenceBatch:
        """``log_likelihoods[l]``: ``B×h_l×w_l``; ``output_size``: ``(H, W)`` of the input images. Float32 always."""
        with float32_region(log_likelihoods[0].device.type):
            relative = self._relative(log_likelihoods)
            anomaly_map = self._combine(relative, output_size, self.map_scales, self.blur_sigma)
            score_map = self._combine(relative, output_size, self.score_scales, 0.0)
            return InferenceBatch(pred_score=self.image_score(score_map), anomaly_map=anomaly_map)

    def score_map(self, log_likelihoods: Sequence[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        """The unsmoothed ``B×1×H×W`` map the image score is taken from."""
        with float32_region(log_likelihoods[0].device.type):
            return self._combine(self._relative(log_likelihoods), output_size, self.score_scales, 0.0)

    def image_score(self, score_map: torch.Tensor) -> torch.Tensor:
        """``B`` scores from ``score_map`` (``B×1×H×W``): smoothed by ``score_blur_sigma``, then its maximum."""
        return self._resample.blur(score_map, self.score_blur_sigma).flatten(1).amax(dim=1)

    def _relative(self, log_likelihoods: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each scale relative to its normal statistics, in the aggregation's domain."""
        mean, std = self.statistics.mean, self.statistics.std
        if self.aggregation == "likelihood":
            return [(values.float() - mean[scale]).clamp_min(self.MIN_RELATIVE_LOG_LIKELIHOOD).exp()
                    for scale, values in enumerate(log_likelihoods)]
        return [(mean[scale] - values.float()) / std[scale] for scale, values in enumerate(log_likelihoods)]

    def _combine(self, relative: list[torch.Tensor], output_size: Sequence[int], scales: list[int],
                 sigma: float) -> torch.Tensor:
        """``B×1×H×W``: the ``scales`` upsampled to ``output_size``, smoothed by ``sigma``, combined."""
        size = (int(output_size[0]), int(output_size[1]))
        chosen = [relative[scale] for scale in scales]
        if self.aggregation == "likelihood":
            return -self._resample(chosen, size, sigma).log()
        return self._resample(chosen, size, sigma, weights=[1.0 / len(chosen)] * len(chosen))
