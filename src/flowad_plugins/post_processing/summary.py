"""Console text of a threshold report: rates, raw thresholds, counts, F1-optimal thresholds alongside."""

from __future__ import annotations

from typing import Any


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
        if entry["source"] == "f1":
            line = f"  {level}: F1-optimal raw threshold {entry['raw_threshold']:.6g} (no {level}_fpr given)"
        elif entry["source"] == "none":
            line = f"  {level}: no threshold (no normal validation images)"
        else:
            how = "requested" if entry["source"] == "fpr" else "default, validation has no anomalies"
            line = (f"  {level}: false-alarm rate {entry['fpr']:.3%} ({how}) -> raw threshold "
                    f"{entry['raw_threshold']:.6g}")
            if level == "image":
                line += (f" ({ordinal(entry['rank'])} highest of {entry['samples']} normal scores; expected rate "
                         f"{entry['expected_fpr']:.2%} ± {entry['expected_fpr_sd']:.2%})")
            else:
                line += (f" (validation pixel rate {entry['validation_fpr']:.3%} ± "
                         f"{entry['validation_fpr_se']:.3%} across images)")
        if entry["source"] != "f1" and entry["f1_threshold"] is not None:
            line += f"; F1-optimal {entry['f1_threshold']:.6g} (not used)"
        lines.append(line)
    return "\n".join(lines)


def ordinal(number: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, …, ``11th``, ``21st``."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"
