"""The export task of one benchmark model: files per format, for the whole model and for its backbone alone.

Whole model: torch state dict, ONNX through anomalib's ``to_onnx``, OpenVINO IR through the model's own
``to_openvino`` (FP32; FP16 = ``compression_type=FP16``; INT8 = ``compression_type=INT8_PTQ`` for anomalib's models,
``INT8`` (flow-head weights) for ours, which do not offer backbone PTQ), so each model's IR is the one its users get
(ours: with the float32 marks of ``flowad_plugins.export.precision``) and its own calibration applies. Backbone
alone (``harness.models.backbone_of``: pre-processing and the frozen backbone up to the model's layers): ONNX (torch's
exporter), IR from it, INT8 = ``nncf.quantize`` on the same calibration images. Multiply-adds per image
(``torch.utils.flop_counter``, batch 1) for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def folder_bytes(path: Path) -> int:
    """Bytes of every file in ``path`` (ONNX external data and OpenVINO .bin included)."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def multiply_adds_per_image(module: Any, image_size: int) -> int:
    """Multiply-adds of one B=1 forward of ``module`` on a 1×3×H×W image (FLOPs ÷ 2, convolutions and products)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.rand(1, 3, image_size, image_size)
    with torch.inference_mode():
        module(images)  # one call first: one-time work (e.g. CflowAD's cached condition projection) is not counted
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:  # not inference_mode: the counter's module tracker needs autograd views
        module(images)
    return counter.get_total_flops() // 2


def calibration_datamodule(task: dict[str, Any]) -> Any:
    """Images for INT8 calibration: the dataset's validation split, else generated normal images."""
    if task.get("data_root"):
        from anomalib.data import MVTecAD
        from torchvision.transforms.v2 import Resize

        size = (task["image_size"], task["image_size"])  # the IR has a static H×W
        return MVTecAD(root=task["data_root"], category=task["category"], train_batch_size=8, eval_batch_size=8,
                       num_workers=0, val_split_mode="synthetic", val_split_ratio=0.2, seed=0,
                       augmentations=Resize(size, antialias=True))
    from flowad_plugins.data import SyntheticAD

    datamodule = SyntheticAD(root=Path(task["work_dir"]) / "calibration", category="surface",
                             image_size=task["image_size"], num_train=40, num_test_good=2, num_test_per_defect=1,
                             train_batch_size=8, eval_batch_size=8)
    datamodule.prepare_data()  # writes the generated images
    return datamodule


def calibration_images(task: dict[str, Any], count: int = 40) -> list[Any]:
    """Up to ``count`` normal training images as 1×3×H×W float32 arrays in [0, 1] (backbone INT8 calibration)."""
    datamodule = calibration_datamodule(task)
    datamodule.setup("fit")
    images = []
    for batch in datamodule.train_dataloader():
        images += [image[None].numpy() for image in batch.image]
        if len(images) >= count:
            break
    return images[:count]


class Attempts:
    """Runs each export, recording its file, size, seconds, or error string by format."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {"files": {}, "bytes": {}, "seconds": {}, "errors": {}}

    def __call__(self, file_format: str, export: Callable[[], Path]) -> None:
        start = time.perf_counter()
        try:
            path = Path(export())
            self.record["files"][file_format] = str(path)
            self.record["bytes"][file_format] = folder_bytes(path.parent) if path.suffix != ".pt" \
                else path.stat().st_size
            self.record["seconds"][file_format] = round(time.perf_counter() - start, 2)
        except Exception as error:
            self.record["errors"][file_format] = f"{type(error).__name__}: {str(error).strip()[:600]}"


def export_whole_model(model: Any, task: dict[str, Any], out_dir: Path, formats: list[str]) -> dict[str, Any]:
    """Every format of ``formats`` (torch, onnx, openvino-fp32/-fp16/-int8) of the whole Lightning model."""
    import torch

    size = task["image_size"]
    attempt = Attempts()
    if "torch" in formats:
        def save_state_dict() -> Path:
            path = out_dir / "torch" / "model.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
            return path

        attempt("torch", save_state_dict)
    if any(file_format != "torch" for file_format in formats):
        attempt("onnx", lambda: model.to_onnx(out_dir / "onnx", input_size=(size, size)))
    def own_export(file_format: str) -> Path:
        from anomalib.deploy import CompressionType

        if file_format == "openvino-int8":
            return model.to_openvino(out_dir / file_format, input_size=(size, size), compression_type=_int8_of(model),
                                     datamodule=calibration_datamodule(task))
        compression = CompressionType.FP16 if file_format == "openvino-fp16" else None
        return model.to_openvino(out_dir / file_format, input_size=(size, size), compression_type=compression)

    _openvino_formats(attempt, formats, own_export)
    return attempt.record


def export_backbone(backbone: Any, task: dict[str, Any], out_dir: Path, formats: list[str]) -> dict[str, Any]:
    """The backbone-alone module in the same formats (ONNX by torch's exporter; INT8 by ``nncf.quantize``)."""
    import torch

    size = task["image_size"]
    attempt = Attempts()

    def export_onnx() -> Path:
        path = out_dir / "onnx" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(backbone, (torch.rand(1, 3, size, size),), str(path), input_names=["input"], dynamo=True)
        return path

    def export_int8() -> Path:
        import nncf
        import openvino as ov

        images = calibration_images(task)
        quantized = nncf.quantize(ov.convert_model(attempt.record["files"]["onnx"]), nncf.Dataset(images),
                                  subset_size=len(images))
        path = out_dir / "openvino-int8" / "model.xml"
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(quantized, path)
        return path

    if any(file_format not in ("torch",) for file_format in formats):
        attempt("onnx", export_onnx)
    def convert(file_format: str) -> Path:
        import openvino as ov

        if file_format == "openvino-int8":
            return export_int8()
        path = out_dir / file_format / "model.xml"
        path.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov.convert_model(attempt.record["files"]["onnx"]), path,
                      compress_to_fp16=file_format == "openvino-fp16")
        return path

    _openvino_formats(attempt, [f for f in formats if f != "torch"], convert)
    return attempt.record


def _int8_of(model: Any) -> Any:
    """The INT8 a model offers: ``INT8`` (flow-head weights) for ours, ``INT8_PTQ`` for anomalib's."""
    from anomalib.deploy import CompressionType

    from flowad_plugins.models.openvino_compression import FlowOpenVINOCompression

    return CompressionType.INT8 if isinstance(model, FlowOpenVINOCompression) else CompressionType.INT8_PTQ


def _openvino_formats(attempt: Attempts, formats: list[str], convert: Callable[[str], Path]) -> None:
    """Every OpenVINO format of ``formats`` written by ``convert(format)``, once the ONNX export succeeded."""
    for file_format in [f for f in formats if f.startswith("openvino")]:
        if attempt.record["files"].get("onnx") is None:
            reason = attempt.record["errors"].get("onnx", "not exported")
            attempt.record["errors"][file_format] = f"no ONNX model to convert ({reason})"
            continue
        attempt(file_format, lambda file_format=file_format: convert(file_format))


def run_export(task: dict[str, Any]) -> dict[str, Any]:
    """Export one model at one input size to every format in ``task["formats"]``, per part (model, backbone)."""
    import torch

    from harness.models import backbone_of, build_benchmark_model, parameter_count

    torch.set_num_threads(task["threads"])
    size = task["image_size"]
    out_dir = Path(task["out_dir"])
    model = build_benchmark_model(task["model"], size).eval()
    result: dict[str, Any] = {"parameters": parameter_count(model), "parts": {}}
    for part in task.get("parts", ["model"]):
        module = model.model if part == "model" else backbone_of(model)
        export = export_whole_model if part == "model" else export_backbone
        record = export(model if part == "model" else module, task, out_dir / part, task["formats"])
        try:
            record["multiply_adds_per_image"] = multiply_adds_per_image(
                module if part == "backbone" else model.model, size)
        except Exception as error:
            record["errors"]["multiply_adds"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
        if "onnx" not in task["formats"]:
            record["files"].pop("onnx", None)
        result["parts"][part] = record
    return result
