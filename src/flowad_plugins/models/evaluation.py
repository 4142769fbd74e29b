"""``FlowEvaluator``: anomalib's ``Evaluator``, with the pixel-level validation metrics of a fit computed once.

Pixel AUROC and AUPRO over every validation pixel take seconds per epoch at 640 px. Earlier validations of a fit
log the image-level metrics only; the last one (``is_last_validation_of_fit``) and a validate-only run compute them
all. Monitor an image-level metric (``val_image_AUROC``) for early stopping or checkpoint selection.
"""

from __future__ import annotations

from typing import Any

from anomalib.metrics import Evaluator
from lightning import LightningModule, Trainer

from flowad_plugins.scoring import is_last_validation_of_fit


def is_pixel_metric(metric: Any) -> bool:
    """Whether an anomalib metric reads the anomaly map (``fields`` holds ``anomaly_map``)."""
    return "anomaly_map" in getattr(metric, "fields", ())


class FlowEvaluator(Evaluator):
    """anomalib ``Evaluator`` whose pixel-level validation metrics run at the last validation of a fit only."""

    def _active_val_metrics(self, trainer: Trainer) -> list:
        last = is_last_validation_of_fit(trainer)
        return [metric for metric in self.val_metrics if last or not is_pixel_metric(metric)]

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update the validation metrics this validation computes."""
        del outputs, batch_idx, dataloader_idx, pl_module
        for metric in self._active_val_metrics(trainer):
            metric.update(batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute and log them as anomalib does (``barebones`` mode included)."""
        del pl_module
        for metric in self._active_val_metrics(trainer):
            self.log(metric.name, metric)
            if trainer.barebones:
                value = metric.compute()
                trainer.callback_metrics[metric.name] = value
                trainer.logged_metrics[metric.name] = value
