"""Likelihood → anomaly map and image score, normalised with statistics of normal training data.

Every flow head produces, per scale ``l``, a log-likelihood map ``B×h_l×w_l`` (higher = more normal).
``LikelihoodStatistics`` (``flowad_plugins.statistics``) learns the mean and standard deviation of those values
on normal training data (buffers, so they live in the checkpoint and the exported graph). ``AnomalyScorer`` combines the
maps into one ``anomaly_map B×1×H×W``, either as standardised negative log-likelihoods averaged over
scales or, as the CFLOW/FastFlow papers do, as a sum of likelihoods relative to the training mean
(``aggregation``), then optionally smooths it (``blur_sigma``). The image score is the maximum of the map
before that smoothing, itself smoothed by ``score_blur_sigma`` (0: the plain maximum, as PatchCore does), so
that the map's smoothing serves localisation only and one hot pixel need not decide an image. Nothing depends on
the other images of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F

from flowad_plugins.map_resampling import MapResampler, gaussian_matrix
from flowad_plugins.position_statistics import ScoreMapStatistics
from flowad_plugins.precision import float32_region
from flowad_plugins.statistics import LikelihoodStatistics  # re-exported: its home is statistics.py
from flowad_plugins.tracing import is_exporting

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_likelihood(
    z: torch.Tensor, log_jac_det: torch.Tensor, channel_dim: int = 1, with_constant: bool = True
) -> torch.Tensor:
    """Log-likelihood per dimension under a standard normal latent: the one definition all models use.

    ``(log|det J| − ½‖z‖² − ½·C·log 2π) / C``: ``z`` is ``N×C`` (fibers) or ``B×C×h×w`` with ``log_jac_det``
    broadcastable to the result (``N``, or ``B×h×w``, or a scalar 0 when the head ignores it).
    ``with_constant=False`` leaves out ``−½·log 2π`` (CS-Flow's maps, standardised anyway).
    Computed in float32 whatever the input precision.
    """
    z = z.float()
    channels = z.shape[channel_dim]
    per_dimension = (log_jac_det.float() - 0.5 * z.pow(2).sum(dim=channel_dim)) / channels
    return per_dimension - HALF_LOG_2PI if with_constant else per_dimension


class SeparableGaussianBlur(nn.Module):
    """Gaussian smoothing of ``B×1×H×W`` maps, separable, with reflect padding.

    Same result as a 2-D Gaussian kernel of size ``k = 2⌊4σ + 0.5⌋ + 1`` with reflect padding. In eager
    mode each 1-D pass is a product with a cached banded ``H×H`` / ``W×W`` matrix (reflection folded in):
    ``K_v · M · K_hᵀ``, much cheaper on CPU than a 1-channel convolution. Exported graphs and maps
    larger than ``MAX_MATRIX_SIZE`` use the two 1-D convolutions instead (same values up to rounding).
    """

    MAX_MATRIX_SIZE = 2048

    def __init__(self, sigma: float) -> None:
        super().__init__()
        radius = int(4 * sigma + 0.5)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)
        self.radius = radius
        self.sigma = float(sigma)
        self._matrices: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}

    def _kernel(self, size: int) -> torch.Tensor:
        """The 1-D kernel for a side of ``size`` pixels: truncated to ``size − 1`` taps each side, renormalised."""
        pad = min(self.radius, size - 1)
        kernel = self.kernel[self.radius - pad : self.radius + pad + 1]
        return kernel / kernel.sum()

    def _matrix(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``size×size`` matrix of the reflect-padded 1-D convolution (``map_resampling.gaussian_matrix``), cached."""
        key = (size, str(device), dtype)
        matrix = self._matrices.get(key)
        if matrix is None:
            matrix = torch.as_tensor(gaussian_matrix(self.sigma, size), dtype=dtype, device=device)
            self._matrices[key] = matrix
        return matrix

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth ``maps`` (``B×1×H×W``); borders reflect (the kernel is truncated to fit small maps)."""
        height, width = maps.shape[-2:]
        if not is_exporting() and max(height, width) <= self.MAX_MATRIX_SIZE:
            vertical = self._matrix(height, maps.device, maps.dtype)
            horizontal = self._matrix(width, maps.device, maps.dtype)
            return torch.matmul(torch.matmul(vertical, maps), horizontal.T)
        horizontal, vertical = self._kernel(width).view(1, 1, 1, -1), self._kernel(height).view(1, 1, -1, 1)
        pad_h, pad_w = vertical.shape[2] // 2, horizontal.shape[3] // 2
        maps = F.conv2d(F.pad(maps, (pad_w, pad_w, 0, 0), mode="reflect"), horizontal)
        return F.conv2d(F.pad(maps, (0, 0, pad_h, pad_h), mode="reflect"), vertical)


def _scale_subset(name: str, scales: Sequence[int] | None, num_scales: int) -> list[int] | None:
    """``scales`` (negative = from the coarsest: ``-1`` is the last) sorted and checked against ``num_scales``;
    ``None`` (= every scale) for all of them."""
    if scales is None:
        return None
    valid = all(-num_scales <= int(scale) < num_scales for scale in scales)
    chosen = sorted({int(scale) % num_scales for scale in scales}) if valid else []
    if not chosen:
        msg = f"{name} must be a non-empty subset of {list(range(num_scales))}, got {list(scales)}."
        raise ValueError(msg)
    return None if chosen == list(range(num_scales)) else chosen


def _gaussian_blur(name: str, sigma: float) -> tuple[float, nn.Module]:
    """``(σ, its blur)`` for the parameter ``name``: ``SeparableGaussianBlur(σ)``, or identity for 0."""
    if sigma < 0:
        msg = f"{name} must be ≥ 0, got {sigma}."
        raise ValueError(msg)
    return float(sigma), SeparableGaussianBlur(sigma) if sigma > 0 else nn.Identity()


class AnomalyScorer(nn.Module):
    """Combine per-scale log-likelihood maps into an anomaly map ``B×1×H×W`` and score ``B``.

    Two ways to combine the scales, both batch-independent (only normal-training statistics enter):

    - ``"standardized"``: ``(μ_l − log p_l)/σ_l`` per scale, upsampled, averaged; the map is then smoothed.
    - ``"likelihood"``: the CFLOW/FastFlow papers' combination in the probability domain, with the
      training mean ``μ_l`` in place of their batch maximum: ``P = Σ_l up(exp(log p_l − μ_l))``, smoothed
      there, and returned as ``−log P`` (a monotone transform: same ranking, no saturation near 0).
      Chosen for CflowAD and FastFlow on bottle validation data (pixel AUROC 0.856 → 0.882 and AUPRO 0.533 →
      0.585 for CflowAD; 0.789 → 0.810 and 0.569 → 0.646 for FastFlow); CS-Flow keeps ``"standardized"``
      (its image AUROC on validation dropped with ``"likelihood"``).

    In both the image score is the maximum of the combination of its scales (``score_scales``, all by default)
    before the map's smoothing,
    blurred with its own ``score_blur_sigma`` (chosen on validation of several categories,
    ``benchmarks/select_image_score.py``; 0 = the plain maximum). ``map_scales`` may restrict the returned map
    to some scales (e.g. ``[0]``, the finest, as CS-Flow's official code localises); ``score_scales`` does the
    same for the image score (e.g. FastFlow's coarsest scale: its finest one is noisy).

    Args:
        num_scales: number of log-likelihood maps per image.
        blur_sigma: standard deviation (input pixels) of a Gaussian smoothing of the final map; 0 = none.
        aggregation: ``"standardized"`` or ``"likelihood"`` (see above).
        map_scales: indices of the scales combined into ``anomaly_map``; ``None`` = all.
        score_scales: indices of the scales combined into the map whose maximum is the image score; ``None`` = all.
        score_blur_sigma: standard deviation (input pixels) of the Gaussian smoothing of the map whose maximum is
            the image score; 0 = none.
        position_score: image score from the unsmoothed map standardised *per position* with its mean and
            standard deviation over the normal training images (``position_statistics``), then the maximum
            (smoothed by ``score_blur_sigma``): a place that is unusual on every normal image (a border, the
            part's own edges) no longer decides the score. Before those statistics are fitted, the score is the
            plain one. The map is unchanged.
    """

    AGGREGATIONS = ("standardized", "likelihood")
    # exp(log p − μ) is floored at exp(−80) (float32 keeps it normal): a fiber 80 nats/dim below the
    # training mean is anomalous by any threshold, and the floor keeps −log P finite.
    MIN_RELATIVE_LOG_LIKELIHOOD = -80.0

    def __init__(
        self,
        num_scales: int,
        blur_sigma: float = 0.0,
        aggregation: str = "standardized",
        map_scales: Sequence[int] | None = None,
        score_blur_sigma: float = 0.0,
        position_score: bool = False,
        score_scales: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if aggregation not in self.AGGREGATIONS:
            msg = f"aggregation must be one of {list(self.AGGREGATIONS)}, got {aggregation!r}."
            raise ValueError(msg)
        self.map_scales = _scale_subset("map_scales", map_scales, num_scales)
        self.score_scales = _scale_subset("score_scales", score_scales, num_scales)
        self.aggregation = aggregation
        self.statistics = LikelihoodStatistics(num_scales)
        self.blur_sigma = blur_sigma
        self.score_blur_sigma = score_blur_sigma
        self.position_score = bool(position_score)
        self.map_statistics = ScoreMapStatistics()
        self._resampler = MapResampler()

    @property
    def blur_sigma(self) -> float:
        """Standard deviation of the map's Gaussian smoothing in input pixels (0 = none)."""
        return self._blur_sigma

    @blur_sigma.setter
    def blur_sigma(self, sigma: float) -> None:
        self._blur_sigma, self.blur = _gaussian_blur("blur_sigma", sigma)

    @property
    def score_blur_sigma(self) -> float:
        """Standard deviation of the smoothing before the image score's maximum, in input pixels (0 = none)."""
        return self._score_blur_sigma

    @score_blur_sigma.setter
    def score_blur_sigma(self, sigma: float) -> None:
        self._score_blur_sigma, self.score_blur = _gaussian_blur("score_blur_sigma", sigma)

    def forward(self, log_likelihoods: Sequence[torch.Tensor], output_size: Sequence[int]) -> InferenceBatch:
        """``log_likelihoods[l]``: ``B×h_l×w_l``; ``output_size``: ``(H, W)`` of the input images.

        Runs in float32 even under autocast: a bf16 map (8-bit mantissa) would tie scores and bias AUROC/AUPRO.
        """
        with float32_region(log_likelihoods[0].device.type):
            if self.aggregation == "likelihood":
                return self._score_likelihood(log_likelihoods, output_size)
            return self._score(log_likelihoods, output_size)

    @contextmanager
    def plain_score_maps(self) -> Iterator[None]:
        """Within: ``anomaly_map`` is the unsmoothed map that the image score is taken from (its ``score_scales``, no
        map blur, no position standardisation), e.g. to fit ``map_statistics``."""
        saved = self.blur_sigma, self.map_scales, self.position_score
        self.blur_sigma, self.map_scales, self.position_score = 0.0, self.score_scales, False
        try:
            yield
        finally:
            self.blur_sigma, self.map_scales, self.position_score = saved

    def _image_score(self, score_map: torch.Tensor) -> torch.Tensor:
        """``B`` scores from the unsmoothed ``B×1×H×W`` map (higher = more anomalous), per ``score_blur_sigma`` and
        ``position_score``."""
        if self.position_score and self.map_statistics.fitted:
            score_map = self.map_statistics.standardise(score_map)
        return self.score_blur(score_map).flatten(1).amax(dim=1)

    def _resampled(self, maps: list[torch.Tensor], output_size: tuple[int, int], smooth: bool,
                   scales: Sequence[int] | None = None, mean: bool = False, for_score: bool = False) -> torch.Tensor:
        """``B×1×H×W``: the maps of ``scales`` (all by default) upsampled, summed (or averaged), optionally smoothed
        (with ``score_blur_sigma`` when ``for_score``, else ``blur_sigma``)."""
        chosen = [maps[scale] for scale in scales] if scales is not None else list(maps)
        weights = [1.0 / len(chosen)] * len(chosen) if mean else None
        sigma, blur = (self.score_blur_sigma, self.score_blur) if for_score else (self.blur_sigma, self.blur)
        if self._resampler.supports(output_size):
            return self._resampler(chosen, output_size, sigma if smooth else 0.0, weights)
        upsampled = [F.interpolate(values.unsqueeze(1), size=output_size, mode="bilinear", align_corners=False)
                     for values in chosen]
        combined = torch.stack(upsampled, dim=0).sum(dim=0) * (1.0 / len(chosen) if mean else 1.0)
        return blur(combined) if smooth else combined

    @property
    def _map_is_unsmoothed(self) -> bool:
        """The map equals the score's unsmoothed combination (no blur, the same scales): computed once."""
        return self.blur_sigma == 0 and self.map_scales == self.score_scales

    @property
    def _map_is_score_map(self) -> bool:
        """The standardised map equals the score's smoothed combination (same blur, same scales): computed once."""
        return self.blur_sigma == self.score_blur_sigma and self.map_scales == self.score_scales

    def _score(self, log_likelihoods: Sequence[torch.Tensor], output_size: Sequence[int]) -> InferenceBatch:
        stats = self.statistics
        size = (int(output_size[0]), int(output_size[1]))
        maps = [(stats.mean[scale] - log_likelihood.float()) / stats.std[scale]
                for scale, log_likelihood in enumerate(log_likelihoods)]
        # the score from its scales, with its own smoothing: the map's blur must not dilute small defects
        unsmoothed = self._resampled(maps, size, smooth=False, scales=self.score_scales, mean=True)
        anomaly_map = (unsmoothed if self._map_is_unsmoothed else
                       self._resampled(maps, size, smooth=True, scales=self.map_scales, mean=True))
        if self.position_score and self.map_statistics.fitted:
            return InferenceBatch(pred_score=self._image_score(unsmoothed), anomaly_map=anomaly_map)
        # the smoothing is linear here: resampled from the small maps at once (or the map itself, when equal)
        score_map = (unsmoothed if self.score_blur_sigma == 0 else anomaly_map if self._map_is_score_map else
                     self._resampled(maps, size, smooth=True, scales=self.score_scales, mean=True, for_score=True))
        return InferenceBatch(pred_score=score_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)

    def _score_likelihood(self, log_likelihoods: Sequence[torch.Tensor], output_size: Sequence[int]) -> InferenceBatch:
        """``−log Σ_l up(exp(log p_l − μ_l))``, smoothed in the probability domain (see the class docstring)."""
        stats = self.statistics
        size = (int(output_size[0]), int(output_size[1]))
        relative = [(log_likelihood.float() - stats.mean[scale]).clamp_min(self.MIN_RELATIVE_LOG_LIKELIHOOD).exp()
                    for scale, log_likelihood in enumerate(log_likelihoods)]
        unsmoothed = self._resampled(relative, size, smooth=False, scales=self.score_scales)
        probability = unsmoothed if self._map_is_unsmoothed else self._resampled(relative, size, smooth=True,
                                                                                 scales=self.map_scales)
        if self.score_blur_sigma == 0 and not (self.position_score and self.map_statistics.fitted):
            pred_score = -unsmoothed.flatten(1).amin(dim=1).log()  # = max of −log P, one log per image
        else:  # smoothed in the map's own (−log) domain, where an anomaly is large, not in the probability domain
            pred_score = self._image_score(-unsmoothed.log())
        return InferenceBatch(pred_score=pred_score, anomaly_map=-probability.log())
