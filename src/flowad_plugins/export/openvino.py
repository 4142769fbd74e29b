"""OpenVINO compile settings: inference precision hints, thread count, and an IR's static input size.

OpenVINO's CPU plugin computes in bf16 by default where the CPU supports it (AVX512-BF16/AMX); ``precision="f32"``
asks for float32 (``INFERENCE_PRECISION_HINT``), which FP32 parity needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def openvino_config(precision: str = "f32", num_threads: int | None = None) -> dict[str, str]:
    """OpenVINO compile config for ``precision`` (a key of ``PRECISIONS``) and an optional CPU thread count."""
    if precision not in PRECISIONS:
        msg = f"precision={precision!r} is not supported; allowed values: {sorted(PRECISIONS)}."
        raise ValueError(msg)
    config = dict(PRECISIONS[precision])
    if num_threads is not None:
        if int(num_threads) != num_threads or num_threads < 1:
            msg = f"num_threads must be a positive integer, got {num_threads!r}."
            raise ValueError(msg)
        config["INFERENCE_NUM_THREADS"] = str(int(num_threads))
    return config


def static_input_size(model: ov.Model | ov.CompiledModel) -> tuple[int, int] | None:
    """``(H, W)`` of an OpenVINO model's image input when it is static, else ``None`` (any size is resized)."""
    shape = model.input(0).partial_shape
    if shape.rank.is_static and shape[2].is_static and shape[3].is_static:
        return int(shape[2].get_length()), int(shape[3].get_length())
    return None
