"""CS-Flow torch model: one frozen backbone layer at 3 input scales → cross-scale flow → shared scoring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F

from flowad_plugins.backbones import FeatureExtractor
from flowad_plugins.flows import CrossScaleFlow
from flowad_plugins.inference_passes import in_image_passes
from flowad_plugins.input_guard import checks_images, flags_non_finite_frames
from flowad_plugins.precision import as_float32, float32_region
from flowad_plugins.scoring import AnomalyScorer, gaussian_log_likelihood


class CSFlowModel(nn.Module):
    """CS-Flow (Rudolph et al., WACV 2022) as a plain ``nn.Module``.

    The image is box-downsampled by 2 and 4 inside the model; the same backbone layer (stride ``r``) maps the three
    images to ``B×C×H/r×W/r``, ``B×C×H/2r×W/2r``, ``B×C×H/4r×W/4r``, which a ``CrossScaleFlow`` maps jointly to
    latents ``z_l``. The log-likelihood map of scale ``l`` is ``−‖z_l‖²/(2C)`` per position (``AnomalyScorer``
    combines the scales). ``forward(images B×3×H×W)``: eval ``InferenceBatch(pred_score B, anomaly_map B×1×H×W)``,
    train ``(latents [B×C×h_l×w_l], log|det J| B)``.

    Arguments: as ``CSFlow``'s of the same name.
    """

    # eval batches run in passes of at most this many input pixels (16 images of 256², see ``inference_passes``)
    inference_pass_pixels: int = 16 * 256 * 256

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layer: str = "blocks.2",
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        num_scales: int = 3,
        coupling_blocks: int = 4,
        kernel_sizes: Sequence[int] | None = None,
        hidden_channels: int | None = None,
        clamp_alpha: float = 3.0,
        input_norm: bool = True,
        blur_sigma: float = 16.0,
        score_blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if not isinstance(layer, str):
            msg = f"layer must be one backbone layer name (a string), got {layer!r}."
            raise ValueError(msg)
        if int(num_scales) != num_scales or num_scales < 2:
            msg = f"num_scales must be an integer ≥ 2 (paper: 3), got {num_scales}."
            raise ValueError(msg)
        self.encoder = FeatureExtractor(backbone, [layer], pre_trained=pre_trained, backbone_weights=backbone_weights,
                                        layers_parameter="layer")
        self.num_scales = int(num_scales)
        self.flow = CrossScaleFlow(
            channels=self.encoder.channels[0],
            num_scales=self.num_scales,
            coupling_blocks=coupling_blocks,
            kernel_sizes=kernel_sizes,
            hidden_channels=hidden_channels,
            clamp_alpha=clamp_alpha,
            input_norm=input_norm,
        )
        self.scorer = AnomalyScorer(self.num_scales, aggregation="standardized", blur_sigma=blur_sigma,
                                    score_blur_sigma=score_blur_sigma)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: backbone stride × 2^(num_scales−1)."""
        return self.encoder.reductions[0] * 2 ** (self.num_scales - 1)

    def check_input_size(self, input_size: Sequence[int]) -> None:
        """Raise ``ValueError`` unless ``input_size`` (H, W) is a positive multiple of ``size_multiple``."""
        self.encoder.check_input_size(tuple(input_size), min_feature_size=1)
        multiple = self.size_multiple
        bad = [int(s) for s in input_size if int(s) % multiple or int(s) < multiple]
        if bad:
            nearest = {max(multiple, s // multiple * multiple) for s in bad} | {(s // multiple + 1) * multiple
                                                                                 for s in bad}
            msg = (
                f"input_size={tuple(int(s) for s in input_size)} is not valid for CS-Flow with "
                f"backbone={self.encoder.backbone_name!r}, layer={self.encoder.layers[0]!r}: height and width must be "
                f"multiples of {multiple} (backbone stride {self.encoder.reductions[0]} × 2^{self.num_scales - 1} "
                f"for {self.num_scales} scales). Nearest valid sizes: {sorted(nearest)}."
            )
            raise ValueError(msg)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of ``images`` (B×3×H×W) at scales 1, 1/2, 1/4, …: ``[B×C×H/(r·2^l)×W/(r·2^l)]``."""
        features = []
        for scale in range(self.num_scales):
            scaled = images if scale == 0 else F.avg_pool2d(images, kernel_size=2**scale)
            features.append(self.encoder(scaled)[0])
        return features

    @staticmethod
    def log_likelihood_maps(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale maps ``B×h_l×w_l`` of ``−‖z‖²/(2C)`` (higher = more normal): the log-likelihood per dimension
        without its constant and without a log-det (CS-Flow's is per image only)."""
        no_log_det = torch.zeros(())
        return [gaussian_log_likelihood(z, no_log_det.to(z.device), with_constant=False) for z in latents]

    def check_images(self, images: torch.Tensor) -> None:
        """``check_input_size`` of images ``B×3×H×W``."""
        self.check_input_size(images.shape[-2:])

    @checks_images
    @in_image_passes
    @flags_non_finite_frames
    def forward(self, images: torch.Tensor) -> InferenceBatch | tuple[list[torch.Tensor], torch.Tensor]:
        """Eval: ``InferenceBatch`` for images ``B×3×H×W``. Train: ``(latents, log|det J| B)``."""
        if not self.training:
            with torch.no_grad():
                return self.scorer(self.likelihood_maps(images), images.shape[-2:])
        return self.flow_outputs(images)

    def flow_outputs(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(latents [B×C×h_l×w_l], log|det J| B)`` of images ``B×3×H×W``; the flow runs in float32 under autocast."""
        features = [as_float32(feature) for feature in self.features(images)]
        with float32_region(images.device.type):
            return self.flow(features)

    def likelihood_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale maps ``B×h_l×w_l`` of images ``B×3×H×W`` (what the scorer combines)."""
        latents, _ = self.flow_outputs(images)
        with float32_region(images.device.type):
            return self.log_likelihood_maps(latents)
