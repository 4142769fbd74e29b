"""CFLOW-AD as an anomalib ``AnomalibModule``: ``anomalib train --model flowad_plugins.CflowAD``."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch.nn import functional as F

from flowad_plugins.models.common import FlowAnomalibModule, FlowLoss, all_reduce_max, check_optimiser_settings
from flowad_plugins.schedules import warmup_cosine

from .torch_model import CflowADModel


class CflowAD(FlowAnomalibModule):
    """CFLOW-AD (Gudovskiy et al., WACV 2022) with batch-independent, train-statistics scoring.

    Training decodes every fiber of an image batch: the fibers of each layer are shuffled and split
    into ``fiber_batch_size`` chunks; each chunk (all layers together) is one Adam step on
    ``−log σ(log p)`` per fiber (``log p``: log-likelihood per dimension). The LR warms up linearly, then
    decays on a cosine over the whole run.

    Args:
        backbone: timm model name (any CNN with ``feature_info``).
        layers: backbone layers, shallow to deep.
        condition_dim: positional-encoding size (multiple of 4).
        coupling_blocks: coupling blocks per decoder.
        clamp_alpha: soft clamp of the affine coupling.
        permute_soft: random orthogonal channel mixing between blocks (paper) instead of permutations.
        fiber_batch_size: fibers per optimizer step (paper: 256).
        lr: Adam learning rate (peak of the schedule).
        warmup_fraction: share of the training steps spent on the linear warm-up.
        inference_chunk_size: fibers per vectorised pass at inference (bounds memory only).
        blur_sigma: Gaussian smoothing of the anomaly map in input pixels (0 = none).
        input_size: ``(H, W)`` of the default pre-processor; ``None`` = a custom pre-processor's size, else
            ``DEFAULT_INPUT_SIZE`` (256×256). Any size the backbone layers accept works.
        pre_trained, backbone_weights, pre_processor, post_processor, evaluator, visualizer, seed: see
            ``FlowAnomalibModule``.
    """

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
        fiber_batch_size: int = 256,
        lr: float = 1e-3,
        warmup_fraction: float = 0.05,
        inference_chunk_size: int = 65536,
        blur_sigma: float = 8.0,
        input_size: Sequence[int] | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(input_size=input_size, seed=seed, pre_processor=pre_processor,
                         post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        if fiber_batch_size < 1:
            msg = f"fiber_batch_size must be ≥ 1, got {fiber_batch_size}."
            raise ValueError(msg)
        self.model = CflowADModel(
            backbone=backbone, layers=list(layers), pre_trained=pre_trained, backbone_weights=backbone_weights,
            condition_dim=condition_dim, coupling_blocks=coupling_blocks, clamp_alpha=clamp_alpha,
            permute_soft=permute_soft, inference_chunk_size=inference_chunk_size, blur_sigma=blur_sigma,
        )
        self.adopt_input_size(self.input_size)
        self.fiber_batch_size = fiber_batch_size
        check_optimiser_settings(lr)
        self.lr = lr
        self.warmup_fraction = warmup_fraction
        self.automatic_optimization = False  # several Adam steps per batch (``training_losses``)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """Adam on the decoders; warm-up + cosine stepped once per training batch."""
        optimizer = torch.optim.Adam(self.model.decoders.parameters(), lr=self.lr)
        scheduler = warmup_cosine(optimizer, self.trainer.estimated_stepping_batches, self.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_losses(self, batch: Batch) -> Iterator[FlowLoss]:
        """One loss per chunk of ``fiber_batch_size`` fibers of every layer (each fiber of the batch once)."""
        features = self.model.encoder(batch.image)
        sizes = [tuple(feature_map.shape[-2:]) for feature_map in features]
        fibers = [self.model.fibers(feature_map) for feature_map in features]
        steps = max(math.ceil(layer_fibers.shape[0] / self.fiber_batch_size) for layer_fibers, _ in fibers)
        # DDP: every rank must take the same number of Adam steps (each backward all-reduces the gradients)
        steps = all_reduce_max(steps, batch.image.device)
        orders = [
            torch.randperm(layer_fibers.shape[0], device=layer_fibers.device).chunk(steps) for layer_fibers, _ in fibers
        ]
        for step in range(steps):
            loss = torch.zeros((), device=batch.image.device)
            log_likelihoods: list[torch.Tensor | None] = []
            for layer, ((layer_fibers, positions), order) in enumerate(zip(fibers, orders, strict=True)):
                # torch.chunk returns fewer chunks than steps for a layer with few fibers: such a layer revisits
                # its chunks, so every decoder takes part in every step (DDP expects every parameter's gradient)
                index = order[step % len(order)]
                log_likelihood = self.model.fiber_log_likelihood(
                    layer, layer_fibers[index], positions[index], sizes[layer]
                )
                loss = loss + (-F.logsigmoid(log_likelihood)).mean()
                log_likelihoods.append(log_likelihood if step < len(order) else None)  # each fiber counted once
            yield FlowLoss(loss, log_likelihoods)
