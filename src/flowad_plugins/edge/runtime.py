"""Run an exported flow model (OpenVINO IR or ONNX) with openvino and numpy only: no torch, no anomalib.

The IR holds anomalib's whole inference pipeline (see ``flowad_plugins.export``): one input ``B×3×H×W`` (RGB in
[0, 1]), outputs ``pred_score``, ``pred_label``, ``anomaly_map`` and ``pred_mask``. ``EdgeModel`` feeds it and reads
these back; a frame whose score or map is not finite is reported anomalous, with a reason, whatever the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowad_plugins.edge.settings import (
    AUTO_PRECISION,
    PRECISE_ATTRIBUTE,
    PRECISIONS,
    openvino_config,
    static_batch_size,
    static_input_size,
)
from flowad_plugins.edge.thresholds import Threshold, choose_threshold, read_metadata

EDGE_PRECISIONS = (AUTO_PRECISION, *PRECISIONS)
FLOAT32_MARK = f'name="{PRECISE_ATTRIBUTE["name"]}"'  # in the IR text of a layer our exports keep float32
OUTPUT_NAMES = ("pred_score", "pred_label", "anomaly_map", "pred_mask")

__all__ = ["EDGE_PRECISIONS", "EdgeModel", "Prediction", "classify", "resolve_precision"]


def resolve_precision(path: Path, precision: str) -> str:
    """``"auto"``: ``"default"`` for an IR whose precision-critical layers are marked float32 (every IR our
    ``to_openvino`` writes: accurate and faster at the CPU's default precision), else ``"f32"`` (an older or
    foreign IR, or ONNX). Other values are returned unchanged."""
    if precision != AUTO_PRECISION:
        return precision
    if path.suffix.lower() == ".xml" and FLOAT32_MARK in path.read_text(encoding="utf-8", errors="ignore"):
        return "default"
    return "f32"


def classify(score: float, anomaly_map: np.ndarray, threshold: float) -> tuple[bool, str]:
    """(anomalous, reason): ``score > threshold``; a non-finite score or map pixel is anomalous, with a reason."""
    if not np.isfinite(score):
        return True, f"score is {score} (not finite): reported anomalous"
    bad_pixels = int(np.count_nonzero(~np.isfinite(anomaly_map)))
    if bad_pixels:
        return True, f"anomaly map has {bad_pixels} non-finite pixels: reported anomalous"
    return bool(score > threshold), ""


@dataclass
class Prediction:
    """One image's result: normalised ``score``, ``label`` (anomalous), ``anomaly_map`` / ``mask`` ``h×w``."""

    score: float
    label: bool
    anomaly_map: np.ndarray
    mask: np.ndarray
    reason: str = ""


class EdgeModel:
    """An exported model compiled with OpenVINO.

    Args:
        path: the IR's ``model.xml`` (``model.bin`` next to it) or an ``.onnx`` file.
        device: OpenVINO device, e.g. ``"CPU"``.
        precision: ``"auto"`` (``resolve_precision``), ``"f32"`` (as the torch model computes), ``"default"`` (the
            plugin's choice: bf16 on CPUs with AMX/AVX512-BF16), or a forced ``"bf16"`` / ``"f16"``.
        threshold: image threshold on the normalised score; default: the model's (``choose_threshold``).
        num_threads: CPU inference threads (``None``: OpenVINO's default).
    """

    def __init__(self, path: str | Path, device: str = "CPU", precision: str = "auto",
                 threshold: Threshold | None = None, num_threads: int | None = None) -> None:
        import openvino as ov

        self.path = Path(path)
        if self.path.suffix.lower() not in (".xml", ".onnx") or not self.path.is_file():
            msg = f"model must be an existing OpenVINO .xml (with its .bin) or .onnx file; got {str(self.path)!r}."
            raise ValueError(msg)
        if precision not in EDGE_PRECISIONS:
            msg = f"precision={precision!r} is not supported; allowed values: {sorted(EDGE_PRECISIONS)}."
            raise ValueError(msg)
        self.precision = resolve_precision(self.path, precision)
        config = openvino_config(self.precision, num_threads)
        core = ov.Core()
        model = core.read_model(str(self.path))
        missing = [name for name in OUTPUT_NAMES if not any(name in out.get_names() for out in model.outputs)]
        if len(model.inputs) != 1 or missing:
            msg = (f"{self.path.name} is not an anomalib export: expected one image input and outputs "
                   f"{list(OUTPUT_NAMES)}; missing {missing}, inputs {len(model.inputs)}.")
            raise ValueError(msg)
        self.metadata = read_metadata(model)
        self.threshold = threshold or choose_threshold(self.metadata)
        self.input_size = static_input_size(model)
        self.static_batch = static_batch_size(model)
        self._compiled = core.compile_model(model, device, config)
        self._request = self._compiled.create_infer_request()

    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> list[Prediction]:
        """Predictions for ``images``: one ``H×W×3`` array, a batch ``B×H×W×3``, or a list of same-size ``H×W×3``.

        Values in [0, 1] (float) or uint8. H×W must equal ``input_size`` when the IR has a static one
        (``images.resize_image``); otherwise the in-graph pre-processor resizes.
        """
        batch = np.stack(list(images)) if isinstance(images, list | tuple) else np.asarray(images)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[-1] != 3:
            msg = f"images must be H×W×3 or B×H×W×3 RGB arrays; got shape {batch.shape}."
            raise ValueError(msg)
        if self.input_size is not None and tuple(batch.shape[1:3]) != self.input_size:
            msg = f"images are {batch.shape[1]}×{batch.shape[2]} but the model takes {self.input_size[0]}×" \
                  f"{self.input_size[1]}; resize them first (flowad_plugins.edge.images.resize_image)."
            raise ValueError(msg)
        scale = 255.0 if batch.dtype == np.uint8 else 1.0
        tensor = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) / scale
        count = len(tensor)
        if self.static_batch is not None and count != self.static_batch:
            return self._predict_in_static_batches(tensor)
        return self._split(self._infer(tensor), count)

    def _predict_in_static_batches(self, tensor: np.ndarray) -> list[Prediction]:
        """Run ``tensor`` ``B×3×H×W`` in chunks of the IR's static batch size, padding the last chunk."""
        size = self.static_batch or 1
        results: list[Prediction] = []
        for start in range(0, len(tensor), size):
            chunk = tensor[start : start + size]
            used = len(chunk)
            if used < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - used, axis=0)])
            results.extend(self._split(self._infer(chunk), used))
        return results

    def _infer(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self._request.infer({0: tensor})
        named: dict[str, np.ndarray] = {}
        for port, value in outputs.items():
            for name in port.get_names():
                named[name] = np.asarray(value)
        return named

    def _split(self, outputs: dict[str, np.ndarray], count: int) -> list[Prediction]:
        """Per-image ``Prediction`` from the four output arrays (first ``count`` rows)."""
        scores = outputs["pred_score"].reshape(-1).astype(np.float64)
        maps = outputs["anomaly_map"].astype(np.float32)
        masks = outputs["pred_mask"].astype(bool)
        maps = maps.reshape(maps.shape[0], *maps.shape[-2:])
        masks = masks.reshape(masks.shape[0], *masks.shape[-2:])
        results = []
        for i in range(count):
            label, reason = classify(float(scores[i]), maps[i], self.threshold.value)
            results.append(Prediction(float(scores[i]), label, maps[i], masks[i], reason))
        return results

    def describe(self) -> dict[str, Any]:
        """Plain data about the model: path, input size, static batch, precision, threshold."""
        return {"model": str(self.path), "input_size": list(self.input_size) if self.input_size else None,
                "static_batch": self.static_batch, "precision": self.precision,
                "threshold": self.threshold.as_dict()}
