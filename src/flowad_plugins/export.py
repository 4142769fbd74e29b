"""Edge export of the flow models: ONNX / OpenVINO IR with honest INT8 calibration, and running an IR on a folder.

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

What this module adds to anomalib's ``Engine.export`` / ``to_openvino``:

- ``quantize_on_normal_images``: INT8 post-training quantization calibrated on the datamodule's *normal training*
  images only. anomalib's own calibration uses ``val_dataloader()``, which holds anomalies and, with
  anomalib's default split, is the test set. The flow models route ``CompressionType.INT8_PTQ`` here, so
  ``Engine().export(..., compression_type=INT8_PTQ, datamodule=dm)`` and ``anomalib export`` get it unchanged.
- ``compress_flow_weights``: ``CompressionType.INT8`` compresses the flow head's weights and keeps the backbone's
  float (compressing the backbone too cost FastFlow 0.02 AUROC).
- ``export_model``: ``Engine.export``'s options checked up front with clear errors (compression with ONNX,
  accuracy-aware quantization that would validate on the test set, PTQ without data).
- ``openvino_config``: OpenVINO's CPU plugin computes in bf16 by default where the CPU supports it;
  ``precision="f32"`` asks for float32 (``INFERENCE_PRECISION_HINT``), which FP32 parity needs.
- ``predict_folder``: run an IR (or ONNX file) on a folder of images with anomalib's ``OpenVINOInferencer`` and
  write anomaly-map overlays as PNG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib.deploy import CompressionType, ExportType
from torch.utils.data import DataLoader, Subset
from torchvision.transforms.v2 import functional as TF

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.data import AnomalibDataModule
    from anomalib.models import AnomalibModule

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "PRECISIONS",
    "SUPPORTED_COMPRESSIONS",
    "anomaly_overlay",
    "compress_flow_weights",
    "export_model",
    "normal_calibration_loader",
    "openvino_config",
    "predict_folder",
    "quantize_on_normal_images",
    "static_input_size",
]

# INFERENCE_PRECISION_HINT of OpenVINO's CPU plugin; "default" leaves the plugin's choice (bf16 on CPUs with
# AVX512-BF16/AMX, else f32).
PRECISIONS: dict[str, dict[str, str]] = {
    "f32": {"INFERENCE_PRECISION_HINT": "f32"},
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
    "f16": {"INFERENCE_PRECISION_HINT": "f16"},
    "default": {},
}
SUPPORTED_COMPRESSIONS: tuple[CompressionType | None, ...] = (
    None,
    CompressionType.FP16,
    CompressionType.INT8,
    CompressionType.INT8_PTQ,
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_CALIBRATION_SIZE = 300  # nncf's default subset size


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


def _compression(compression_type: CompressionType | str | None) -> CompressionType | None:
    """``compression_type`` as a ``CompressionType`` (or ``None``), or a ``ValueError`` naming the allowed values."""
    allowed = [c.value if c is not None else None for c in SUPPORTED_COMPRESSIONS]
    if compression_type is None:
        return None
    try:
        compression = CompressionType(compression_type)
    except ValueError:
        compression = None
    if compression is None or compression not in SUPPORTED_COMPRESSIONS:
        reason = (
            " anomalib's INT8_ACQ validates the quantized model on the datamodule's test set (model selection on "
            "test data); use INT8_PTQ, which calibrates on normal training images."
            if compression == CompressionType.INT8_ACQ
            else ""
        )
        msg = f"compression_type={compression_type!r} is not supported; allowed values: {allowed}.{reason}"
        raise ValueError(msg)
    return compression


def static_input_size(model: ov.Model | ov.CompiledModel) -> tuple[int, int] | None:
    """``(H, W)`` of an OpenVINO model's image input when it is static, else ``None`` (any size is resized)."""
    shape = model.input(0).partial_shape
    if shape.rank.is_static and shape[2].is_static and shape[3].is_static:
        return int(shape[2].get_length()), int(shape[3].get_length())
    return None


def normal_calibration_loader(
    datamodule: AnomalibDataModule,
    batch_size: int = 1,
    max_images: int | None = DEFAULT_CALIBRATION_SIZE,
) -> DataLoader:
    """Unshuffled loader over the datamodule's *normal training* images (labels 0 only, never val/test).

    ``datamodule.setup("fit")`` is called here. ``max_images`` keeps the first images (``None``: all).
    """
    datamodule.setup("fit")
    dataset = getattr(datamodule, "train_data", None)
    if dataset is None:
        msg = (
            f"{type(datamodule).__name__} has no train_data after setup('fit'); INT8_PTQ calibration needs the "
            "datamodule's normal training images."
        )
        raise ValueError(msg)
    labels = dataset.samples["label_index"].to_numpy() if "label_index" in dataset.samples else None
    indices = np.flatnonzero(labels == 0) if labels is not None else np.arange(len(dataset))
    if len(indices) == 0:
        msg = "No normal (label 0) training images in the datamodule: INT8_PTQ calibration needs normal images."
        raise ValueError(msg)
    if max_images is not None:
        indices = indices[:max_images]
    return DataLoader(
        Subset(dataset, indices.tolist()),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=dataset.collate_fn,
        num_workers=0,
    )


def _calibration_input(images: torch.Tensor, size: tuple[int, int] | None) -> np.ndarray:
    """Calibration batch ``B×3×H×W`` as float32 numpy, resized (bilinear, antialiased) to a static input size."""
    if size is not None and tuple(images.shape[-2:]) != size:
        images = TF.resize(images, list(size), antialias=True)
    return images.float().numpy()


def quantize_on_normal_images(
    ov_model: ov.Model,
    datamodule: AnomalibDataModule | None,
    max_images: int | None = DEFAULT_CALIBRATION_SIZE,
    ignored_scope: Any = None,
    **quantize_kwargs: Any,
) -> ov.Model:
    """INT8 post-training quantization (nncf) of ``ov_model``, calibrated on normal training images only.

    Args:
        ov_model: converted OpenVINO model (input ``B×3×H×W``).
        datamodule: the training datamodule; only its ``train_data`` normal images are used.
        max_images: calibration images (nncf's default subset size, 300).
        ignored_scope: ``nncf.IgnoredScope`` of operations kept in float (e.g. a flow head).
        quantize_kwargs: further ``nncf.quantize`` arguments (``preset``, ``fast_bias_correction``, …).
    """
    import nncf

    if datamodule is None:
        msg = (
            "compression_type=INT8_PTQ needs datamodule= (its normal training images calibrate the quantization); "
            "use FP16 or INT8 (weights only) to export without data."
        )
        raise ValueError(msg)
    model_input = ov_model.input(0)
    batch_size = model_input.shape[0] if model_input.partial_shape[0].is_static else 1
    loader = normal_calibration_loader(datamodule, batch_size=batch_size, max_images=max_images)
    size = static_input_size(ov_model)
    count = len(loader.dataset)
    if count < DEFAULT_CALIBRATION_SIZE:
        logger.info("INT8_PTQ: calibrating on %d normal training images.", count)
    dataset = nncf.Dataset(loader, lambda batch: _calibration_input(batch.image, size))
    return nncf.quantize(ov_model, dataset, subset_size=len(loader), ignored_scope=ignored_scope, **quantize_kwargs)


def backbone_conv_count(module: AnomalibModule, input_size: Sequence[int] | None = None) -> int:
    """Convolutions the backbone (``module.model.encoder``) runs for one image (counted with forward hooks)."""
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1))
             for layer in module.model.encoder.modules() if isinstance(layer, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, 3, *(input_size or (256, 256))))
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


def float_tail_names(onnx_path: str | Path, backbone_convs: int) -> dict[str, str]:
    """``{node name: op type}`` of the image-dependent ONNX nodes after the backbone (flow head, scorer, …).

    The exported graph runs the whole backbone before the flow head (all three models), and the dynamo
    exporter keeps that order: the tail is every node after the ``backbone_convs``-th ``Conv``. (The exporter's
    per-node module paths are not reliable enough: FastFlow's head is attributed to the encoder.) OpenVINO keeps
    these names as its ops' friendly names (sometimes with a ``/…`` suffix).
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    nodes = list(graph.node)
    conv_positions = [index for index, node in enumerate(nodes) if node.op_type == "Conv"]
    if backbone_convs < 1 or len(conv_positions) < backbone_convs:
        msg = f"{onnx_path} has {len(conv_positions)} Conv nodes, fewer than the backbone's {backbone_convs}."
        raise ValueError(msg)
    boundary = conv_positions[backbone_convs - 1]
    # only nodes that depend on the image: weight-only subgraphs (e.g. folded flow weights) become constants in OpenVINO
    dynamic = {value.name for value in graph.input}
    depends_on_input = set()
    for node in nodes:
        if any(name in dynamic for name in node.input):
            dynamic.update(node.output)
            depends_on_input.add(node.name)
    return {node.name: node.op_type for node in nodes[boundary + 1 :] if node.name in depends_on_input}


def backbone_only_scope(ov_model: ov.Model, onnx_path: str | Path, backbone_convs: int) -> Any:
    """``nncf.IgnoredScope`` keeping every op of ``ov_model`` that comes after the backbone in float.

    Raises ``ValueError`` when the ONNX file does not describe ``ov_model`` (a head Conv/MatMul/Gemm not found).
    """
    import nncf

    names = float_tail_names(onnx_path, backbone_convs)
    present = {op.get_friendly_name().split("/")[0] for op in ov_model.get_ops()}
    weighted = {name for name, op_type in names.items() if op_type in {"Conv", "MatMul", "Gemm"}}
    if not weighted or not weighted <= present:
        msg = f"{onnx_path} does not match the OpenVINO model: cannot locate the flow head to keep it in float."
        raise ValueError(msg)
    return nncf.IgnoredScope(patterns=[f"^{name}(/.*)?$" for name in sorted(set(names) & present)], validate=False)


WEIGHTED_OPENVINO_OPS = ("Convolution", "GroupConvolution", "MatMul")
MIN_COMPRESSED_WEIGHTS = 4096  # smaller constant weights (the scorer's blur kernels) stay float


def _constant_weight_size(op: Any) -> int:
    """Elements of the constant behind ``op``'s weight input (through Convert/Reshape); 0 if it is not constant."""
    node = op.input_value(1).get_node()
    while node.get_type_name() != "Constant" and node.get_input_size():
        node = node.input_value(0).get_node()
    return int(np.prod(list(node.get_output_shape(0)))) if node.get_type_name() == "Constant" else 0


def float_weights_scope(ov_model: ov.Model, onnx_path: str | Path, backbone_convs: int) -> Any:
    """``nncf.IgnoredScope`` of the weighted ops whose weights stay float: the backbone's and the tiny ones."""
    import nncf

    tail = set(float_tail_names(onnx_path, backbone_convs))
    weighted = [op for op in ov_model.get_ops() if op.get_type_name() in WEIGHTED_OPENVINO_OPS]
    backbone = [op for op in weighted if op.get_friendly_name().split("/")[0] not in tail]
    if not backbone:
        msg = f"{onnx_path} does not match the OpenVINO model: no backbone convolution found."
        raise ValueError(msg)
    tiny = [op for op in weighted if _constant_weight_size(op) < MIN_COMPRESSED_WEIGHTS]
    return nncf.IgnoredScope(names=sorted({op.get_friendly_name() for op in backbone + tiny}), validate=False)


def compress_flow_weights(module: AnomalibModule, ov_model: ov.Model) -> ov.Model:
    """INT8 weight compression (nncf, per channel) of the flow head; the backbone's (and tiny) weights stay float.

    The flows read low-level backbone features whose small weight errors the exact likelihood amplifies: for
    FastFlow (lite0, bottle) compressing every weight lowered the mean image/pixel AUROC on synthetic anomalies made
    from normal training images from 0.968 to 0.947, compressing only the flow head kept 0.968
    (``benchmarks/int8_weights_selection.py``). The flow head holds most weights of CS-Flow and FastFlow.
    """
    from tempfile import TemporaryDirectory

    import nncf

    size = static_input_size(ov_model)
    with TemporaryDirectory() as folder:
        onnx_path = module.to_onnx(folder, "model", size)
        scope = float_weights_scope(ov_model, onnx_path, backbone_conv_count(module, size))
    return nncf.compress_weights(ov_model, ignored_scope=scope)


def quantize_backbone_on_normal_images(
    module: AnomalibModule,
    ov_model: ov.Model,
    datamodule: AnomalibDataModule | None,
    **quantize_kwargs: Any,
) -> ov.Model:
    """INT8 PTQ of the backbone only, calibrated on normal training images; flow head, scorer and post-processor float.

    Calibration on normal images cannot see the activation ranges anomalies produce after the backbone (large
    latents, log-likelihoods, scores): quantizing them clips exactly the values that make an anomaly. The names
    of the tail's ops come from a fresh ONNX export of ``module`` with the same input shape as ``ov_model``.
    """
    from tempfile import TemporaryDirectory

    size = static_input_size(ov_model)
    with TemporaryDirectory() as folder:
        onnx_path = module.to_onnx(folder, "model", size)
        scope = backbone_only_scope(ov_model, onnx_path, backbone_conv_count(module, size))
    return quantize_on_normal_images(ov_model, datamodule, ignored_scope=scope, **quantize_kwargs)


def export_model(
    model: AnomalibModule,
    export_type: ExportType | str,
    export_root: str | Path,
    input_size: Sequence[int] | None = None,
    compression_type: CompressionType | str | None = None,
    datamodule: AnomalibDataModule | None = None,
    model_file_name: str = "model",
    onnx_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Export a trained flow model to ONNX or OpenVINO IR after checking the options; returns the file path.

    Same result as ``Engine().export(model, export_type, export_root, input_size=..., compression_type=...,
    datamodule=...)`` (INT8_PTQ calibrates on ``datamodule``'s normal training images), with clear errors for
    combinations anomalib would ignore or run dishonestly. Files: ``export_root/weights/{onnx,openvino}/``.
    """
    allowed_types = [ExportType.ONNX.value, ExportType.OPENVINO.value]
    try:
        export_type = ExportType(export_type)
    except ValueError:
        export_type = None
    if export_type not in {ExportType.ONNX, ExportType.OPENVINO}:
        msg = f"export_type must be one of {allowed_types} for edge export, got {export_type!r}."
        raise ValueError(msg)
    compression = _compression(compression_type)
    if compression is not None and export_type == ExportType.ONNX:
        msg = (
            f"compression_type={compression.value!r} applies to OpenVINO export only (anomalib ignores it for ONNX); "
            "use export_type='openvino' or compression_type=None."
        )
        raise ValueError(msg)
    if compression == CompressionType.INT8_PTQ and datamodule is None:
        msg = "compression_type='int8_ptq' needs datamodule= (normal training images calibrate the quantization)."
        raise ValueError(msg)
    if input_size is not None:
        if len(input_size) != 2 or not all(int(s) == s and s > 0 for s in input_size):
            msg = f"input_size must be two positive integers (H, W) or None (any size), got {input_size!r}."
            raise ValueError(msg)
        input_size = (int(input_size[0]), int(input_size[1]))
    model.eval()
    if export_type == ExportType.ONNX:
        return model.to_onnx(export_root, model_file_name, input_size, **(onnx_kwargs or {}))
    return model.to_openvino(
        export_root,
        model_file_name,
        input_size,
        compression_type=compression,
        datamodule=datamodule,
        onnx_kwargs=onnx_kwargs,
    )


def anomaly_overlay(image: np.ndarray, anomaly_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB ``H×W×3`` uint8 overlay of a normalised ``anomaly_map`` (``h×w``, 0.5 = threshold) on ``image``.

    ``image`` is ``H×W×3`` in [0, 1] or uint8; the map is resized to ``H×W`` and coloured with the ``jet`` map
    over [0, 1], so red marks scores above the threshold.
    """
    from matplotlib import colormaps

    rgb = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    height, width = rgb.shape[:2]
    heat = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    heat = torch.nn.functional.interpolate(heat, size=(height, width), mode="bilinear", align_corners=False)
    colours = colormaps["jet"](heat[0, 0].clamp(0, 1).numpy())[..., :3]
    blended = (1 - alpha) * rgb + alpha * colours
    return (blended.clip(0, 1) * 255).round().astype(np.uint8)


def predict_folder(
    model_path: str | Path,
    image_dir: str | Path,
    output_dir: str | Path | None = None,
    precision: str = "f32",
    device: str = "CPU",
) -> list[dict[str, Any]]:
    """Run an exported model (``.xml`` IR or ``.onnx``) on every image of ``image_dir`` with ``OpenVINOInferencer``.

    Images are read as RGB in [0, 1] and, when the model has a static input size, resized to it (otherwise the
    in-graph pre-processor resizes). With ``output_dir``, writes ``<stem>_overlay.png`` (``anomaly_overlay``) per
    image. Returns one record per image, sorted by file name: ``path``, ``score``, ``label``, ``overlay``.
    """
    from anomalib.data.utils import read_image
    from anomalib.deploy import OpenVINOInferencer
    from PIL import Image

    image_dir = Path(image_dir)
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if image_dir.is_dir() else []
    if not paths:
        msg = f"image_dir={str(image_dir)!r} holds no images with suffixes {list(IMAGE_SUFFIXES)}."
        raise ValueError(msg)
    inferencer = OpenVINOInferencer(path=model_path, device=device, config=openvino_config(precision))
    size = static_input_size(inferencer.model)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path in paths:
        image = read_image(path, as_tensor=True)  # 3×H×W in [0, 1]
        if size is not None and tuple(image.shape[-2:]) != size:
            image = TF.resize(image, list(size), antialias=True)
        prediction = inferencer.predict(image)
        record = {"path": str(path), "score": float(np.asarray(prediction.pred_score).reshape(-1)[0]),
                  "label": bool(np.asarray(prediction.pred_label).reshape(-1)[0]), "overlay": None}
        if output_dir is not None:
            overlay_path = output_dir / f"{path.stem}_overlay.png"
            rgb = image.permute(1, 2, 0).numpy()
            Image.fromarray(anomaly_overlay(rgb, np.asarray(prediction.anomaly_map).reshape(-1, *np.asarray(
                prediction.anomaly_map).shape[-2:])[0])).save(overlay_path)
            record["overlay"] = str(overlay_path)
        records.append(record)
    return records
