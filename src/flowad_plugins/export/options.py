"""``export_model``: ``Engine.export``'s options checked up front, with errors naming the parameter and allowed values.

Refused before any export work: compression with ONNX (anomalib ignores it), ``INT8`` without nncf, compression
types the flow models do not offer (``INT8_PTQ`` / ``INT8_ACQ`` lose accuracy on them), unknown types and sizes.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib.deploy import CompressionType, ExportType

from flowad_plugins.input_guard import validated_input_size

from .extras import require

if TYPE_CHECKING:
    from anomalib.models import AnomalibModule

SUPPORTED_COMPRESSIONS: tuple[CompressionType | None, ...] = (
    None,
    CompressionType.FP16,
    CompressionType.INT8,
)


def check_compression(compression_type: CompressionType | str | None) -> CompressionType | None:
    """``compression_type`` as a ``CompressionType`` (or ``None``), or a ``ValueError`` naming the allowed values."""
    allowed = [c.value if c is not None else None for c in SUPPORTED_COMPRESSIONS]
    if compression_type is None:
        return None
    try:
        compression = CompressionType(compression_type)
    except ValueError:
        compression = None
    if compression is None or compression not in SUPPORTED_COMPRESSIONS:
        given = compression.value if compression is not None else compression_type
        msg = f"compression_type={given!r} is not supported by the flow models; allowed values: {allowed}."
        raise ValueError(msg)
    return compression


def check_compression_dependencies(compression: CompressionType | None) -> None:
    """``ImportError`` saying how to install nncf when ``compression`` needs it (``INT8``)."""
    if compression == CompressionType.INT8:
        require("nncf", f"compression_type={compression.value!r}")


def check_to_openvino_arguments(*args: Any, **kwargs: Any) -> None:
    """``check_compression`` and ``check_compression_dependencies`` on the arguments of a ``to_openvino(...)`` call
    (anomalib's signature), so that a refused export starts no export work."""
    from anomalib.models.components.base.export_mixin import ExportMixin

    try:
        bound = inspect.signature(ExportMixin.to_openvino).bind(None, *args, **kwargs)
    except TypeError:
        return  # anomalib's own call raises the argument error
    check_compression_dependencies(check_compression(bound.arguments.get("compression_type")))


def export_model(
    model: AnomalibModule,
    export_type: ExportType | str,
    export_root: str | Path,
    input_size: Sequence[int] | None = None,
    compression_type: CompressionType | str | None = None,
    model_file_name: str = "model",
    onnx_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Export a trained flow model to ONNX or OpenVINO IR (``export_root/weights/{onnx,openvino}/``) after checking
    the options, as ``Engine().export(model, export_type, export_root, ...)`` would; returns the file path."""
    allowed_types = [ExportType.ONNX.value, ExportType.OPENVINO.value]
    try:
        export_type = ExportType(export_type)
    except ValueError:
        export_type = None
    if export_type not in {ExportType.ONNX, ExportType.OPENVINO}:
        msg = f"export_type must be one of {allowed_types} for edge export, got {export_type!r}."
        raise ValueError(msg)
    compression = check_compression(compression_type)
    if compression is not None and export_type == ExportType.ONNX:
        msg = (
            f"compression_type={compression.value!r} applies to OpenVINO export only (anomalib ignores it for ONNX); "
            "use export_type='openvino' or compression_type=None."
        )
        raise ValueError(msg)
    check_compression_dependencies(compression)
    if input_size is not None:
        input_size = validated_input_size(input_size)
    model.eval()
    if export_type == ExportType.ONNX:
        return model.to_onnx(export_root, model_file_name, input_size, **(onnx_kwargs or {}))
    return model.to_openvino(
        export_root,
        model_file_name,
        input_size,
        compression_type=compression,
        onnx_kwargs=onnx_kwargs,
    )
