"""Edge export of the flow models: ONNX / OpenVINO IR with honest INT8 calibration.

The exported graph is anomalib's: ``PreProcessor`` (resize + ImageNet normalisation) → torch model →
``PostProcessor`` (normalisation + thresholds), with one input ``input B×3×H×W`` (RGB in [0, 1], dynamic batch)
and four outputs, the same for CflowAD, FastFlow and CSFlow (and anomalib's own models):

=============== ============== =====================================================
output          shape          meaning
=============== ============== =====================================================
``pred_score``  ``B``          normalised image score, 0.5 = image threshold
``pred_label``  ``B``          bool, ``pred_score > 0.5``
``anomaly_map`` ``B×1×h×w``    normalised map at the pre-processor's size (h×w)
``pred_mask``   ``B×1×h×w``    bool, ``anomaly_map > 0.5``
=============== ============== =====================================================

What this package adds to anomalib's ``Engine.export`` / ``to_openvino``, by module:

- ``quantization``: ``quantize_on_normal_images`` / ``quantize_backbone_on_normal_images``, INT8 post-training
  quantization calibrated on the datamodule's *normal training* images only (the flow models route
  ``CompressionType.INT8_PTQ`` here, so ``Engine().export(..., compression_type=INT8_PTQ, datamodule=dm)`` and
  ``anomalib export`` get it unchanged); ``compress_flow_weights``, ``CompressionType.INT8`` for the flow head's
  weights only. nncf is optional: ``pip install 'flowad-plugins[int8]'``.
- ``accuracy_control``: ``quantize_with_accuracy_control`` (``CompressionType.INT8_ACQ``), the same backbone INT8
  with nncf reverting quantizers until the drop on the *validation* split (never test) is at most ``max_drop``.
- ``onnx_graph``: where the backbone ends in the exported graph, and the nncf scopes keeping the rest float.
- ``options``: ``export_model``, ``Engine.export``'s options checked up front with clear errors (compression with
  ONNX, quantization without data).
- ``openvino_config`` / ``static_input_size`` / ``PRECISIONS``: re-exported from ``flowad_plugins.edge.settings``,
  the one module of OpenVINO settings that export and the torch-free edge runtime share (``precision="f32"`` asks
  the CPU plugin for float32, which FP32 parity needs; its default is bf16 where the CPU supports it).

Running an exported IR on a folder of images (scores, overlays, unreadable files skipped) is the torch-free
``flowad-predict`` / ``flowad_plugins.edge``.
"""

from __future__ import annotations

from flowad_plugins.edge.settings import PRECISIONS, openvino_config, static_input_size

from .accuracy_control import quantize_with_accuracy_control, validation_metric
from .onnx_graph import backbone_conv_count, backbone_only_scope, float_tail_names, float_weights_scope
from .options import (
    SUPPORTED_COMPRESSIONS,
    check_calibration_data,
    check_compression,
    check_compression_dependencies,
    check_to_openvino_arguments,
    export_model,
)
from .quantization import (
    DEFAULT_CALIBRATION_SIZE,
    compress_flow_weights,
    normal_calibration_loader,
    quantize_backbone_on_normal_images,
    quantize_on_normal_images,
)

__all__ = [
    "DEFAULT_CALIBRATION_SIZE",
    "PRECISIONS",
    "SUPPORTED_COMPRESSIONS",
    "backbone_conv_count",
    "backbone_only_scope",
    "check_calibration_data",
    "check_compression",
    "check_compression_dependencies",
    "check_to_openvino_arguments",
    "compress_flow_weights",
    "export_model",
    "float_tail_names",
    "float_weights_scope",
    "normal_calibration_loader",
    "openvino_config",
    "quantize_backbone_on_normal_images",
    "quantize_on_normal_images",
    "quantize_with_accuracy_control",
    "static_input_size",
    "validation_metric",
]
