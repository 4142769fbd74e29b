"""FastFlow torch model: frozen encoder → normalisation → one 2D flow per scale → shared scoring."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from anomalib.data import InferenceBatch
from torch import nn

from flowad_plugins.backbones import FeatureExtractor
from flowad_plugins.flows import conv_flow
from flowad_plugins.inference_passes import in_image_passes
from flowad_plugins.input_guard import checks_images, flags_non_finite_frames, validated_input_size
from flowad_plugins.precision import as_float32, float32_region
from flowad_plugins.scoring import AnomalyScorer, gaussian_log_likelihood

# The paper's transformer feature blocks (Yu et al. 2021, Table 6)
PAPER_TRANSFORMER_LAYERS: dict[str, str] = {"deit_base_distilled_patch16_384": "blocks.7", "cait_m48_448": "blocks.40"}
DEFAULT_INPUT_SIZE = (256, 256)


def default_layers(backbone: str) -> list[str]:
    """FastFlow's feature layers for ``backbone``.

    CNNs: the first three stages after the stem (``layer1..layer3`` of a ResNet, reductions 4, 8, 16).
    Transformers: the paper's block for DeiT/CaiT, otherwise the block at two thirds of the depth.
    """
    if backbone in PAPER_TRANSFORMER_LAYERS:
        return [PAPER_TRANSFORMER_LAYERS[backbone]]
    if backbone not in timm.list_models():
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        msg = f"Unknown backbone={backbone!r}. timm models with a similar name: {close}."
        raise ValueError(msg)
    with torch.device("meta"):  # structure only: no weights, no memory
        model = timm.create_model(backbone, pretrained=False)
    available = [info["module"] for info in model.feature_info]
    if hasattr(model, "patch_embed"):
        return [available[max(0, 2 * len(available) // 3 - 1)]]
    return available[1:4] if len(available) >= 4 else available[-3:]


class FastFlowModel(nn.Module):
    """FastFlow (Yu et al. 2021) as a plain ``nn.Module``.

    Features of each layer are normalised (CNNs: a trainable ``LayerNorm`` over ``C×h×w`` at ``input_size``;
    transformers: the backbone's own final norm), then mapped to ``z`` by a 2D flow (``flows.conv_flow``). The
    per-position log-likelihood (optionally with the per-position log-det) feeds the shared ``AnomalyScorer``.

    Arguments: as ``FastFlow``'s of the same name.

    Shapes: eval ``forward(B×3×H×W) -> InferenceBatch(pred_score B, anomaly_map B×1×H×W)``; train
    ``forward -> [(z_l B×C_l×h_l×w_l, log_det_l B×h_l×w_l)]``.
    """

    # eval batches run in passes of at most this many input pixels (4 images of 256², see ``inference_passes``)
    inference_pass_pixels: int = 4 * 256 * 256

    def __init__(
        self,
        input_size: Sequence[int] | None = None,
        backbone: str = "resnet18",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        clamp: float = 2.0,
        map_log_det: bool = True,
        blur_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in {"flow_steps": flow_steps, "clamp": clamp, "hidden_ratio": hidden_ratio}.items():
            if not value > 0:
                msg = f"{name} must be positive, got {value}."
                raise ValueError(msg)
        if int(flow_steps) != flow_steps:
            msg = f"flow_steps must be a positive integer, got {flow_steps}."
            raise ValueError(msg)
        layers = default_layers(backbone) if layers is None else list(layers)
        self.encoder = FeatureExtractor(backbone, layers, pre_trained=pre_trained, backbone_weights=backbone_weights,
                                        final_norm=True)
        self.flow_settings = {"flow_steps": flow_steps, "clamp_alpha": clamp, "hidden_ratio": hidden_ratio,
                              "kernel_sizes": [3] if conv3x3_only else [3, 1], "permute_soft": False}
        self.map_log_det = map_log_det
        self.input_size = self._resolve_input_size(input_size)
        self.norms = nn.ModuleList()
        self.flows = nn.ModuleList()
        self._build_heads()
        # the image score from the coarsest scale: the finer ones made it noisier on validation (docs/selection.md)
        self.scorer = AnomalyScorer(len(self.encoder.layers), aggregation="likelihood", blur_sigma=blur_sigma,
                                    score_scales=[-1])

    def _resolve_input_size(self, input_size: Sequence[int] | None) -> tuple[int, int]:
        if input_size is None:
            input_size = self.encoder.fixed_input_size or DEFAULT_INPUT_SIZE
        size = validated_input_size(input_size)
        self.encoder.check_input_size(size)
        return size

    @torch.no_grad()
    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """Real ``(C_l, h_l, w_l)`` of every layer at ``input_size`` (one dummy pass through the encoder)."""
        features = self.encoder(torch.zeros(1, 3, *self.input_size, device=self._device))
        return [tuple(feature.shape[1:]) for feature in features]

    @property
    def _device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.encoder.parameters()).device

    def _build_heads(self) -> None:
        """(Re)build normalisation layers and flows for the feature shapes at ``input_size``."""
        shapes = self.feature_shapes()
        self.norms = nn.ModuleList(
            nn.Identity() if self.encoder.is_transformer else nn.LayerNorm(list(shape), elementwise_affine=True)
            for shape in shapes
        )
        self.flows = nn.ModuleList(conv_flow(shape, **self.flow_settings) for shape in shapes)
        self.norms.to(self._device)
        self.flows.to(self._device)

    def set_input_size(self, input_size: Sequence[int]) -> None:
        """Rebuild the (untrained) heads for another input size; refused once the model has been trained."""
        size = self._resolve_input_size(input_size)
        if size == self.input_size:
            return
        if bool(self.scorer.statistics.fitted):
            msg = (f"input_size={size} differs from the size this trained model was built for, {self.input_size}; "
                   "its normalisation layers are tied to the feature shapes. Retrain, or feed images of that size.")
            raise ValueError(msg)
        self.input_size = size
        self._build_heads()

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ``ValueError`` when ``images`` do not have the size the model was built for."""
        size = tuple(images.shape[-2:])
        self.encoder.check_input_size(size)
        if not self.encoder.is_transformer and size != self.input_size:
            msg = (f"images of size {size} do not match input_size={self.input_size} this model was built for "
                   "(the normalisation layers have the feature shapes of that size); resize to it.")
            raise ValueError(msg)

    def flow_outputs(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(z_l B×C_l×h_l×w_l, per-position log|det J| B×h_l×w_l)]`` for images ``B×3×H×W``.

        Under autocast only the backbone runs in reduced precision; norms and flows stay float32.
        """
        features = self.encoder(images)  # channels-last; the flows run on NCHW, where channel splits copy whole planes
        with float32_region(images.device.type):
            return [flow(norm(as_float32(feature)).contiguous())
                    for flow, norm, feature in zip(self.flows, self.norms, features, strict=True)]

    def log_likelihood_map(self, z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        """Per-position log-likelihood per dimension ``B×h×w`` used for the anomaly map (``map_log_det``: with the
        per-position log-det ``B×h×w``)."""
        return gaussian_log_likelihood(z, log_det if self.map_log_det else torch.zeros((), device=z.device))

    @checks_images
    @in_image_passes
    @flags_non_finite_frames
    def forward(self, images: torch.Tensor) -> InferenceBatch | list[tuple[torch.Tensor, torch.Tensor]]:
        """Eval: ``InferenceBatch`` for images ``B×3×H×W``. Train: ``flow_outputs(images)``."""
        if self.training:
            return self.flow_outputs(images)
        with torch.no_grad():
            return self.scorer(self.likelihood_maps(images), images.shape[-2:])

    def likelihood_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale log-likelihood maps ``B×h_l×w_l`` of images ``B×3×H×W`` (what the scorer combines)."""
        outputs = self.flow_outputs(images)
        return [self.log_likelihood_map(z, log_det) for z, log_det in outputs]
