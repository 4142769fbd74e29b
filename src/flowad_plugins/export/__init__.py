"""Edge export of the flow models: ONNX / OpenVINO IR, FP16 or INT8 flow-head weights.

The exported graph is anomalib's: ``PreProcessor`` (resize + ImageNet normalisation) → torch model →
``PostProcessor`` (normalisation + thresholds), with one input ``input B×3×H×W`` (RGB in [0, 1], dynamic batch)
and four outputs: ``pred_score`` ``B`` (normalised, 0.5 = image threshold), ``pred_label`` ``B`` (bool),
``anomaly_map`` ``B×1×h×w`` (normalised, at the pre-processor's size) and ``pred_mask`` ``B×1×h×w`` (bool).

What this package adds to anomalib's ``Engine.export`` / ``to_openvino``: ``options`` (``export_model``, the options
checked up front with clear errors), ``quantization`` (``CompressionType.INT8``: the flow head's weights in INT8,
the backbone float; anomalib's ``INT8_PTQ`` / ``INT8_ACQ`` are refused: no measured variant kept AUROC within 0.005
of torch, ``benchmarks/results/int8_ptq_variants.md``), ``onnx_graph`` (where the backbone ends in the graph) and
``precision`` (float32 marks for the backbone and score tail). The OpenVINO settings shared with the torch-free
runtime (``flowad_plugins.edge``) live in ``flowad_plugins.edge.settings``.
"""

from __future__ import annotations

from flowad_plugins.edge.settings import openvino_config, static_input_size

from .options import check_to_openvino_arguments, export_model
from .quantization import compress_flow_weights

__all__ = ["check_to_openvino_arguments", "compress_flow_weights", "export_model", "openvino_config",
           "static_input_size"]
