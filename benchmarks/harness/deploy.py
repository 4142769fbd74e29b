"""Deployability of exported IRs: build a shipped config, export it, run it the ways users do, compare with torch.

One *cell* is an IR (config × compression × float32 marks) compiled at one precision (the CPU's default, no
configuration; or ``INFERENCE_PRECISION_HINT=f32``) in one runtime (anomalib's ``OpenVINOInferencer``, or
``EdgeModel``, what the torch-free ``flowad-predict`` runs) and called at one batch size: does it compile, does it
run, and do its anomaly maps and image scores match torch FP32 on the same images (Pearson correlation of all map
pixels; Spearman correlation of the image scores, i.e. their order)?

Marks: ``exported`` is the IR as ``to_openvino`` writes it; the other variants re-mark the same IR to show that
deployability does not depend on which layers are kept float32: ``none`` (no marks: every IR before the marking),
``tail`` (only the score tail, ``precision.float32_tail``) and ``convolutions`` (every convolution alone, the
marks most likely to cut a fused node; ``mark_precise`` adds what the CPU plugin fuses into them).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import flowad_plugins
from flowad_plugins.export.precision import PRECISE_ATTRIBUTE, float32_tail, mark_precise

COMPRESSIONS = ("FP32", "FP16", "INT8")  # FP32: compression_type=None
PRECISIONS = ("default", "f32")
BATCH_SIZES = (1, 8)
RUNTIMES = ("OpenVINOInferencer", "flowad-predict")
MARKINGS = ("exported", "none", "tail", "convolutions")
# parity with torch FP32, every compression: min map correlation, min score-order correlation
MIN_MAP_CORRELATION, MIN_SCORE_ORDER = 0.99, 0.95
TRAINING_ONLY = ("lr", "weight_decay", "warmup_fraction", "gradient_clip_norm", "lr_schedule", "pre_processor")


def config_model(path: str | Path, input_size: Sequence[int] | None = None,
                 pre_trained: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """The model a config file ships (``model.init_args``), in eval mode, and what was built.

    ``input_size``: override of the config's size (its ``input_size``, its pre-processor's ``Resize``, else the
    model's default). ``pre_trained``: ``None`` = the config's, falling back to random weights when they do not
    install offline.
    """
    spec = yaml.safe_load(Path(path).read_text())["model"]
    kwargs = {key: value for key, value in spec["init_args"].items() if key not in TRAINING_ONLY}
    model_class = getattr(flowad_plugins, spec["class_path"].rsplit(".", 1)[-1])
    configured = kwargs.get("input_size") or _resize_size(spec["init_args"].get("pre_processor"))
    size = tuple(input_size or configured or model_class.DEFAULT_INPUT_SIZE)
    kwargs["input_size"] = size
    wanted = kwargs.get("pre_trained", True) if pre_trained is None else pre_trained
    try:
        model = model_class(**{**kwargs, "pre_trained": wanted})
        weights = "ImageNet" if wanted else "random"
    except Exception:  # weights that need a download
        if not wanted or pre_trained:
            raise
        model = model_class(**{**kwargs, "pre_trained": False})
        weights = "random (ImageNet weights do not install offline)"
    info = {"config": Path(path).name, "model": model_class.__name__, "backbone": kwargs.get("backbone"),
            "input_size": list(size), "config_input_size": list(configured or size), "weights": weights}
    return model.eval(), info


def _resize_size(pre_processor: dict | None) -> tuple[int, int] | None:
    """``size`` of the ``Resize`` in a config's pre-processor, if any."""
    for transform in (((pre_processor or {}).get("init_args") or {}).get("transform") or {}).get(
            "init_args", {}).get("transforms", []):
        if transform["class_path"].endswith("Resize"):
            return tuple(transform["init_args"]["size"])
    return None


def export(model: Any, folder: Path, compression: str, input_size: Sequence[int]) -> Path:
    """``model.to_openvino`` with ``compression`` (a ``COMPRESSIONS`` name) into ``folder``; the IR's path."""
    from anomalib.deploy import CompressionType

    compression_type = None if compression == "FP32" else CompressionType[compression]
    return Path(model.to_openvino(folder, "model", tuple(input_size), compression_type=compression_type))


def remarked(xml: Path, marking: str, folder: Path) -> Path:
    """A copy of the IR at ``xml`` with the ``marking`` variant of float32 marks (``MARKINGS``), in ``folder``."""
    import xml.etree.ElementTree as ElementTree

    import openvino as ov

    if marking == "exported":
        return xml
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{marking}.xml"
    tree = ElementTree.parse(xml)
    for rt_info in tree.getroot().iter("rt_info"):
        for attribute in [a for a in rt_info if a.get("name") == PRECISE_ATTRIBUTE["name"]]:
            rt_info.remove(attribute)
    tree.write(target, encoding="utf-8", xml_declaration=True)
    shutil.copyfile(xml.with_suffix(".bin"), target.with_suffix(".bin"))
    if marking == "tail":
        tail = {node.get_friendly_name() for node in float32_tail(ov.Core().read_model(target))}
        mark_precise(target, lambda name, _: name in tail)
    elif marking == "convolutions":
        mark_precise(target, lambda _, kind: kind in ("Convolution", "GroupConvolution"))
    return target


def reference_outputs(model: Any, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Torch FP32 ``pred_score`` ``B`` and ``anomaly_map`` ``B×h×w`` of ``images`` ``B×3×H×W`` in [0, 1]."""
    with torch.no_grad():
        batch = model(images)
    return {"pred_score": batch.pred_score.reshape(-1).numpy(),
            "anomaly_map": batch.anomaly_map.reshape(len(images), *batch.anomaly_map.shape[-2:]).numpy()}


def _inferencer_call(xml: Path, precision: str):
    from anomalib.deploy import OpenVINOInferencer

    inferencer = OpenVINOInferencer(xml, device="CPU", config={} if precision == "default" else
                                    {"INFERENCE_PRECISION_HINT": precision})

    def call(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prediction = inferencer.predict(torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2))
        maps = np.asarray(prediction.anomaly_map)
        return np.asarray(prediction.pred_score).reshape(-1), maps.reshape(len(images), *maps.shape[-2:])

    return call


def _edge_call(xml: Path, precision: str):
    from flowad_plugins.edge.runtime import EdgeModel

    edge = EdgeModel(xml, precision=precision)

    def call(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        predictions = edge.predict(images)
        return (np.array([p.score for p in predictions]), np.stack([p.anomaly_map for p in predictions]))

    return call


def parity(reference: dict[str, np.ndarray], scores: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """Map correlation (all pixels, Pearson), score-order correlation (Spearman), max |Δ score|."""
    from scipy.stats import pearsonr, spearmanr

    finite = np.isfinite(maps).all() and np.isfinite(scores).all()
    if not finite:
        return {"map_correlation": float("nan"), "score_order": float("nan"), "max_score_difference": float("nan")}
    return {"map_correlation": float(pearsonr(maps.ravel(), reference["anomaly_map"].ravel())[0]),
            "score_order": float(spearmanr(scores, reference["pred_score"])[0]),
            "max_score_difference": float(np.abs(scores - reference["pred_score"]).max())}


def run_cells(xml: Path, images: np.ndarray, reference: dict[str, np.ndarray], compression: str,
              marking: str, precisions: Sequence[str] = PRECISIONS, runtimes: Sequence[str] = RUNTIMES,
              batch_sizes: Sequence[int] = BATCH_SIZES) -> list[dict[str, Any]]:
    """Every precision × runtime × batch cell of one IR on ``images`` ``N×H×W×3`` uint8 (N a multiple of 8).

    Batch ``b`` runs all ``N`` images ``b`` at a time; parity compares every output with ``reference``.
    """
    cells = []
    for precision in precisions:
        for runtime in runtimes:
            base = {"compression": compression, "marks": marking, "precision": precision, "runtime": runtime}
            start = time.perf_counter()
            try:
                call = (_inferencer_call if runtime == "OpenVINOInferencer" else _edge_call)(xml, precision)
            except Exception as error:
                cells += [{**base, "batch": batch, "compiles": False, "runs": False, "parity": False,
                           "error": _error_line(error)} for batch in batch_sizes]
                continue
            compile_s = time.perf_counter() - start
            for batch in batch_sizes:
                cell = {**base, "batch": batch, "compiles": True, "compile_s": round(compile_s, 2)}
                try:
                    start = time.perf_counter()
                    outputs = [call(images[i : i + batch]) for i in range(0, len(images), batch)]
                    cell["ms_per_image"] = round(1000 * (time.perf_counter() - start) / len(images), 2)
                    scores = np.concatenate([scores for scores, _ in outputs])
                    maps = np.concatenate([maps for _, maps in outputs])
                    cell["runs"] = True
                    cell.update(parity(reference, scores, maps))
                    cell["parity"] = bool(cell["map_correlation"] >= MIN_MAP_CORRELATION
                                          and cell["score_order"] >= MIN_SCORE_ORDER)
                except Exception as error:
                    cell.update(runs=False, parity=False, error=_error_line(error))
                cells.append(cell)
    return cells


def _error_line(error: BaseException) -> str:
    """The last non-empty line of an error (OpenVINO's messages end with the reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


def run_ir(xml: Path, images: np.ndarray, reference: dict[str, np.ndarray], compression: str, folder: Path,
           markings: Sequence[str] = MARKINGS) -> list[dict[str, Any]]:
    """``run_cells`` for the exported IR (both precisions) and each other marking (the default precision only:
    under the f32 hint marks change nothing)."""
    cwd = Path.cwd()
    os.chdir(folder)  # OpenVINOInferencer writes ./openvino_cache
    try:
        cells = []
        for marking in markings:
            path = remarked(xml, marking, folder / "marks")
            precisions = PRECISIONS if marking == "exported" else ("default",)
            cells += run_cells(path, images, reference, compression, marking, precisions)
        return cells
    finally:
        os.chdir(cwd)
