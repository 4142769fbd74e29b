"""What the three flow models share on the Lightning side.

``FlowAnomalibModule`` holds the behaviour every flow model needs beyond anomalib's base class:
the train-statistics life cycle of the scorer (reset at epoch start, commit at epoch end), checks
of the training data and input size with clear errors, the non-finite-loss guard, and an evaluator
that also reports AUPRO. Subclasses set ``self.model`` (with ``.encoder`` and ``.scorer``) and write
``configure_optimizers``/``training_step``.
"""

from __future__ import annotations

from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from lightning.pytorch.utilities.types import STEP_OUTPUT

from flowad_plugins.post_processing import FlowPostProcessor

MIN_TRAIN_IMAGES = 4


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class FlowAnomalibModule(AnomalibModule):
    """Base of ``CflowAD``, ``FastFlow`` and ``CSFlow`` (one-class, trained on normal images)."""

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """anomalib's default test metrics plus pixel AUPRO (FPR limit 0.3); ranking metrics on validation.

        Validation metrics (prefix ``val_``) are what model and hyper-parameter choices may look at;
        with a validation split from normal training images (+ synthetic anomalies) they never touch
        the test set.
        """
        val_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="val_image_", strict=False),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="val_pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="val_pixel_", strict=False),
        ]
        test_metrics = [
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
        return Evaluator(val_metrics=val_metrics, test_metrics=test_metrics)

    def configure_post_processor(self) -> FlowPostProcessor:
        """anomalib's thresholds with rank-preserving normalisation (see ``post_processing``)."""
        return FlowPostProcessor()

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

    def on_fit_start(self) -> None:
        """Fail early, with the parameter named, on an input size the backbone layers cannot use."""
        if self.input_size is not None:
            self.model.encoder.check_input_size(tuple(self.input_size))

    def on_train_start(self) -> None:
        """Refuse training sets too small to fit a flow and its normal-data statistics."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        count = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        if count is not None and count < MIN_TRAIN_IMAGES:
            msg = (
                f"Too few training images: got {count}, need at least {MIN_TRAIN_IMAGES} normal images to fit "
                "the flow and its normal-data statistics (check the datamodule's root/category and split)."
            )
            raise ValueError(msg)

    def on_train_epoch_start(self) -> None:
        """Start a fresh accumulation of normal-data likelihood statistics."""
        self.model.scorer.statistics.reset()

    def on_train_epoch_end(self) -> None:
        """Store this epoch's normal-data likelihood statistics (gathered across DDP ranks)."""
        self.model.scorer.statistics.commit()

    def check_finite_loss(self, loss: torch.Tensor) -> None:
        """Stop training with a clear message when ``loss`` is NaN or infinite."""
        if not bool(torch.isfinite(loss)):
            msg = (
                f"{self.name}: training loss became {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}. Likely causes: learning rate too high (lr={getattr(self, 'lr', '?')}), "
                "non-finite input images, or a clamp too loose for this data. Checkpoints written before "
                "this step are intact; lower lr or check the data, then resume."
            )
            raise NonFiniteLossError(msg)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Predict scores and maps for the validation batch (used by the post-processor's thresholds)."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())
