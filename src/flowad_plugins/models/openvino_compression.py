"""OpenVINO compression of the flow models: the one place that overrides private anomalib hooks.

anomalib 2.7 offers no public hook for the compression step of ``to_openvino`` (``Engine.export(...,
compression_type=...)``): ``ExportMixin.to_openvino`` calls ``_compress_ov_model``, which calls the static
``_post_training_quantization_ov`` for ``INT8_PTQ`` and ``_accuracy_control_quantization_ov`` for ``INT8_ACQ``.
Overriding the public ``to_openvino`` instead would mean re-implementing anomalib's ONNX → IR pipeline. So this
mixin overrides exactly these three private methods,
keeping their signatures; check them when upgrading anomalib (``tests/test_contract.py`` exports every
compression type).

- ``FP16``: anomalib's (weights stored in float16).
- ``INT8``: weights of the flow heads only (``export.compress_flow_weights``), the backbone stays float.
- ``INT8_PTQ``: backbone activations quantized, calibrated on *normal* training images only
  (``export.quantize_backbone_on_normal_images``); its measured effect on accuracy is in
  ``benchmarks/results/export_parity.md``.
- ``INT8_ACQ``: the same backbone INT8, with nncf's accuracy control on the *validation* split
  (``export.quantize_with_accuracy_control``; anomalib's validates on the test split).

Every IR written by ``to_openvino`` (any compression) then gets its backbone and score tail marked float32
(``export.precision.keep_precision_critical_in_float32``), so it is accurate when compiled with no configuration
on CPUs whose default precision is bf16, while the flow head runs in the CPU's fast precision.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class FlowOpenVINOCompression:
    """Mixin for an ``AnomalibModule``: flow-aware ``INT8`` and ``INT8_PTQ`` compression (module docstring)."""

    def to_onnx(self, *args: Any, **kwargs: Any) -> Any:
        """anomalib's ONNX export; the file's path is kept so that the compression step of ``to_openvino``, which
        converts this very file, reads its node names from it instead of exporting the model a second time."""
        path = super().to_onnx(*args, **kwargs)
        self._converted_onnx = path
        if getattr(self, "_exporting_openvino", False):  # the head's node names, while the ONNX file exists
            from flowad_plugins.export.onnx_graph import flow_head_names

            self._flow_head_names = flow_head_names(self, path, kwargs.get("input_size", args[2] if len(args) > 2
                                                                             else None))
        return path

    def to_openvino(self, *args: Any, **kwargs: Any) -> Any:
        """anomalib's export (after refusing ``INT8_PTQ`` without ``datamodule`` before any export work), then the
        backbone and score tail marked float32 in the written IR (see the module docstring)."""
        from flowad_plugins.export import check_to_openvino_arguments
        from flowad_plugins.export.precision import keep_precision_critical_in_float32

        check_to_openvino_arguments(*args, **kwargs)
        self._exporting_openvino, self._flow_head_names = True, None
        try:
            path = super().to_openvino(*args, **kwargs)
            head = self._flow_head_names
        finally:
            self._converted_onnx = None  # its temporary folder is gone
            self._exporting_openvino, self._flow_head_names = False, None
        marked = keep_precision_critical_in_float32(path, head)
        logger.info("%s: %d nodes of the exported graph (backbone and score tail) kept in float32.",
                    type(self).__name__, marked)
        return path

    def _compress_ov_model(self, model: Any, compression_type: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``CompressionType.INT8``: flow-head weights only; other types: anomalib's (``INT8_PTQ`` lands below)."""
        from anomalib.deploy import CompressionType

        if compression_type == CompressionType.INT8:
            from flowad_plugins.export import compress_flow_weights

            return compress_flow_weights(self, model, getattr(self, "_converted_onnx", None))
        return super()._compress_ov_model(model, compression_type, *args, **kwargs)

    def _post_training_quantization_ov(self, model: Any, datamodule: Any = None) -> Any:
        """OpenVINO INT8_PTQ of the backbone, calibrated on normal training images only."""
        from flowad_plugins.export import quantize_backbone_on_normal_images

        logger.warning(
            "%s: INT8_PTQ (backbone activations in INT8) can lower image/pixel AUROC noticeably more than "
            "compression_type=INT8 (flow-head weights) or FP16 (measured: benchmarks/results/export_parity.md). "
            "Check the quantized model on your own validation images before deploying it.",
            type(self).__name__,
        )
        return quantize_backbone_on_normal_images(self, model, datamodule, getattr(self, "_converted_onnx", None))

    def _accuracy_control_quantization_ov(self, model: Any, datamodule: Any = None, metric: Any = None,
                                          task: Any = None, max_drop: float = 0.01) -> Any:
        """OpenVINO INT8_ACQ of the backbone: calibrated on normal training images, checked on validation."""
        del task  # the metric's fields decide what is compared
        from flowad_plugins.export import quantize_with_accuracy_control

        return quantize_with_accuracy_control(self, model, datamodule, metric, max_drop,
                                              getattr(self, "_converted_onnx", None))
