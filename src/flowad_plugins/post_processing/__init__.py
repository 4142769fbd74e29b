"""Post-processing for the flow models: anomalib's ``PostProcessor`` with false-alarm-rate thresholds.

**Thresholds.** ``FlowPostProcessor(image_fpr=0.01, pixel_fpr=0.001)`` sets the image and pixel thresholds from the
*normal* validation images (``gt_label == 0``, held out from training) so that about that share of new normal
images (pixels) is flagged. anomalib's F1-adaptive threshold needs anomalous validation images; with only normal
ones it can only fall back to an extreme of the normal scores. The rule, per level:

- rate given: the threshold is the ``k``-th largest of the ``n`` normal validation scores, ``k = ⌊fpr·(n+1)⌋``
  (for pixels: of all their pixels). By exchangeability a new normal score exceeds it with probability
  ``k/(n+1) ≤ fpr``; the realised rate varies with the validation sample as ``Beta(k, n+1−k)``.
- rate ``None`` and validation holds anomalies: anomalib's F1-optimal threshold (its default, unchanged).
- rate ``None`` and validation holds only normal images: the rate defaults to ``DEFAULT_IMAGE_FPR`` /
  ``DEFAULT_PIXEL_FPR`` (5 % / 0.1 %); with too few images for it, the highest normal score is used, with a warning.
- When anomalies exist, the F1-optimal thresholds are always computed and reported alongside, never used by a
  given rate.

**Minimum counts.** An image rate ``fpr`` needs ``n ≥ ⌈1/fpr⌉ − 1`` normal validation images (so ``k ≥ 1``),
e.g. 19 for 5 %, 99 for 1 %. Pixels of one image are strongly correlated, so the pixel threshold counts images
too: it needs ``MIN_NORMAL_IMAGES_FOR_PIXEL_FPR`` (10) normal images, and its image-level standard error (the
spread of the per-image flagged fraction) is reported, with a warning above 50 % of the rate. Too few images
for a requested rate raise ``ValueError`` naming the count needed, at fit start when the datamodule shows it.

**Normalisation.** anomalib normalises a score as ``clamp((x − t)/(max − min) + 0.5, 0, 1)`` with ``t``, ``min``
and ``max`` from the validation set. Every test score beyond the validation range becomes exactly 0 or 1, so
ties corrupt AUROC/AUPRO computed after post-processing. ``FlowPostProcessor`` keeps the threshold at 0.5 and
the slope near it, but compresses the tails smoothly (``0.5 + 0.5·v/(1+|v|)``, ``v = 2(x − t)/(max − min)``):
strictly increasing, in (0, 1), no ties in float32 short of ~10⁷ ranges away.

**Persistence.** Raw thresholds are anomalib's buffers (checkpoint, and constants of the exported graph);
the rates and the threshold report (counts, ranks, expected rates, F1 thresholds) are plain data in the
checkpoint (``checkpoint_config``). ``write_threshold_metadata`` stamps the same report into an exported ONNX
or OpenVINO file.

Modules: ``processor`` (``FlowPostProcessor``: Lightning hooks, normalisation), ``thresholds`` (false-alarm
maths), ``normal_predictions`` (the normal validation predictions, gathered across DDP ranks), ``summary``
(console text), ``metadata`` (threshold metadata in ONNX / OpenVINO files).
"""

from .metadata import METADATA_KEY, read_threshold_metadata, write_threshold_metadata
from .normal_predictions import NormalValidationPredictions
from .processor import FlowPostProcessor
from .summary import threshold_summary
from .thresholds import (
    DEFAULT_IMAGE_FPR,
    DEFAULT_PIXEL_FPR,
    MIN_NORMAL_IMAGES_FOR_PIXEL_FPR,
    PIXEL_RELATIVE_ERROR_WARNING,
    false_alarm_threshold,
    required_normal_images,
)

__all__ = [
    "DEFAULT_IMAGE_FPR",
    "DEFAULT_PIXEL_FPR",
    "METADATA_KEY",
    "MIN_NORMAL_IMAGES_FOR_PIXEL_FPR",
    "PIXEL_RELATIVE_ERROR_WARNING",
    "FlowPostProcessor",
    "NormalValidationPredictions",
    "false_alarm_threshold",
    "read_threshold_metadata",
    "required_normal_images",
    "threshold_summary",
    "write_threshold_metadata",
]
