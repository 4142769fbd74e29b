"""Threshold metadata in exported files: the rates and counts behind the thresholds, as JSON.

ONNX: ``metadata_props[METADATA_KEY]``; OpenVINO IR: ``model.get_rt_info(METADATA_KEY)``. The thresholds themselves
are already constants of the exported graph; this records where they came from.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flowad_plugins.edge.settings import METADATA_KEY

if TYPE_CHECKING:
    from .processor import FlowPostProcessor


def write_threshold_metadata(export_path: str | Path, post_processor: FlowPostProcessor) -> Path:
    """Stamp ``post_processor.threshold_metadata()`` (JSON) into an exported ``.onnx`` or OpenVINO ``.xml`` file."""
    path = _export_file(export_path)
    payload = json.dumps(post_processor.threshold_metadata())
    if path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        kept = [prop for prop in model.metadata_props if prop.key != METADATA_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        model.metadata_props.add(key=METADATA_KEY, value=payload)
        onnx.save(model, str(path))
    else:
        import openvino as ov

        from flowad_plugins.export.precision import mark_precise, marked_layer_names

        float32_layers = marked_layer_names(path)  # a re-save would weaken these marks: they are written again
        model = ov.Core().read_model(str(path))
        model.set_rt_info(payload, [METADATA_KEY])
        with tempfile.TemporaryDirectory() as folder:
            staged = Path(folder) / path.name
            ov.save_model(model, str(staged), compress_to_fp16=False)  # weights stay as exported
            del model
            shutil.move(staged, path)
            shutil.move(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        mark_precise(path, lambda name, _: name in float32_layers)
    return path


def read_threshold_metadata(export_path: str | Path) -> dict[str, Any]:
    """The metadata written by ``write_threshold_metadata`` (``.onnx`` or OpenVINO ``.xml``)."""
    path = _export_file(export_path)
    if path.suffix == ".onnx":
        import onnx

        values = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
        payload = values.get(METADATA_KEY)
    else:
        import openvino as ov

        model = ov.Core().read_model(str(path))
        payload = model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
    if payload is None:
        msg = f"{path} has no {METADATA_KEY!r} metadata; call write_threshold_metadata after export."
        raise KeyError(msg)
    return json.loads(payload)


def _export_file(export_path: str | Path) -> Path:
    """``export_path`` as a ``Path``; ``ValueError`` unless it is an ``.onnx`` or OpenVINO ``.xml`` file name."""
    path = Path(export_path)
    if path.suffix not in (".onnx", ".xml"):
        msg = f"export_path must end in .onnx or .xml (OpenVINO IR); got {path.name!r}."
        raise ValueError(msg)
    return path


def finite_or_none(value: torch.Tensor) -> float | None:
    """``float(value)``, or ``None`` for NaN/±inf (JSON has no NaN)."""
    number = float(value)
    return number if math.isfinite(number) else None
