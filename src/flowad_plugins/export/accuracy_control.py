"""``INT8_ACQ`` for the flow models: accuracy-controlled INT8 of the backbone, checked on the validation split.

anomalib's ``INT8_ACQ`` calibrates on ``val_dataloader()`` and measures the accuracy drop on ``test_dataloader()``
(model selection on test data), feeds the loader's images at their own size (a fixed-size export refuses them) and
lets nncf quantize the likelihood tail, whose range on normal calibration images excludes exactly the values that
make an anomaly. Here, as for ``INT8_PTQ``:

- calibration: the datamodule's *normal training* images, resized to the IR's input size;
- validation (what nncf compares float vs INT8 on, reverting the most harmful quantizers until the drop is at most
  ``max_drop``): the datamodule's *validation* split, which must hold normal and anomalous images (e.g.
  ``Folder(val_split_mode="synthetic")``), never its test split;
- scope: the backbone only; the flow head, scorer and post-processor stay float.

The metric defaults to image AUROC of ``pred_score`` (a threshold-free ranking; anomalib's default F1 of labels
moves in steps on a small validation split).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib.data import ImageBatch
from anomalib.deploy import CompressionType

from flowad_plugins.edge.settings import static_input_size

from .extras import require
from .onnx_graph import backbone_conv_count, backbone_only_scope
from .options import check_calibration_data
from .quantization import ir_input, normal_calibration_loader, onnx_export_of

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from anomalib.metrics import AnomalibMetric
    from anomalib.models import AnomalibModule

logger = logging.getLogger("flowad_plugins.export")


def validation_metric(metric: AnomalibMetric | str | None) -> AnomalibMetric:
    """An anomalib metric instance: ``None`` → image AUROC of ``pred_score``; a name → that metric of anomalib's."""
    import anomalib.metrics as metrics

    if metric is None:
        return metrics.AUROC(fields=["pred_score", "gt_label"])
    if not isinstance(metric, str):
        return metric
    metric_class = getattr(metrics, metric, None)
    if metric_class is None:
        msg = f"metric={metric!r} is not an anomalib metric; e.g. 'AUROC', 'AUPR' or 'F1Score'."
        raise ValueError(msg)
    fields = ["pred_label", "gt_label"] if "F1" in metric else ["pred_score", "gt_label"]
    return metric_class(fields=fields)


def _validation_loader(datamodule: AnomalibDataModule) -> Any:
    """The validation split's loader, after checking that it holds both normal and anomalous images."""
    datamodule.setup("fit")
    dataset = getattr(datamodule, "val_data", None)
    labels = set(dataset.samples["label_index"].tolist()) if dataset is not None and len(dataset) else set()
    if labels != {0, 1}:
        msg = (
            f"compression_type='int8_acq' needs a validation split with normal and anomalous images, but "
            f"{type(datamodule).__name__}'s holds labels {sorted(labels)}; give it synthetic anomalies (e.g. "
            "Folder(val_split_mode='synthetic')), or use 'int8_ptq' (no accuracy check)."
        )
        raise ValueError(msg)
    return datamodule.val_dataloader()


def quantize_with_accuracy_control(
    module: AnomalibModule,
    ov_model: ov.Model,
    datamodule: AnomalibDataModule | None,
    metric: AnomalibMetric | str | None = None,
    max_drop: float = 0.01,
    onnx_path: str | Path | None = None,
) -> ov.Model:
    """INT8 of the backbone, calibrated on normal training images, at most ``max_drop`` worse on validation.

    ``onnx_path``: the ONNX file ``ov_model`` was converted from, if still at hand (see ``onnx_export_of``).
    """
    check_calibration_data(CompressionType.INT8_ACQ, datamodule)
    if not 0 <= max_drop <= 1:
        msg = f"max_drop must be between 0 and 1, got {max_drop}."
        raise ValueError(msg)
    nncf = require("nncf", "compression_type=INT8_ACQ")
    validation = _validation_loader(datamodule)
    size = static_input_size(ov_model)
    scorer = validation_metric(metric)
    model_input = ov_model.input(0)
    batch_size = model_input.shape[0] if model_input.partial_shape[0].is_static else 1
    calibration = normal_calibration_loader(datamodule, batch_size=batch_size)
    with onnx_export_of(module, size, onnx_path) as onnx_file:
        scope = backbone_only_scope(ov_model, onnx_file, backbone_conv_count(module, size))

    def validate(compiled: Any, batches: Iterable[Any]) -> float:
        scorer.reset()
        for batch in batches:
            outputs = compiled(ir_input(batch.image, size))
            scorer.update(ImageBatch(
                image=batch.image,
                gt_label=batch.gt_label,
                pred_score=torch.from_numpy(np.asarray(outputs["pred_score"])).reshape(-1),
                pred_label=torch.from_numpy(np.asarray(outputs["pred_label"])).reshape(-1),
            ))
        return float(scorer.compute())

    logger.info("INT8_ACQ: calibrating on %d normal training images, validating on %d images (max_drop=%s).",
                len(calibration.dataset), len(validation.dataset), max_drop)
    return nncf.quantize_with_accuracy_control(
        ov_model,
        nncf.Dataset(calibration, lambda batch: ir_input(batch.image, size)),
        nncf.Dataset(validation),
        validate,
        max_drop=max_drop,
        subset_size=len(calibration),
        ignored_scope=scope,
    )
