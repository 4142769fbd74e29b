"""``FlowPostProcessor``: anomalib's ``PostProcessor`` with false-alarm-rate thresholds and rank-preserving
normalisation (see the package docstring for the rules)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import Metric

from flowad_plugins.scoring import is_last_validation_of_fit

from .metadata import finite_or_none
from .normal_predictions import NormalValidationPredictions, normal_sample_paths
from .summary import threshold_summary, threshold_warnings
from .thresholds import (
    DEFAULT_IMAGE_FPR,
    DEFAULT_PIXEL_FPR,
    check_normal_image_counts,
    check_rate,
    level_threshold_report,
    normalisation_spread,
)

logger = logging.getLogger("flowad_plugins.post_processing")


def masked_by_label(pred_mask: torch.Tensor | None, pred_label: torch.Tensor | None) -> torch.Tensor | None:
    """``pred_mask`` (``B×…``) cleared on images whose ``pred_label`` (``B``) is normal: a frame the line passes
    shows no defect region (no border bands on normal frames). Unchanged when either is missing."""
    if pred_mask is None or pred_label is None or pred_mask.dtype != torch.bool:
        return pred_mask
    return pred_mask & pred_label.bool().reshape(-1, *[1] * (pred_mask.dim() - 1))


class FlowPostProcessor(PostProcessor):
    """anomalib ``PostProcessor`` with thresholds at chosen false-alarm rates and rank-preserving normalisation.

    Args:
        image_fpr: share of normal images to flag, in (0, 1); ``None``: ``DEFAULT_IMAGE_FPR`` (the threshold comes
            from normal validation images only; anomalies in validation do not move it).
        pixel_fpr: share of normal pixels to flag, in (0, 1); ``None``: as ``image_fpr`` with ``DEFAULT_PIXEL_FPR``.
        verbose: print the threshold summary at the end of training.
        **kwargs: anomalib ``PostProcessor`` arguments (``enable_normalization``, sensitivities, ...).

    Example:
        ``CflowAD(post_processor=FlowPostProcessor(image_fpr=0.01, pixel_fpr=0.001))``, or on the CLI
        ``--model.post_processor flowad_plugins.post_processing.FlowPostProcessor``
        ``--model.post_processor.image_fpr 0.01``.
    """

    def __init__(
        self,
        image_fpr: float | None = None,
        pixel_fpr: float | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image_fpr = check_rate("image_fpr", image_fpr)
        self.pixel_fpr = check_rate("pixel_fpr", pixel_fpr)
        self.verbose = verbose
        self.threshold_report: dict[str, Any] = {}
        self._normal_predictions = NormalValidationPredictions()

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        """anomalib's keys plus the requested rates and the threshold report (plain data)."""
        return (*super()._checkpoint_config_keys, "image_fpr", "pixel_fpr", "threshold_report")

    # ---------------------------------------------------------------- Lightning hooks

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail before training when validation is too small for a requested rate or overlaps the training set."""
        del pl_module
        if not self.enable_thresholding:
            return
        datamodule = getattr(trainer, "datamodule", None)
        val_paths, val_normal = normal_sample_paths(getattr(datamodule, "val_data", None))
        if val_paths is None:
            return
        train_paths, _ = normal_sample_paths(getattr(datamodule, "train_data", None))
        shared = set(val_normal) & set(train_paths or [])
        if shared:
            msg = (
                f"{len(shared)} normal validation images are also training images (e.g. {sorted(shared)[0]}); "
                "thresholds set on images the model was fitted on flag too little. Hold them out: "
                "val_split_mode='from_train' or 'synthetic' with val_split_ratio > 0."
            )
            raise ValueError(msg)
        check_normal_image_counts(len(val_normal), self.image_fpr, self.pixel_fpr)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args: Any, **kwargs: Any
    ) -> None:
        """Accumulate anomalib's statistics and the normal images' scores and maps."""
        super().on_validation_batch_end(trainer, pl_module, outputs, *args, **kwargs)
        if self.enable_thresholding:
            self._normal_predictions.update(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set normalisation statistics and thresholds (skipped during Lightning's sanity check).

        An earlier validation of a fit sets the image threshold only: the pixel threshold (a precision-recall curve
        over every validation pixel, seconds per epoch at 640 px) is needed only from the last validation
        (``is_last_validation_of_fit``), whose scoring and thresholds the model keeps.
        """
        del pl_module
        if trainer.sanity_checking:
            self._reset_accumulators()
            return
        if self.enable_thresholding and self._normal_predictions.update_called:
            self._compute_thresholds(pixel=is_last_validation_of_fit(trainer))
        self._compute_normalization()
        self._reset_accumulators()

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the rates, raw thresholds and counts used, and a warning when they rest on too few images."""
        del trainer, pl_module
        if self.verbose and self.threshold_report:
            print(self.summary())
        for warning in threshold_warnings(self.threshold_report):
            logger.warning(warning)

    # ---------------------------------------------------------------- thresholds

    def _compute_normalization(self) -> None:
        """Scale of the normalised score: ``threshold ± spread`` of the normal validation values (so a normal image
        one spread below the threshold reads 0.25); without thresholds, anomalib's validation min and max."""
        if not self.enable_normalization:
            return
        for level, metric, low, high in (
            ("image", self._image_min_max_metric, self.image_min, self.image_max),
            ("pixel", self._pixel_min_max_metric, self.pixel_min, self.pixel_max),
        ):
            spread = self.threshold_report.get(level, {}).get("spread")
            threshold = self.threshold_report.get(level, {}).get("raw_threshold")
            if spread is not None and threshold is not None:
                low.fill_(threshold - spread)
                high.fill_(threshold + spread)
            elif metric.update_called:
                value_min, value_max = metric.compute()
                low.copy_(value_min)
                high.copy_(value_max)

    def _compute_thresholds(self, pixel: bool = True) -> None:
        normal_scores, normal_maps, anomalous = self._normal_predictions.compute()
        normal_images = int(normal_scores.numel())
        check_normal_image_counts(normal_images, self.image_fpr, self.pixel_fpr)
        f1_image = self._f1_threshold(self._image_threshold_metric) if anomalous else None
        f1_pixel = self._f1_threshold(self._pixel_threshold_metric) if anomalous and pixel else None
        report: dict[str, Any] = {"normal_images": normal_images, "anomalous_images": anomalous}
        report["image"] = level_threshold_report(
            "image", normal_scores, self.image_fpr, DEFAULT_IMAGE_FPR, f1_image, normal_images
        )
        if normal_maps is not None and pixel:
            report["pixel"] = level_threshold_report(
                "pixel", normal_maps, self.pixel_fpr, DEFAULT_PIXEL_FPR, f1_pixel, normal_images
            )
        report["image"]["spread"] = normalisation_spread(normal_scores)
        if "pixel" in report:
            report["pixel"]["spread"] = normalisation_spread(normal_maps)
        elif "pixel" in self.threshold_report:  # an earlier validation of the fit: the pixel level is set later
            report["pixel"] = self.threshold_report["pixel"]
        for level, buffer in (("image", self._image_threshold), ("pixel", self._pixel_threshold)):
            if level in report and report[level]["raw_threshold"] is not None:
                buffer.fill_(report[level]["raw_threshold"])
        self.threshold_report = report

    @staticmethod
    def _f1_threshold(metric: Metric) -> float | None:
        if not metric.update_called:
            return None
        value = float(metric.compute())
        return value if math.isfinite(value) else None

    def _reset_accumulators(self) -> None:
        for metric in (
            self._image_threshold_metric,
            self._pixel_threshold_metric,
            self._image_min_max_metric,
            self._pixel_min_max_metric,
            self._normal_predictions,
        ):
            metric.reset()

    # ---------------------------------------------------------------- reporting

    def summary(self) -> str:
        """A few lines: rates, raw thresholds, number of normal images, F1-optimal thresholds alongside."""
        return threshold_summary(self.threshold_report)

    def threshold_metadata(self) -> dict[str, Any]:
        """Plain data describing the thresholds: requested rates, raw thresholds, and the full report."""
        return {
            "image_fpr": self.image_fpr,
            "pixel_fpr": self.pixel_fpr,
            "image_threshold": finite_or_none(self.image_threshold),
            "pixel_threshold": finite_or_none(self.pixel_threshold),
            "report": self.threshold_report,
        }

    # ---------------------------------------------------------------- labels, masks and normalisation

    def forward(self, predictions: InferenceBatch) -> InferenceBatch:
        """anomalib's post-processing (used by exported graphs), with the mask only on images labelled anomalous."""
        processed = super().forward(predictions)
        return processed._replace(pred_mask=masked_by_label(processed.pred_mask, processed.pred_label))

    def threshold_batch(self, batch: Batch) -> None:
        """anomalib's labels and masks, with the mask only on images labelled anomalous (test, predict)."""
        super().threshold_batch(batch)
        batch.pred_mask = masked_by_label(batch.pred_mask, batch.pred_label)

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None,
        norm_min: torch.Tensor,
        norm_max: torch.Tensor,
        threshold: torch.Tensor,
    ) -> torch.Tensor | None:
        """Map ``preds`` to (0, 1), ``threshold`` to 0.5, strictly increasing; unchanged without statistics."""
        if preds is None:
            return preds
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        value_range = norm_max - norm_min
        safe_range = torch.where(value_range > 0, value_range, torch.ones_like(value_range))
        # ±inf (a frame with non-finite pixels, see ``input_guard``) becomes ±1e30 and so 1 or 0, not inf/inf = NaN
        scaled = (2 * (preds - threshold) / safe_range).clamp(-1e30, 1e30)
        normalized = 0.5 + 0.5 * scaled / (1 + scaled.abs())
        has_range = ~torch.isnan(norm_min) & ~torch.isnan(norm_max)
        return torch.where(has_range, normalized, preds)

