"""Running an exported model on a folder of images, with anomaly-map overlays; unreadable images are skipped.

``predict_folder`` runs an OpenVINO IR (or ONNX file) with anomalib's ``OpenVINOInferencer`` and writes one
``<stem>_overlay.png`` per image. A truncated or empty file is skipped with a warning naming it; the others are
still predicted, and the skipped files are listed at the end (log, and ``FolderPredictions.skipped``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from flowad_plugins.data.predict_folder import read_image_or_reason, skipped_files_text
from flowad_plugins.export.extras import require
from flowad_plugins.export.openvino import openvino_config, static_input_size

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class FolderPredictions(list):
    """``predict_folder``'s records (a list, one dict per predicted image) and the ``skipped`` files.

    ``skipped``: ``[{"path": …, "reason": …}]`` of the images that could not be read, in file-name order.
    """

    def __init__(self, records: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
        super().__init__(records)
        self.skipped = skipped


def anomaly_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB ``H×W×3`` uint8 overlay of a normalised ``anomaly_map`` (``h×w``, 0.5 = threshold) on ``image``.

    ``image`` is ``H×W×3`` in [0, 1] or uint8; the map is resized to ``H×W`` and coloured with the ``jet`` map
    over [0, 1], so red marks scores above the threshold.
    """
    colormaps = require("matplotlib", "anomaly_overlay (jet colours)", extra="bench").colormaps

    rgb = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    height, width = rgb.shape[:2]
    heat = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    heat = torch.nn.functional.interpolate(heat, size=(height, width), mode="bilinear", align_corners=False)
    colours = colormaps["jet"](heat[0, 0].clamp(0, 1).numpy())[..., :3]
    blended = (1 - alpha) * rgb + alpha * colours
    return (blended.clip(0, 1) * 255).round().astype(np.uint8)


def predict_folder(
    model_path: str | Path,
    image_dir: str | Path,
    output_dir: str | Path | None = None,
    precision: str = "f32",
    device: str = "CPU",
) -> FolderPredictions:
    """Run an exported model (``.xml`` IR or ``.onnx``) on every image of ``image_dir`` with ``OpenVINOInferencer``.

    Images are read as RGB in [0, 1] and, when the model has a static input size, resized to it (otherwise the
    in-graph pre-processor resizes). With ``output_dir``, writes ``<stem>_overlay.png`` (``anomaly_overlay``) per
    image. Returns one record per image, sorted by file name: ``path``, ``score``, ``label``, ``overlay``; images
    that cannot be read are skipped with a warning and listed in the result's ``skipped``.
    """
    from anomalib.deploy import OpenVINOInferencer
    from PIL import Image

    image_dir = Path(image_dir)
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if image_dir.is_dir() else []
    if not paths:
        msg = f"image_dir={str(image_dir)!r} holds no images with suffixes {list(IMAGE_SUFFIXES)}."
        raise ValueError(msg)
    inferencer = OpenVINOInferencer(path=model_path, device=device, config=openvino_config(precision))
    size = static_input_size(inferencer.model)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    records, skipped = [], []
    for path in paths:
        image, reason = read_image_or_reason(path)  # 3×H×W in [0, 1]
        if image is None:
            logger.warning("predict_folder: skipping %s, which cannot be read (%s).", path, reason)
            skipped.append({"path": str(path), "reason": str(reason)})
            continue
        if size is not None and tuple(image.shape[-2:]) != size:
            image = TF.resize(image, list(size), antialias=True)
        prediction = inferencer.predict(image)
        record = {"path": str(path), "score": float(np.asarray(prediction.pred_score).reshape(-1)[0]),
                  "label": bool(np.asarray(prediction.pred_label).reshape(-1)[0]), "overlay": None}
        if output_dir is not None:
            overlay_path = output_dir / f"{path.stem}_overlay.png"
            anomaly_map = np.asarray(prediction.anomaly_map)
            heat = anomaly_map.reshape(-1, *anomaly_map.shape[-2:])[0]
            Image.fromarray(anomaly_overlay(image.permute(1, 2, 0).numpy(), heat)).save(overlay_path)
            record["overlay"] = str(overlay_path)
        records.append(record)
    if skipped:
        logger.warning("predict_folder: %s", skipped_files_text(skipped, len(paths)))
    return FolderPredictions(records, skipped)
