"""OpenVINO settings shared by export and the edge runtime: precision hints, thread count, static input size, the
IR attribute and metadata key our exports write, and the image suffixes read. Imports only openvino (lazily).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openvino as ov

# INFERENCE_PRECISION_HINT of OpenVINO's CPU plugin; "default" leaves the plugin's choice (bf16 on CPUs with
# AVX512-BF16/AMX, else f32).
PRECISIONS: dict[str, dict[str, str]] = {
    "f32": {"INFERENCE_PRECISION_HINT": "f32"},
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
    "f16": {"INFERENCE_PRECISION_HINT": "f16"},
    "default": {},
}
# edge runtime only: "default" for an IR carrying PRECISE_ATTRIBUTE marks (our exports), else "f32"
AUTO_PRECISION = "auto"
# ov::DisableFP16Compression as an IR file writes it: our exports give it to layers that must stay float32
PRECISE_ATTRIBUTE = {"name": "precise", "version": "0"}
# rt_info key (OpenVINO) / metadata_props key (ONNX) of the threshold report stamped into an export
METADATA_KEY = "flowad_thresholds"
# file suffixes (lower case) that the edge runtime reads as images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

__all__ = ["AUTO_PRECISION", "IMAGE_SUFFIXES", "METADATA_KEY", "PRECISE_ATTRIBUTE", "PRECISIONS", "check_num_threads",
           "openvino_config", "static_batch_size", "static_input_size"]


def check_num_threads(num_threads: Any) -> int | None:
    """``num_threads`` as an ``int`` (``None`` stays ``None``: OpenVINO's default), or ``ValueError``."""
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, int | float) or int(num_threads) != num_threads \
            or num_threads < 1:
        msg = f"num_threads must be a positive integer or None; got {num_threads!r}."
        raise ValueError(msg)
    return int(num_threads)


def openvino_config(precision: str = "f32", num_threads: int | None = None) -> dict[str, str]:
    """OpenVINO compile config for ``precision`` (a key of ``PRECISIONS``) and an optional CPU thread count."""
    if precision not in PRECISIONS:
        msg = f"precision={precision!r} is not supported; allowed values: {sorted(PRECISIONS)}."
        raise ValueError(msg)
    config = dict(PRECISIONS[precision])
    threads = check_num_threads(num_threads)
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def static_input_size(model: ov.Model | ov.CompiledModel) -> tuple[int, int] | None:
    """``(H, W)`` of an OpenVINO model's image input ``B×3×H×W`` when static, else ``None`` (any size works)."""
    shape = model.input(0).partial_shape
    if shape.rank.is_static and shape[2].is_static and shape[3].is_static:
        return int(shape[2].get_length()), int(shape[3].get_length())
    return None


def static_batch_size(model: ov.Model | ov.CompiledModel) -> int | None:
    """``B`` of an OpenVINO model's image input ``B×3×H×W`` when static, else ``None`` (any batch)."""
    shape = model.input(0).partial_shape
    return int(shape[0].get_length()) if shape.rank.is_static and shape[0].is_static else None
