"""OpenVINO compression of the flow models: the one place that overrides private anomalib hooks.

anomalib 2.7 has no public hook for the compression step of ``to_openvino``, which calls ``_compress_ov_model``;
this mixin overrides that private method with its signature (check it when upgrading anomalib;
``tests/test_contract_cli.py`` exports every compression type). ``FP16``: anomalib's. ``INT8``: the flow head's
weights only (``export.compress_flow_weights``). ``INT8_PTQ`` / ``INT8_ACQ``: refused before any export work. Every
IR then gets its backbone and score tail marked float32 (``export.precision``), so it is accurate at the default
precision of bf16 CPUs while the flow head runs in the CPU's fast precision.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class FlowOpenVINOCompression:
    """Mixin for an ``AnomalibModule``: flow-aware ``INT8`` compression (module docstring)."""

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
        """anomalib's export (after refusing compression types not offered, before any export work), then the
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
        """``CompressionType.INT8``: flow-head weights only; ``FP16``: anomalib's."""
        from anomalib.deploy import CompressionType

        if compression_type == CompressionType.INT8:
            from flowad_plugins.export import compress_flow_weights

            return compress_flow_weights(self, model, getattr(self, "_converted_onnx", None))
        return super()._compress_ov_model(model, compression_type, *args, **kwargs)
