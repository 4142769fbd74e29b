"""INT8 for the flow models: weight compression of the flow head, and PTQ calibrated on normal training images.

- ``compress_flow_weights`` (``CompressionType.INT8``): the flow head's weights in INT8, the backbone's float
  (compressing the backbone too cost FastFlow 0.02 AUROC).
- ``quantize_backbone_on_normal_images`` (``CompressionType.INT8_PTQ``): the backbone's activations in INT8,
  calibrated on the datamodule's *normal training* images only. anomalib's own calibration uses
  ``val_dataloader()``, which holds anomalies and, with anomalib's default split, is the test set.

nncf is an optional dependency (``pip install 'flowad-plugins[int8]'``), imported on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib.deploy import CompressionType
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2 import functional as TF

from flowad_plugins.edge.settings import static_input_size

from .extras import require
from .onnx_graph import backbone_conv_count, backbone_only_scope, float_weights_scope
from .options import check_calibration_data

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from anomalib.models import AnomalibModule

logger = logging.getLogger("flowad_plugins.export")

DEFAULT_CALIBRATION_SIZE = 300  # nncf's default subset size


def normal_calibration_loader(
    datamodule: AnomalibDataModule,
    batch_size: int = 1,
    max_images: int | None = DEFAULT_CALIBRATION_SIZE,
) -> DataLoader:
    """Unshuffled loader over the datamodule's *normal training* images (labels 0 only, never val/test).

    ``datamodule.setup("fit")`` is called here. ``max_images`` keeps the first images (``None``: all).
    """
    datamodule.setup("fit")
    dataset = getattr(datamodule, "train_data", None)
    if dataset is None:
        msg = (
            f"{type(datamodule).__name__} has no train_data after setup('fit'); INT8_PTQ calibration needs the "
            "datamodule's normal training images."
        )
        raise ValueError(msg)
    labels = dataset.samples["label_index"].to_numpy() if "label_index" in dataset.samples else None
    indices = np.flatnonzero(labels == 0) if labels is not None else np.arange(len(dataset))
    if len(indices) == 0:
        msg = "No normal (label 0) training images in the datamodule: INT8_PTQ calibration needs normal images."
        raise ValueError(msg)
    if max_images is not None:
        indices = indices[:max_images]
    return DataLoader(
        Subset(dataset, indices.tolist()),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=dataset.collate_fn,
        num_workers=0,
    )


@contextmanager
def onnx_export_of(module: AnomalibModule, size: tuple[int, int] | None, onnx_path: str | Path | None = None
                   ) -> Iterator[Path]:
    """``onnx_path`` when that file exists (the ONNX file ``to_openvino`` just converted), else a fresh export of
    ``module`` at ``size`` into a temporary folder: where the nncf scopes find the names of the graph's nodes."""
    if onnx_path is not None and Path(onnx_path).is_file():
        yield Path(onnx_path)
        return
    with TemporaryDirectory() as folder:
        yield Path(module.to_onnx(folder, "model", size))


def ir_input(images: torch.Tensor, size: tuple[int, int] | None) -> np.ndarray:
    """An image batch ``B×3×H×W`` as float32 numpy, resized (bilinear, antialiased) to a static input size."""
    if size is not None and tuple(images.shape[-2:]) != size:
        images = TF.resize(images, list(size), antialias=True)
    return images.float().numpy()


def quantize_on_normal_images(
    ov_model: ov.Model,
    datamodule: AnomalibDataModule | None,
    max_images: int | None = DEFAULT_CALIBRATION_SIZE,
    ignored_scope: Any = None,
    **quantize_kwargs: Any,
) -> ov.Model:
    """INT8 post-training quantization (nncf) of ``ov_model``, calibrated on normal training images only.

    Args:
        ov_model: converted OpenVINO model (input ``B×3×H×W``).
        datamodule: the training datamodule; only its ``train_data`` normal images are used.
        max_images: calibration images (nncf's default subset size, 300).
        ignored_scope: ``nncf.IgnoredScope`` of operations kept in float (e.g. a flow head).
        quantize_kwargs: further ``nncf.quantize`` arguments (``preset``, ``fast_bias_correction``, …).
    """
    if datamodule is None:
        msg = (
            "compression_type=INT8_PTQ needs datamodule= (its normal training images calibrate the quantization); "
            "use FP16 or INT8 (weights only) to export without data."
        )
        raise ValueError(msg)
    nncf = require("nncf", "compression_type=INT8_PTQ")
    model_input = ov_model.input(0)
    batch_size = model_input.shape[0] if model_input.partial_shape[0].is_static else 1
    loader = normal_calibration_loader(datamodule, batch_size=batch_size, max_images=max_images)
    size = static_input_size(ov_model)
    count = len(loader.dataset)
    if count < DEFAULT_CALIBRATION_SIZE:
        logger.info("INT8_PTQ: calibrating on %d normal training images.", count)
    dataset = nncf.Dataset(loader, lambda batch: ir_input(batch.image, size))
    return nncf.quantize(ov_model, dataset, subset_size=len(loader), ignored_scope=ignored_scope, **quantize_kwargs)


def compress_flow_weights(module: AnomalibModule, ov_model: ov.Model, onnx_path: str | Path | None = None
                          ) -> ov.Model:
    """INT8 weight compression (nncf, per channel) of the flow head; the backbone's (and tiny) weights stay float.

    The flows read low-level backbone features whose small weight errors the exact likelihood amplifies: for
    FastFlow (lite0, bottle) compressing every weight lowered the mean image/pixel AUROC on synthetic anomalies made
    from normal training images from 0.968 to 0.947, compressing only the flow head kept 0.968
    (``benchmarks/results/int8_weights_selection.md``). The flow head holds most weights of CS-Flow and FastFlow.
    ``onnx_path``: the ONNX file ``ov_model`` was converted from, if still at hand (see ``onnx_export_of``).
    """
    nncf = require("nncf", "compression_type=INT8 (weight compression)")
    size = static_input_size(ov_model)
    with onnx_export_of(module, size, onnx_path) as onnx_file:
        scope = float_weights_scope(ov_model, onnx_file, backbone_conv_count(module, size))
    return nncf.compress_weights(ov_model, ignored_scope=scope)


def quantize_backbone_on_normal_images(
    module: AnomalibModule,
    ov_model: ov.Model,
    datamodule: AnomalibDataModule | None,
    onnx_path: str | Path | None = None,
    **quantize_kwargs: Any,
) -> ov.Model:
    """INT8 PTQ of the backbone only, calibrated on normal training images; flow head, scorer and post-processor float.

    Calibration on normal images cannot see the activation ranges anomalies produce after the backbone (large
    latents, log-likelihoods, scores): quantizing them clips exactly the values that make an anomaly. The names
    of the tail's ops come from the ONNX graph of ``module`` at ``ov_model``'s input shape (``onnx_export_of``).
    """
    check_calibration_data(CompressionType.INT8_PTQ, datamodule)  # before the ONNX export below
    require("nncf", "compression_type=INT8_PTQ")
    size = static_input_size(ov_model)
    with onnx_export_of(module, size, onnx_path) as onnx_file:
        scope = backbone_only_scope(ov_model, onnx_file, backbone_conv_count(module, size))
    return quantize_on_normal_images(ov_model, datamodule, ignored_scope=scope, **quantize_kwargs)
