"""INT8 for the flow models (``CompressionType.INT8``): weight compression of the flow head, the backbone float.

nncf is an optional dependency (``pip install 'flowad-plugins[int8]'``), imported on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

from flowad_plugins.edge.settings import static_input_size

from .extras import require
from .onnx_graph import backbone_layer_count, float_weights_scope

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.models import AnomalibModule


@contextmanager
def onnx_export_of(module: AnomalibModule, size: tuple[int, int] | None, onnx_path: str | Path | None = None
                   ) -> Iterator[Path]:
    """``onnx_path`` when that file exists (the ONNX file ``to_openvino`` just converted), else a fresh export of
    ``module`` at ``size`` into a temporary folder: where the nncf scope finds the names of the graph's nodes."""
    if onnx_path is not None and Path(onnx_path).is_file():
        yield Path(onnx_path)
        return
    with TemporaryDirectory() as folder:
        yield Path(module.to_onnx(folder, "model", size))


def compress_flow_weights(module: AnomalibModule, ov_model: ov.Model, onnx_path: str | Path | None = None
                          ) -> ov.Model:
    """INT8 weight compression (nncf, per channel) of the flow head; the backbone's (and tiny) weights stay float.

    The exact likelihood amplifies small weight errors of the backbone: for FastFlow (lite0, bottle) compressing
    every weight lowered the mean validation AUROC from 0.968 to 0.947, the flow head only kept 0.968
    (``benchmarks/results/int8_weights_selection.md``). ``onnx_path``: the ONNX file ``ov_model`` came from, if at hand.
    """
    nncf = require("nncf", "compression_type=INT8 (weight compression)")
    size = static_input_size(ov_model)
    with onnx_export_of(module, size, onnx_path) as onnx_file:
        scope = float_weights_scope(ov_model, onnx_file, backbone_layer_count(module, size))
    return nncf.compress_weights(ov_model, ignored_scope=scope)
