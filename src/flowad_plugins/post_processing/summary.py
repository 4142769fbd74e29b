"""Console text of a threshold report: rates, raw thresholds, counts, F1-optimal thresholds alongside."""

from __future__ import annotations

from typing import Any

from .thresholds import MIN_NORMAL_IMAGES_FOR_PIXEL_FPR


def threshold_summary(report: dict[str, Any]) -> str:
    """A few lines describing ``report`` (``FlowPostProcessor.threshold_report``)."""
    if not report:
        return "FlowPostProcessor: no thresholds set yet (no validation run)."
    lines = [
        f"FlowPostProcessor thresholds from {report['normal_images']} held-out normal validation images"
        + (f" ({report['anomalous_images']} anomalous images also seen):" if report["anomalous_images"] else
           " (no anomalous ones):")
    ]
    for level in ("image", "pixel"):
        entry = report.get(level)
        if entry is None:
            continue
        if entry["source"] == "fpr_gaussian":
            line = (f"  {level}: false-alarm rate {entry['fpr']:.3%} (default) -> raw threshold "
                    f"{entry['raw_threshold']:.6g} (mean + {entry['std_multiplier']:.2f} std of {entry['samples']} "
                    f"normal scores, a Student-t prediction bound: too few for an order statistic, which needs "
                    f"{entry['needed']})")
        elif entry["source"] == "none":
            line = f"  {level}: no threshold (no normal validation images)"
        else:
            how = "requested" if entry["source"] == "fpr" else "default"
            line = (f"  {level}: false-alarm rate {entry['fpr']:.3%} ({how}) -> raw threshold "
                    f"{entry['raw_threshold']:.6g}")
            if level == "image":
                line += (f" ({ordinal(entry['rank'])} highest of {entry['samples']} normal scores; expected rate "
                         f"{entry['expected_fpr']:.2%} ± {entry['expected_fpr_sd']:.2%})")
            else:
                line += (f" (validation pixel rate {entry['validation_fpr']:.3%} ± "
                         f"{entry['validation_fpr_se']:.3%} across images)")
        if entry["f1_threshold"] is not None:
            line += f"; F1-optimal {entry['f1_threshold']:.6g} (not used)"
        lines.append(line)
    return "\n".join(lines)





def threshold_warnings(report: dict[str, Any]) -> list[str]:
    """What a person must know about ``report``: thresholds resting on too few images, and what to do."""
    warnings = []
    image = report.get("image", {})
    normal = report.get("normal_images", 0)
    if image.get("source") == "fpr_gaussian":
        warnings.append(
            f"The image threshold rests on only {normal} normal validation images ({image['needed']} support a "
            f"{image['fpr']:.0%} false-alarm rate without assuming a distribution): the rate you get on the line may "
            "be several times higher or lower. Add normal images or raise val_split_ratio (each held-out normal "
            "image counts), or check the rate on a day of production images before relying on the labels.")
    if report.get("pixel", {}).get("source") == "fpr_default" and normal < MIN_NORMAL_IMAGES_FOR_PIXEL_FPR:
        warnings.append(
            f"The pixel threshold rests on the pixels of only {normal} normal validation images: masks may be too "
            f"large or too small. Hold out at least {MIN_NORMAL_IMAGES_FOR_PIXEL_FPR} normal images (val_split_ratio).")
    return warnings


def ordinal(number: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, …, ``11th``, ``21st``."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"
