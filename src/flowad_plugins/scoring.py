"""Likelihood → anomaly map and image score, normalised with statistics of normal training data.

Every flow head produces, per scale ``l``, a log-likelihood map ``B×h_l×w_l`` (higher = more normal).
``LikelihoodStatistics`` (``flowad_plugins.statistics``) learns the mean and standard deviation of those values
on normal training data (buffers, so they live in the checkpoint and the exported graph). ``AnomalyScorer`` combines the
maps into one ``anomaly_map B×1×H×W``, either as standardised negative log-likelihoods averaged over
scales or, as the CFLOW/FastFlow papers do, as a sum of likelihoods relative to the training mean
(``aggregation``), then optionally smooths it (``blur_sigma``). The image score is the maximum of the
unsmoothed map (as PatchCore does), so smoothing serves localisation only. Nothing depends on the other
images of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F

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
        self._matrices: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}

    def _kernel(self, size: int) -> torch.Tensor:
        """The 1-D kernel for a side of ``size`` pixels: truncated to ``size − 1`` taps each side, renormalised."""
        pad = min(self.radius, size - 1)
        kernel = self.kernel[self.radius - pad : self.radius + pad + 1]
        return kernel / kernel.sum()

    def _matrix(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``size×size`` matrix of the reflect-padded 1-D convolution (row ``i`` = weights of output ``i``)."""
        key = (size, str(device), dtype)
        matrix = self._matrices.get(key)
        if matrix is None:
            kernel = self._kernel(size).double().cpu()
            pad = (kernel.numel() - 1) // 2
            columns = torch.arange(size).unsqueeze(1) + torch.arange(-pad, pad + 1).unsqueeze(0)  # size×k
            columns = columns.abs()  # reflect at 0 (−j → j), then at size − 1
            columns = torch.where(columns > size - 1, 2 * (size - 1) - columns, columns)
            rows = torch.arange(size).unsqueeze(1).expand_as(columns)
            matrix = torch.zeros(size, size, dtype=torch.float64)
            matrix.index_put_((rows, columns), kernel.expand(size, -1).clone(), accumulate=True)
            matrix = matrix.to(device=device, dtype=dtype)
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

    In both the image score is the maximum of the unsmoothed map of all scales: smoothing must not dilute
    small defects. ``map_scales`` may restrict the returned map to some scales (e.g. ``[0]``, the finest, as
    CS-Flow's official code localises); the score still uses every scale.

    Args:
        num_scales: number of log-likelihood maps per image.
        blur_sigma: standard deviation (input pixels) of a Gaussian smoothing of the final map; 0 = none.
        aggregation: ``"standardized"`` or ``"likelihood"`` (see above).
        map_scales: indices of the scales combined into ``anomaly_map``; ``None`` = all.
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
    ) -> None:
        super().__init__()
        if aggregation not in self.AGGREGATIONS:
            msg = f"aggregation must be one of {list(self.AGGREGATIONS)}, got {aggregation!r}."
            raise ValueError(msg)
        if map_scales is not None:
            map_scales = sorted({int(scale) for scale in map_scales})
            if not map_scales or map_scales[0] < 0 or map_scales[-1] >= num_scales:
                msg = f"map_scales must be a non-empty subset of {list(range(num_scales))}, got {map_scales}."
                raise ValueError(msg)
            if map_scales == list(range(num_scales)):
                map_scales = None
        self.map_scales = map_scales
        self.aggregation = aggregation
        self.statistics = LikelihoodStatistics(num_scales)
        self.blur_sigma = blur_sigma

    @property
    def blur_sigma(self) -> float:
        """Standard deviation of the map's Gaussian smoothing in input pixels (0 = none)."""
        return self._blur_sigma

    @blur_sigma.setter
    def blur_sigma(self, sigma: float) -> None:
        if sigma < 0:
            msg = f"blur_sigma must be ≥ 0, got {sigma}."
            raise ValueError(msg)
        self._blur_sigma = float(sigma)
        self.blur = SeparableGaussianBlur(sigma) if sigma > 0 else nn.Identity()

    def forward(self, log_likelihoods: Sequence[torch.Tensor], output_size: Sequence[int]) -> InferenceBatch:
        """``log_likelihoods[l]``: ``B×h_l×w_l``; ``output_size``: ``(H, W)`` of the input images.

        Runs in float32 even under autocast: a bf16 map (8-bit mantissa) would tie scores and bias AUROC/AUPRO.
        """
        with float32_region(log_likelihoods[0].device.type):
            if self.aggregation == "likelihood":
                return self._score_likelihood(log_likelihoods, output_size)
            return self._score(log_likelihoods, output_size)

    def _score(self, log_likelihoods: Sequence[torch.Tensor], output_size: Sequence[int]) -> InferenceBatch:
        stats = self.statistics
        maps = []
        for scale, log_likelihood in enumerate(log_likelihoods):
            standardised = (stats.mean[scale] - log_likelihood.float()) / stats.std[scale]
            maps.append(
                F.interpolate(standardised.unsqueeze(1), size=tuple(output_size), mode="bilinear",
                              align_corners=False)
            )
        combined = torch.stack(maps, dim=0).mean(dim=0)
        pred_score = combined.flatten(1).amax(dim=1)  # from the unsmoothed map: blur must not dilute small defects
        if self.map_scales is not None:
            combined = torch.stack([maps[scale] for scale in self.map_scales], dim=0).mean(dim=0)
        return InferenceBatch(pred_score=pred_score, anomaly_map=self.blur(combined))

    def _score_likelihood(self, log_likelihoods: Sequence[torch.Tensor], output_size: Sequence[int]) -> InferenceBatch:
        """``−log Σ_l up(exp(log p_l − μ_l))``, smoothed in the probability domain (see the class docstring)."""
        stats = self.statistics
        probability = map_probability = None
        for scale, log_likelihood in enumerate(log_likelihoods):
            relative = (log_likelihood.float() - stats.mean[scale]).clamp_min(self.MIN_RELATIVE_LOG_LIKELIHOOD)
            upsampled = F.interpolate(relative.exp().unsqueeze(1), size=tuple(output_size), mode="bilinear",
                                      align_corners=False)
            probability = upsampled if probability is None else probability + upsampled
            if self.map_scales is not None and scale in self.map_scales:
                map_probability = upsampled if map_probability is None else map_probability + upsampled
        pred_score = -probability.flatten(1).amin(dim=1).log()
        if self.map_scales is not None:
            probability = map_probability
        return InferenceBatch(pred_score=pred_score, anomaly_map=-self.blur(probability).log())
