"""FastFlow as an anomalib ``AnomalibModule``: ``anomalib train --model flowad_plugins.FastFlow``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer

from flowad_plugins.models.common import FlowAnomalibModule, FlowLoss, check_optimiser_settings
from flowad_plugins.scoring import gaussian_log_likelihood

from .torch_model import FastFlowModel


class FastFlow(FlowAnomalibModule):
    """FastFlow (Yu et al. 2021, 2D normalizing flows) with batch-independent, train-statistics scoring.

    Loss: negative log-likelihood per dimension of every feature position (``½‖z‖²`` minus the log-det),
    averaged over positions and summed over scales; Adam with the paper's lr 1e-3 and weight decay 1e-5.

    Args:
        backbone: any timm CNN (``features_only``) or ViT/DeiT/CaiT; anomalib's four are not a limit.
        layers: backbone layers, shallow to deep; ``None`` = first three stages (CNN) or the paper's block (ViT).
        flow_steps: coupling blocks per scale (paper: 8 for CNNs, 20 for transformers).
        conv3x3_only: 3×3 subnets only (paper's ResNet18 setting) instead of alternating 3×3/1×1.
        hidden_ratio: subnet hidden channels / input channels (paper: 1.0 CNNs, 0.16 transformers).
        clamp: soft clamp of the affine coupling (paper: 2.0).
        map_log_det: include the per-position log-det in the anomaly map (training always uses it); on by
            default: better localisation on validation data (benchmarks/experiments/fastflow_log_det.py).
        blur_sigma: Gaussian smoothing of the anomaly map in input pixels (0 = none).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        input_size: ``(H, W)`` the model is built for (its layer norms have the feature shapes of that size);
            ``None`` = a custom pre-processor's size, else the backbone's fixed size (ViTs), else 256×256.
            A checkpoint restores it, whatever the arguments the model was rebuilt with.
        pre_trained, backbone_weights, pre_processor, post_processor, evaluator, visualizer, seed: see
            ``FlowAnomalibModule``.
    """

    def __init__(
        self,
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
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        input_size: Sequence[int] | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(input_size=input_size, seed=seed, pre_processor=pre_processor,
                         post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        check_optimiser_settings(lr, weight_decay=weight_decay)
        if input_size is None and isinstance(pre_processor, PreProcessor):
            input_size = self.input_size
        self.model = FastFlowModel(
            input_size=input_size, backbone=backbone, layers=layers, pre_trained=pre_trained,
            backbone_weights=backbone_weights, flow_steps=flow_steps, conv3x3_only=conv3x3_only,
            hidden_ratio=hidden_ratio, clamp=clamp, map_log_det=map_log_det, blur_sigma=blur_sigma,
        )
        self.adopt_input_size(self.model.input_size)  # the default pre-processor follows (e.g. a ViT's size)
        self.hparams["layers"] = list(self.model.encoder.layers)
        self.lr = lr
        self.weight_decay = weight_decay

    def build_for_input_size(self, input_size: tuple[int, int]) -> None:
        """Rebuild the (untrained) layer norms and flows for the feature shapes at ``input_size``."""
        self.model.set_input_size(input_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the normalisation layers and flows (the encoder is frozen)."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)

    def training_losses(self, batch: Batch) -> Iterator[FlowLoss]:
        """Negative log-likelihood per dimension, averaged over positions, summed over scales."""
        loss = torch.zeros((), device=batch.image.device)
        log_likelihoods = []
        for z, log_det in self.model(batch.image):
            log_likelihood = gaussian_log_likelihood(z, log_det)  # the objective always has the log-det
            loss = loss - log_likelihood.mean()
            # the statistics follow the anomaly map's definition (``map_log_det``)
            map_values = log_likelihood if self.model.map_log_det else self.model.log_likelihood_map(z, log_det)
            log_likelihoods.append(map_values)
        yield FlowLoss(loss, log_likelihoods)
