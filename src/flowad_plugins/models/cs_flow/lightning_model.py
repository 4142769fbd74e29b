"""CS-Flow as an anomalib ``AnomalibModule``: ``anomalib train --model flowad_plugins.CSFlow``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

from flowad_plugins.models.common import (
    FlowAnomalibModule,
    FlowLoss,
    check_optimiser_settings,
    distributed_world_size,
)
from flowad_plugins.schedules import warmup_cosine
from flowad_plugins.scoring import gaussian_log_likelihood

from .torch_model import CSFlowModel


class CSFlow(FlowAnomalibModule):
    """CS-Flow (Rudolph et al., WACV 2022) with batch-independent, train-statistics scoring.

    Loss: negative log-likelihood per latent dimension, ``mean_b (½‖z_b‖² − log|det J_b|) / D + ½·log 2π`` over all
    scales, ``D`` = latent size per image. Adam with weight decay; Lightning clips the gradient norm to
    ``gradient_clip_norm`` (set here: anomalib lets a model's ``trainer_arguments`` override ``trainer:``).

    Args:
        backbone: timm CNN name.
        layer: the one backbone layer used at every scale.
        num_scales: input scales (full, 1/2, 1/4, …); paper: 3.
        coupling_blocks: cross-scale coupling blocks; paper: 4.
        kernel_sizes: subnet kernel per block; ``None`` = ``[3, …, 3, 5]`` (paper).
        hidden_channels: subnet width; ``None`` = the layer's channels (compact default). Paper: 1024.
        clamp_alpha: soft clamp ``α``; paper: 3.
        input_norm: data-initialised per-channel affine before the blocks (not in the paper; see ``flows``).
        lr: Adam learning rate (peak of the schedule); paper: 2e-4 (constant, hundreds of epochs). 4e-3 with warm-up
            + cosine suits the short CPU schedules this package is tuned for (``docs/selection.md``).
        weight_decay: Adam weight decay; paper: 1e-5.
        gradient_clip_norm: maximal gradient norm (0 = no clipping); paper: 1.
        lr_schedule: ``"constant"`` (paper) or ``"cosine"`` (warm-up, then cosine decay).
        warmup_fraction: share of the steps spent on warm-up with ``lr_schedule="cosine"``.
        blur_sigma: Gaussian smoothing of the anomaly map in input pixels (0 = none); 16: the best validation pixel
            AUROC of σ 4 / 8 / 12 / 16 on small defects of bottle, tire and generated data.
        score_blur_sigma: Gaussian smoothing (input pixels) of the map whose maximum is the image score (0 = the
            plain maximum); 4: chosen on the same validation (``benchmarks/results/local_defect_validation.md``).
        input_size: ``(H, W)`` of the default pre-processor; ``None`` = a custom pre-processor's size, else
            ``DEFAULT_INPUT_SIZE`` (640×640). Height and width must be multiples of the backbone stride × 4.
        pre_trained, backbone_weights, pre_processor, post_processor, evaluator, visualizer, seed: see
            ``FlowAnomalibModule``.
    """

    LR_SCHEDULES = ("constant", "cosine")
    # 640 px over 256 and 512 px on bottle validation (benchmarks/results/bottle/csflow*.json; paper: 768 px), with
    # blocks.2 over blocks.4 on small defects (benchmarks/results/local_defect_validation.md)
    DEFAULT_INPUT_SIZE = (640, 640)

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
        lr: float = 4e-3,
        weight_decay: float = 1e-5,
        gradient_clip_norm: float = 1.0,
        lr_schedule: str = "cosine",
        warmup_fraction: float = 0.05,
        blur_sigma: float = 16.0,
        score_blur_sigma: float = 4.0,
        input_size: Sequence[int] | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(input_size=input_size, seed=seed, pre_processor=pre_processor,
                         post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        if lr_schedule not in self.LR_SCHEDULES:
            msg = f"lr_schedule={lr_schedule!r} is not supported; allowed values: {list(self.LR_SCHEDULES)}."
            raise ValueError(msg)
        check_optimiser_settings(lr, weight_decay=weight_decay, gradient_clip_norm=gradient_clip_norm)
        self.model = CSFlowModel(
            backbone=backbone, layer=layer, pre_trained=pre_trained, backbone_weights=backbone_weights,
            num_scales=num_scales, coupling_blocks=coupling_blocks, kernel_sizes=kernel_sizes,
            hidden_channels=hidden_channels, clamp_alpha=clamp_alpha, input_norm=input_norm, blur_sigma=blur_sigma,
            score_blur_sigma=score_blur_sigma,
        )
        self.adopt_input_size(self.input_size)
        self.lr = lr
        self.weight_decay = weight_decay
        self.gradient_clip_norm = gradient_clip_norm
        self.lr_schedule = lr_schedule
        self.warmup_fraction = warmup_fraction

    def check_input_size(self, input_size: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless the backbone layer and every scale can use ``input_size``."""
        self.model.check_input_size(input_size)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Under DDP, initialise the data-dependent input norm from the first batch of *all* ranks.

        Alone, every rank would standardise with its own first batch, and DDP (which synchronises gradients,
        not values set outside backward) would leave the ranks' flows different for the rest of training.
        """
        del batch_idx
        norm = self.model.flow.input_norm
        if norm is None or bool(norm.initialized) or distributed_world_size() == 1:
            return
        with torch.no_grad():
            features = self.model.features(batch.image)
        # per scale and channel: count, Σx, Σx² over the ranks' first batches (float64)
        sums = torch.stack([
            torch.stack([torch.full((x.shape[1],), x[:, 0].numel(), dtype=torch.float64, device=x.device),
                         x.double().sum(dim=(0, 2, 3)), x.double().pow(2).sum(dim=(0, 2, 3))])
            for x in features
        ])  # S×3×C
        dist.all_reduce(sums)
        count, total, squares = sums.unbind(dim=1)
        mean = total / count
        std = ((squares - count * mean.pow(2)) / (count - 1).clamp_min(1)).clamp_min(0).sqrt().clamp_min(1e-6)
        with torch.no_grad():
            norm.bias.copy_(-mean.to(norm.bias.dtype))
            norm.log_scale.copy_(-std.log().to(norm.log_scale.dtype))
            norm.initialized.fill_(True)

    def configure_optimizers(self) -> torch.optim.Optimizer | OptimizerLRSchedulerConfig:
        """Adam (lr, weight decay) on the flow; optional warm-up + cosine stepped per batch."""
        optimizer = torch.optim.Adam(self.model.flow.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return optimizer
        scheduler = warmup_cosine(optimizer, self.trainer.estimated_stepping_batches, self.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_losses(self, batch: Batch) -> Iterator[FlowLoss]:
        """Negative log-likelihood per latent dimension of each image (all scales together)."""
        latents, log_jac_det = self.model(batch.image)
        all_latents = torch.cat([z.flatten(1) for z in latents], dim=1)  # B×D
        # the paper's loss omits the constant ½·log 2π of the log-likelihood; it changes no gradient
        loss = -gaussian_log_likelihood(all_latents, log_jac_det).mean()
        yield FlowLoss(loss, self.model.log_likelihood_maps(latents))

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Gradient-norm clipping (paper: 1) by Lightning; no sanity validation."""
        return {"gradient_clip_val": self.gradient_clip_norm, "gradient_clip_algorithm": "norm",
                "num_sanity_val_steps": 0}
