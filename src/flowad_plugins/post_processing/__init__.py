"""Post-processing for the flow models: anomalib's ``PostProcessor`` with false-alarm-rate thresholds.

**Thresholds.** ``FlowPostProcessor(image_fpr=0.01, pixel_fpr=0.001)`` sets the image and pixel thresholds from the
*normal* validation images (``gt_label == 0``, held out from training) so that about that share of new normal
images (pixels) is flagged; anomalib's F1-adaptive threshold needs anomalous validation images. Per level:

- the threshold is the ``k``-th largest of the ``n`` normal validation scores (pixels: of all their pixels),
  ``k = ⌊fpr·(n+1)⌋``, so a new normal score exceeds it with probability ``k/(n+1) ≤ fpr`` (``thresholds``);
- rate ``None``: ``DEFAULT_IMAGE_FPR`` / ``DEFAULT_PIXEL_FPR`` (5 % / 0.1 %); with too few images for the default
  image rate, a Gaussian fit to the normal scores, with a warning;
- F1-optimal thresholds on validation anomalies are reported alongside, never used.

An image rate ``fpr`` needs ``n ≥ ⌈1/fpr⌉ − 1`` normal validation images; pixels of one image are correlated, so a
pixel rate needs ``MIN_NORMAL_IMAGES_FOR_PIXEL_FPR`` images. Too few for a requested rate raise ``ValueError``.

**Normalisation.** A score maps to ``0.5 + 0.5·v/(1+|v|)``, ``v = 2(x − t)/(max − min)``: the threshold at 0.5,
strictly increasing, in (0, 1), so unlike anomalib's clamp no test scores tie at 0 or 1 (ties corrupt AUROC/AUPRO).

**Persistence.** Raw thresholds are anomalib's buffers (checkpoint, constants of the exported graph); rates and the
threshold report are plain data in the checkpoint. ``write_threshold_metadata`` stamps the report into an export.
"""

from .metadata import METADATA_KEY, read_threshold_metadata, write_threshold_metadata
from .processor import FlowPostProcessor
from .thresholds import MIN_NORMAL_IMAGES_FOR_PIXEL_FPR, false_alarm_threshold, required_normal_images

__all__ = [
    "METADATA_KEY", "MIN_NORMAL_IMAGES_FOR_PIXEL_FPR", "FlowPostProcessor", "false_alarm_threshold",
    "read_threshold_metadata", "required_normal_images", "write_threshold_metadata",
]
