"""CFLOW-AD torch model: frozen encoder → one conditional fiber flow per layer → shared scoring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn

from flowad_plugins.backbones import FeatureExtractor
from flowad_plugins.flows import (
    FiberStep,
    PositionalEncoding2D,
    fiber_flow,
    fiber_flow_forward,
    fold_conditional_flow,
    map_flow_forward,
)
from flowad_plugins.inference_passes import in_image_passes
from flowad_plugins.input_guard import checks_images, flags_non_finite_frames
from flowad_plugins.precision import as_float32, float32_region
from flowad_plugins.scoring import AnomalyScorer, gaussian_log_likelihood
from flowad_plugins.tracing import is_exporting


class CflowADModel(nn.Module):
    """CFLOW-AD as a plain ``nn.Module``.

    Every spatial position of a feature map is a *fiber* ``x ∈ R^C``; the decoder of layer ``l`` is a
    coupling flow on fibers conditioned on the 2D positional encoding of the position. In eval mode
    ``forward(images B×3×H×W)`` returns ``InferenceBatch(pred_score B, anomaly_map B×1×H×W)``.

    Arguments: as ``CflowAD``'s of the same name.
    """

    # eval batches run in passes of at most this many input pixels (4 images of 256², see ``inference_passes``)
    inference_pass_pixels: int = 4 * 256 * 256

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3", "layer4"),
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        condition_dim: int = 128,
        coupling_blocks: int = 8,
        clamp_alpha: float = 1.9,
        permute_soft: bool = True,
        inference_chunk_size: int = 65536,
        blur_sigma: float = 8.0,
    ) -> None:
        super().__init__()
        if inference_chunk_size < 1:
            msg = f"inference_chunk_size must be ≥ 1, got {inference_chunk_size}."
            raise ValueError(msg)
        self.encoder = FeatureExtractor(backbone, layers, pre_trained=pre_trained, backbone_weights=backbone_weights)
        self.positional_encoding = PositionalEncoding2D(condition_dim)
        self.decoders = nn.ModuleList(
            fiber_flow(channels, coupling_blocks, clamp_alpha, condition_dim=condition_dim, permute_soft=permute_soft)
            for channels in self.encoder.channels
        )
        self.scorer = AnomalyScorer(len(self.encoder.layers), aggregation="likelihood", blur_sigma=blur_sigma)
        self.inference_chunk_size = inference_chunk_size
        # (layer, h, w, device, dtype) -> (decoder parameter versions, prepared flow steps); inference only
        self._condition_cache: dict[tuple, tuple[tuple[int, ...], list[FiberStep]]] = {}

    def fibers(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flatten ``B×C×h×w`` features to fibers ``(B·h·w)×C`` and their positions ``(B·h·w)`` (row-major)."""
        batch, channels, height, width = features.shape
        fibers = features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        positions = torch.arange(height * width, device=features.device).unsqueeze(0).expand(batch, -1)
        return fibers.reshape(-1, channels), positions.reshape(-1)

    def fiber_log_likelihood(
        self, layer: int, fibers: torch.Tensor, positions: torch.Tensor | None, map_size: tuple[int, int]
    ) -> torch.Tensor:
        """Log-likelihood per dimension ``N`` of fibers ``N×C`` at ``positions`` of an ``h×w`` map (decoder ``layer``).

        ``positions=None``: the fibers are whole maps in row-major order (``N = B·h·w``). The positional condition
        is projected once per position; without gradients that projection is cached until the decoder's parameters
        change (exported graphs take the map form, which never reads the cache). The flow runs in float32.
        """
        with float32_region(fibers.device.type):
            return self._fiber_log_likelihood(layer, as_float32(fibers), positions, map_size)

    def _fiber_log_likelihood(
        self, layer: int, fibers: torch.Tensor, positions: torch.Tensor | None, map_size: tuple[int, int]
    ) -> torch.Tensor:
        decoder = self.decoders[layer]
        table = self.positional_encoding(*map_size, device=fibers.device)
        steps = None
        if not torch.is_grad_enabled():
            versions = tuple(parameter._version for parameter in decoder.parameters())
            key = (layer, *map_size, str(fibers.device), fibers.dtype)
            cached = self._condition_cache.get(key)
            if cached is None or cached[0] != versions:
                cached = (versions, fold_conditional_flow(decoder, table))
                self._condition_cache[key] = cached
            steps = cached[1]
        z, log_jac_det = fiber_flow_forward(decoder, fibers, table, positions, steps)
        return gaussian_log_likelihood(z, log_jac_det)

    def log_likelihood_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer log-likelihood maps ``B×h_l×w_l``: all fibers of the batch in one vectorised pass (chunked by
        whole images only beyond ``inference_chunk_size`` fibers). Exported graphs run the flows on the maps
        themselves (``flows.map_flow_forward``), which OpenVINO runs with fewer ops than the fiber form.
        """
        # measured both ways: eager fibers 18–30 % faster than maps (flow_forms.md), OpenVINO maps faster
        # (openvino_profile.md); the map form also keeps the eager step cache out of graphs
        if is_exporting():
            return [self._map_log_likelihood(layer, feature_map) for layer, feature_map in enumerate(features)]
        maps = []
        for layer, feature_map in enumerate(features):
            batch, _, height, width = feature_map.shape
            fibers, _ = self.fibers(feature_map)
            images_per_chunk = max(1, self.inference_chunk_size // (height * width))
            if batch <= images_per_chunk:
                log_likelihood = self.fiber_log_likelihood(layer, fibers, None, (height, width))
            else:
                log_likelihood = torch.cat([
                    self.fiber_log_likelihood(layer, chunk, None, (height, width))
                    for chunk in fibers.split(images_per_chunk * height * width)
                ])
            maps.append(log_likelihood.reshape(batch, height, width))
        return maps

    def _map_log_likelihood(self, layer: int, feature_map: torch.Tensor) -> torch.Tensor:
        """``B×h×w`` log-likelihood of decoder ``layer`` on ``B×C×h×w`` features, in the map form (export)."""
        _, _, height, width = feature_map.shape
        table = self.positional_encoding(height, width, device=feature_map.device)
        z, log_det = map_flow_forward(fold_conditional_flow(self.decoders[layer], table), as_float32(feature_map))
        return gaussian_log_likelihood(z, log_det)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ``ValueError`` when the encoder cannot take images of this size (``B×3×H×W``)."""
        self.encoder.check_input_size(tuple(images.shape[-2:]))

    @checks_images
    @in_image_passes
    @flags_non_finite_frames
    def forward(self, images: torch.Tensor) -> InferenceBatch | list[torch.Tensor]:
        """Eval: ``InferenceBatch`` for images ``B×3×H×W``. Train: the encoder's feature maps."""
        if self.training:
            return self.encoder(images)
        with torch.no_grad():
            return self.scorer(self.likelihood_maps(images), images.shape[-2:])

    def likelihood_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer log-likelihood maps ``B×h_l×w_l`` of images ``B×3×H×W`` (what the scorer combines)."""
        return self.log_likelihood_maps(self.encoder(images))
