"""False-alarm-rate thresholds from normal scores: order statistics and the per-level threshold report.

A threshold at rate ``fpr`` is the ``k``-th largest of ``n`` normal validation scores, ``k = ⌊fpr·(n+1)⌋``; by
exchangeability a new normal score exceeds it with probability ``k/(n+1) ≤ fpr`` (realised rate ``Beta(k, n+1−k)``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from scipy.stats import t as student_t

logger = logging.getLogger("flowad_plugins.post_processing")

DEFAULT_IMAGE_FPR = 0.05
DEFAULT_PIXEL_FPR = 0.001
MIN_NORMAL_IMAGES_FOR_PIXEL_FPR = 10
PIXEL_RELATIVE_ERROR_WARNING = 0.5


def required_normal_images(fpr: float) -> int:
    """Fewest normal images ``n`` whose order statistics can realise an image false-alarm rate ``fpr``:
    ``k = ⌊fpr·(n+1)⌋ ≥ 1`` needs ``n ≥ ⌈1/fpr⌉ − 1``."""
    return max(1, math.ceil(1.0 / fpr - 1.0 - 1e-9))


def false_alarm_threshold(normal_scores: torch.Tensor, fpr: float, allow_fewer: bool = False) -> tuple[float, int]:
    """``(raw threshold, k)`` flagging about ``fpr`` of new normal scores: the ``k``-th largest of the ``n`` values of
    ``normal_scores`` (any shape), ``k = ⌊fpr·(n+1)⌋``; flag ``score > threshold`` (expected rate ``k/(n+1) ≤ fpr``).
    ``allow_fewer``: with ``k < 1`` use the largest score (rate ``1/(n+1)``) instead of raising."""
    values = normal_scores.detach().flatten().float()
    count = values.numel()
    rank = math.floor(fpr * (count + 1) + 1e-9)
    if rank < 1:
        if not allow_fewer:
            msg = (
                f"A false-alarm rate of {fpr} needs at least {required_normal_images(fpr)} normal samples; got {count}."
            )
            raise ValueError(msg)
        rank = 1
    if count == 0:
        msg = "No normal samples to set a false-alarm threshold from."
        raise ValueError(msg)
    threshold = torch.kthvalue(values.cpu(), count - rank + 1).values
    return float(threshold), rank


def check_rate(name: str, value: float | None) -> float | None:
    """``value`` as a float false-alarm rate in (0, 1) (or ``None``); ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) < 1.0:
        msg = f"{name} must be a false-alarm rate in (0, 1), e.g. 0.01, or None; got {value!r}."
        raise ValueError(msg)
    return float(value)


def check_normal_image_counts(normal_images: int, image_fpr: float | None, pixel_fpr: float | None) -> None:
    """Raise when ``normal_images`` cannot support a requested rate (message says how many are needed)."""
    problems = []
    if image_fpr is not None and normal_images < required_normal_images(image_fpr):
        problems.append(f"image_fpr={image_fpr} needs ≥ {required_normal_images(image_fpr)}")
    if pixel_fpr is not None and normal_images < MIN_NORMAL_IMAGES_FOR_PIXEL_FPR:
        problems.append(f"pixel_fpr={pixel_fpr} needs ≥ {MIN_NORMAL_IMAGES_FOR_PIXEL_FPR}")
    if problems:
        msg = (
            f"Too few normal validation images for the requested false-alarm rate: {normal_images} held-out "
            f"normal images, but {' and '.join(problems)} (an image rate r needs ⌈1/r⌉ − 1; pixels of one "
            "image are correlated, so pixel thresholds count images too). Raise val_split_ratio, add normal "
            "images, or request a larger rate."
        )
        raise ValueError(msg)


def gaussian_multiplier(samples: int, fpr: float) -> float:
    """``t₁₋fpr,n−1·√(1 + 1/n)``: how many sample stds above the mean of ``n`` normal scores a new normal score
    exceeds with probability ``fpr`` (Student-t prediction bound; the plug-in ``z₁₋fpr`` flags about twice the rate
    at n = 5)."""
    return float(student_t.ppf(1.0 - fpr, samples - 1)) * math.sqrt(1.0 + 1.0 / samples)


def gaussian_threshold(normal_scores: torch.Tensor, fpr: float) -> float:
    """``mean + gaussian_multiplier·std`` of ``normal_scores`` (sample std): the rate-``fpr`` prediction bound of a
    fitted normal. For the image threshold when too few images support the default rate (the highest of 5 scores
    flags about 1 in 6)."""
    values = normal_scores.detach().flatten().double()
    if values.numel() < 2:
        return float(values.max())
    return float(values.mean()) + gaussian_multiplier(values.numel(), fpr) * float(values.std())


def level_threshold_report(
    level: str,
    normal_values: torch.Tensor,
    requested: float | None,
    default: float,
    f1_threshold: float | None,
    normal_images: int,
) -> dict[str, Any]:
    """Threshold report of one level (``"image"``: scores ``(n,)``; ``"pixel"``: maps ``(n, P)``).

    The requested rate, else ``default``, as an order statistic of the normal validation values (image level:
    ``gaussian_threshold`` when too few images support the default rate). The F1-optimal threshold is reported, never
    used: the rate rules labelled and masked at least as well on validation (``docs/selection.md``). The entry holds
    the source (``fpr``, ``fpr_default``, ``fpr_gaussian``, ``none``), rate, raw threshold, and the rank and expected
    rate (image) or the validation rate and its standard error across images (pixel).
    """
    entry: dict[str, Any] = {"requested_fpr": requested, "f1_threshold": f1_threshold}
    if normal_images == 0:
        entry.update(source="none", fpr=None, raw_threshold=None)
        return entry
    rate = requested if requested is not None else default
    samples = normal_values.numel()
    if level == "image" and requested is None and samples < required_normal_images(rate):
        entry.update(source="fpr_gaussian", fpr=rate, raw_threshold=gaussian_threshold(normal_values, rate),
                     samples=samples, needed=required_normal_images(rate),
                     std_multiplier=gaussian_multiplier(samples, rate) if samples > 1 else 0.0)
        return entry
    threshold, rank = false_alarm_threshold(normal_values, rate, allow_fewer=requested is None)
    entry.update(source="fpr" if requested is not None else "fpr_default", fpr=rate, raw_threshold=threshold,
                 rank=rank, samples=samples, expected_fpr=rank / (samples + 1))
    if level == "image":
        entry["expected_fpr_sd"] = math.sqrt(rank * (samples + 1 - rank) / ((samples + 1) ** 2 * (samples + 2)))
        return entry
    per_image = (normal_values > threshold).float().mean(dim=1)
    standard_error = float(per_image.std() / math.sqrt(len(per_image))) if len(per_image) > 1 else math.nan
    entry.update(validation_fpr=float(per_image.mean()), validation_fpr_se=standard_error)
    if not standard_error <= PIXEL_RELATIVE_ERROR_WARNING * rate:
        logger.warning(
            "pixel threshold: the false-alarm pixels concentrate in few of the %d normal validation "
            "images (rate %.3g ± %.3g across images); the realised pixel rate is uncertain. Add normal "
            "images or raise pixel_fpr.", normal_images, float(per_image.mean()), standard_error,
        )
    return entry


def normalisation_spread(normal_values: torch.Tensor) -> float | None:
    """The spread of normal validation values that one unit of the normalised scale stands for (sample std).

    ``None`` when fewer than two values or no spread: the normalisation then falls back to the validation range.
    """
    values = normal_values.detach().flatten().double()
    if values.numel() < 2:
        return None
    spread = float(values.std())
    return spread if math.isfinite(spread) and spread > 0 else None
