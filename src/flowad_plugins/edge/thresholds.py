"""Image thresholds of an exported model: the one in its graph, or another one its threshold metadata describes.

The exported graph ends in anomalib's post-processor: ``pred_score`` is normalised so that the training
threshold sits at 0.5 and ``pred_label = pred_score > 0.5``. ``write_threshold_metadata`` (flowad_plugins
post-processing) may stamp a JSON report into the IR's ``rt_info`` under ``flowad_thresholds``: the source of the
raw threshold (false-alarm rate or F1-optimal), counts, and the F1-optimal threshold alongside. Switching to
another raw threshold needs the normalisation range (``image_min``/``image_max`` in that JSON); without it only
the in-graph threshold or an explicit normalised value can be used.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from flowad_plugins.edge.settings import METADATA_KEY

THRESHOLD_MODES = ("model", "f1")

__all__ = ["METADATA_KEY", "THRESHOLD_MODES", "Threshold", "choose_threshold", "read_metadata"]


@dataclass(frozen=True)
class Threshold:
    """An image threshold on the normalised score: flag ``score > value``; ``source`` says where it came from."""

    value: float
    source: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


def read_metadata(ov_model: Any) -> dict[str, Any] | None:
    """The ``flowad_thresholds`` JSON of an ``openvino.Model``'s ``rt_info``, or ``None`` when it has none."""
    if not ov_model.has_rt_info([METADATA_KEY]):
        return None
    return json.loads(ov_model.get_rt_info([METADATA_KEY]).astype(str))


def _describe(entry: dict[str, Any] | None) -> str:
    """How the in-graph image threshold was set, from the metadata's ``report.image`` entry."""
    if not entry:
        return "in-graph image threshold (pred_score > 0.5); the IR carries no threshold metadata"
    source = entry.get("source")
    raw = entry.get("raw_threshold")
    raw_text = f", raw {raw:.6g}" if isinstance(raw, int | float) else ""
    if source == "f1":
        return f"in-graph image threshold: F1-optimal on the validation set{raw_text}"
    if source in ("fpr", "fpr_default"):
        how = "requested" if source == "fpr" else "default"
        rate = entry.get("fpr")
        samples = entry.get("samples")
        return (f"in-graph image threshold: false-alarm rate {rate:.3%} ({how}) on {samples} normal validation "
                f"images{raw_text}")
    return f"in-graph image threshold (source {source!r}{raw_text})"


def normalised(raw: float, threshold: float, low: float, high: float) -> float:
    """``raw`` on the post-processor's normalised scale (``threshold`` → 0.5, strictly increasing, in (0, 1))."""
    value_range = high - low if high > low else 1.0
    scaled = 2.0 * (raw - threshold) / value_range
    return 0.5 + 0.5 * scaled / (1.0 + abs(scaled))


def choose_threshold(metadata: dict[str, Any] | None, mode: str = "model", value: float | None = None) -> Threshold:
    """The image threshold to apply: ``value`` (normalised, in (0, 1)) if given, else by ``mode``.

    Args:
        metadata: ``read_metadata``'s result or ``None``.
        mode: ``"model"`` (the in-graph threshold, 0.5) or ``"f1"`` (the F1-optimal threshold the metadata
            reports alongside; needs ``image_min``/``image_max`` in it).
        value: explicit threshold on the normalised score; overrides ``mode``.
    """
    if mode not in THRESHOLD_MODES:
        msg = f"threshold_mode={mode!r} is not supported; allowed values: {list(THRESHOLD_MODES)}."
        raise ValueError(msg)
    if value is not None:
        if not (isinstance(value, int | float) and 0.0 < float(value) < 1.0):
            msg = f"threshold must be a normalised score in (0, 1) (0.5 = the model's threshold); got {value!r}."
            raise ValueError(msg)
        return Threshold(float(value), "command line", f"normalised score threshold {float(value):g} given explicitly")
    image = ((metadata or {}).get("report") or {}).get("image")
    if mode == "model":
        return Threshold(0.5, "model", _describe(image))
    f1 = (image or {}).get("f1_threshold")
    graph_threshold = (metadata or {}).get("image_threshold")
    low, high = (metadata or {}).get("image_min"), (metadata or {}).get("image_max")
    if not all(isinstance(x, int | float) and math.isfinite(x) for x in (f1, graph_threshold, low, high)):
        msg = ("threshold_mode='f1' needs the IR's threshold metadata to hold an F1-optimal threshold (validation "
               "with anomalies), the in-graph raw threshold and image_min/image_max; this IR has "
               f"{'no metadata' if metadata is None else 'incomplete metadata'}. Use threshold_mode='model' or an "
               "explicit threshold.")
        raise ValueError(msg)
    return Threshold(normalised(f1, graph_threshold, low, high), "metadata: f1",
                     f"F1-optimal image threshold from the validation set (raw {f1:.6g})")
