"""Image thresholds of an exported model: the one in its graph (``pred_score > 0.5``: the post-processor normalises
the training threshold to 0.5), or an explicit one on the normalised score. The ``flowad_thresholds`` report that
``write_threshold_metadata`` may stamp into the IR describes how the in-graph one was set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from flowad_plugins.edge.settings import METADATA_KEY

__all__ = ["METADATA_KEY", "Threshold", "choose_threshold", "read_metadata"]


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
    if source in ("fpr", "fpr_default", "fpr_gaussian"):
        how = "requested" if source == "fpr" else "default"
        rate = entry.get("fpr")
        samples = entry.get("samples")
        return (f"in-graph image threshold: false-alarm rate {rate:.3%} ({how}) on {samples} normal validation "
                f"images{raw_text}")
    return f"in-graph image threshold (source {source!r}{raw_text})"


def choose_threshold(metadata: dict[str, Any] | None, value: float | None = None) -> Threshold:
    """The image threshold to apply: ``value`` (on the normalised score, in (0, 1)) if given, else the model's own
    (0.5), described from ``metadata`` (``read_metadata``'s result or ``None``)."""
    if value is not None:
        if not (isinstance(value, int | float) and 0.0 < float(value) < 1.0):
            msg = f"threshold must be a normalised score in (0, 1) (0.5 = the model's threshold); got {value!r}."
            raise ValueError(msg)
        return Threshold(float(value), "command line", f"normalised score threshold {float(value):g} given explicitly")
    return Threshold(0.5, "model", _describe(((metadata or {}).get("report") or {}).get("image")))
