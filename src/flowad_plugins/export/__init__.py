"""Edge export of the flow models: ONNX / OpenVINO IR, FP16 or INT8 flow-head weights.

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

- ``quantization``: ``compress_flow_weights``, ``CompressionType.INT8``: the flow head's weights in INT8, the
  backbone float. nncf is optional: ``pip install 'flowad-plugins[int8]'``. anomalib's ``INT8_PTQ`` / ``INT8_ACQ``
  (backbone activations in INT8) are refused: no measured variant kept AUROC within 0.005 of torch
  (``benchmarks/results/int8_ptq_variants.md``).
- ``onnx_graph``: where the backbone ends in the exported graph, and the nncf scope keeping its weights float.
- ``options``: ``export_model``, ``Engine.export``'s options checked up front with clear errors (compression with
  ONNX, compression types not offered).
- ``openvino_config`` / ``static_input_size`` / ``PRECISIONS``: re-exported from ``flowad_plugins.edge.settings``,
  the one module of OpenVINO settings that export and the torch-free edge runtime share (``precision="f32"`` asks
  the CPU plugin for float32, which FP32 parity needs; its default is bf16 where the CPU supports it).

Running an exported IR on a folder of images (scores, overlays, unreadable files skipped) is the torch-free
``flowad-predict`` / ``flowad_plugins.edge``.
"""

from __future__ import annotations

from flowad_plugins.edge.settings import PRECISIONS, openvino_config, static_input_size

from .onnx_graph import backbone_conv_count, float_tail_names, float_weights_scope
from .options import (
    SUPPORTED_COMPRESSIONS,
    check_compression,
    check_compression_dependencies,
    check_to_openvino_arguments,
    export_model,
)
from .quantization import compress_flow_weights

__all__ = [
    "PRECISIONS",
    "SUPPORTED_COMPRESSIONS",
    "backbone_conv_count",
    "check_compression",
    "check_compression_dependencies",
    "check_to_openvino_arguments",
    "compress_flow_weights",
    "export_model",
    "float_tail_names",
    "float_weights_scope",
    "openvino_config",
    "static_input_size",
]
