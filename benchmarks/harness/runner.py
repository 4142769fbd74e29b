"""One benchmark task, run in a fresh process so its memory figures are its own.

``python runner.py TASK.json RESULT.json`` reads a task, runs it and writes its result (or ``{"error": ...}``).
It is started as a script, not as ``-m flowad_plugins.bench.runner``: importing the package would load torch and
anomalib, and an ONNX Runtime or OpenVINO cell must not pay for those in its peak RSS.

Task kinds:

- ``export``: build the model, save the torch state dict, export ONNX through anomalib's ``to_onnx`` and convert
  that file to OpenVINO IR as anomalib's ``to_openvino`` does (FP32; FP16 = ``compress_to_fp16``); INT8 through
  ``to_openvino(compression_type=INT8_PTQ)`` itself, so a model's own calibration applies. File sizes, parameter
  count, seconds, a per-format error string.
- ``time``: load one backend, feed B×3×H×W images in [0, 1], warm up, then time repeated calls.
- ``train``: fit on generated data or an MVTec-format dataset, time each training epoch, test when asked.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__:
    from flowad_plugins.bench.timing import wall_times
else:  # started as a script (each harness cell): the sibling file, without importing the package (and torch)
    from timing import wall_times

OPENVINO_BACKENDS = {
    # backend -> (exported file format, compile config beyond threads/streams)
    "openvino-fp32": ("openvino-fp32", {"INFERENCE_PRECISION_HINT": "f32"}),
    "openvino-default": ("openvino-fp32", {}),
    "openvino-fp16": ("openvino-fp16", {}),
    "openvino-int8": ("openvino-int8", {}),
}
BACKEND_FORMATS = {"torch": "torch", "onnxruntime": "onnx",
                   **{name: file_format for name, (file_format, _) in OPENVINO_BACKENDS.items()}}
BACKENDS = tuple(BACKEND_FORMATS)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB).

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this address space. ``ru_maxrss`` would not do:
    Linux carries it over ``exec`` from the (large) parent that spawned this process.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now (MiB)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def folder_bytes(path: Path) -> int:
    """Bytes of every file in ``path`` (ONNX external data and OpenVINO .bin included)."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile of ``values`` (``fraction`` in [0, 1])."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ----------------------------------------------------------------------------------------------------- export


def calibration_datamodule(task: dict[str, Any]):
    """Images for INT8 calibration: the dataset's validation split, else generated normal images."""
    if task.get("data_root"):
        from anomalib.data import MVTecAD
        from torchvision.transforms.v2 import Resize

        # the IR has a static H×W: anomalib's own calibration feeds the loader's images as they come
        size = (task["image_size"], task["image_size"])
        return MVTecAD(root=task["data_root"], category=task["category"], train_batch_size=8, eval_batch_size=8,
                       num_workers=0, val_split_mode="synthetic", val_split_ratio=0.2, seed=0,
                       augmentations=Resize(size, antialias=True))
    from flowad_plugins.data import SyntheticAD

    return SyntheticAD(root=Path(task["work_dir"]) / "calibration", category="surface",
                       image_size=task["image_size"], num_train=40, num_test_good=2, num_test_per_defect=1,
                       train_batch_size=8, eval_batch_size=8)


def run_export(task: dict[str, Any]) -> dict[str, Any]:
    """Export one model at one input size to every format in ``task["formats"]``."""
    import torch

    from flowad_plugins.bench.models import build_model, parameter_count

    torch.set_num_threads(task["threads"])
    size = task["image_size"]
    out_dir = Path(task["out_dir"])
    model = build_model(task["model"], size).eval()
    result: dict[str, Any] = {"parameters": parameter_count(model), "files": {}, "bytes": {}, "seconds": {},
                              "errors": {}}

    def attempt(file_format: str, export: Any) -> None:
        start = time.perf_counter()
        try:
            path = Path(export())
            result["files"][file_format] = str(path)
            result["bytes"][file_format] = folder_bytes(path.parent) if path.suffix != ".pt" else path.stat().st_size
            result["seconds"][file_format] = round(time.perf_counter() - start, 2)
        except Exception as error:
            result["errors"][file_format] = f"{type(error).__name__}: {str(error).strip()[:600]}"

    formats = task["formats"]
    if "torch" in formats:
        def save_state_dict() -> Path:
            path = out_dir / "torch" / "model.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
            return path

        attempt("torch", save_state_dict)
    needs_onnx = any(file_format != "torch" for file_format in formats)
    if needs_onnx:
        attempt("onnx", lambda: model.to_onnx(out_dir / "onnx", input_size=(size, size)))
    onnx_path = result["files"].get("onnx")
    for file_format in [f for f in formats if f.startswith("openvino")]:
        if onnx_path is None:
            result["errors"][file_format] = f"no ONNX model to convert ({result['errors'].get('onnx', 'not exported')})"
            continue

        def export_openvino(file_format: str = file_format) -> Path:
            import openvino as ov
            from anomalib.deploy import CompressionType

            if file_format == "openvino-int8":  # the public API, so a model's own calibration override applies
                return model.to_openvino(out_dir / file_format, input_size=(size, size),
                                         compression_type=CompressionType.INT8_PTQ,
                                         datamodule=calibration_datamodule(task))
            ov_model = ov.convert_model(onnx_path)
            path = out_dir / file_format / "model.xml"
            path.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(ov_model, path, compress_to_fp16=file_format == "openvino-fp16")
            return path

        attempt(file_format, export_openvino)
    if "onnx" not in formats:
        result["files"].pop("onnx", None)
    return result


# ------------------------------------------------------------------------------------------------------- time


def torch_runner(task: dict[str, Any], images: Any) -> tuple[Any, dict[str, Any]]:
    """Our Lightning module's forward (pre-processing, model, post-processing), as exported."""
    import torch

    from flowad_plugins.bench.models import build_model

    torch.set_num_threads(task["threads"])
    device = torch.device(task["device"])
    model = build_model(task["model"], task["image_size"]).eval().to(device)
    inputs = torch.from_numpy(images).to(device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run_once() -> None:
        with torch.inference_mode():
            model(inputs)
        synchronize()

    return run_once, {"precision": "f32"}


def onnxruntime_runner(task: dict[str, Any], images: Any) -> tuple[Any, dict[str, Any]]:
    """An ONNX Runtime session on the CPU (or CUDA) execution provider, all graph optimisations on."""
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if task["device"] == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        msg = f"onnxruntime has no {provider} here (available: {ort.get_available_providers()})."
        raise RuntimeError(msg)
    options = ort.SessionOptions()
    options.intra_op_num_threads = task["threads"]
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(task["file"], sess_options=options, providers=[provider])
    feed = {session.get_inputs()[0].name: images}
    return (lambda: session.run(None, feed)), {"precision": "f32", "provider": provider}


def openvino_runner(task: dict[str, Any], images: Any) -> tuple[Any, dict[str, Any]]:
    """An OpenVINO CPU model compiled for this batch shape: 1 stream, latency hint, ``threads`` threads."""
    import openvino as ov

    if task["device"] != "cpu":
        msg = f"OpenVINO runs on CPU and Intel GPUs/NPUs only; device={task['device']!r} is not benchmarked."
        raise RuntimeError(msg)
    core = ov.Core()
    model = core.read_model(task["file"])
    model.reshape({model.inputs[0].any_name: list(images.shape)})
    config = {"INFERENCE_NUM_THREADS": task["threads"], "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              **OPENVINO_BACKENDS[task["backend"]][1]}
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)  # what the plugin computes in
    return (lambda: request.infer({0: images})), {"precision": precision, "config": {k: str(v) for k, v in
                                                                                     config.items()}}


def run_time(task: dict[str, Any]) -> dict[str, Any]:
    """Latency and throughput of one (model, backend, device, input size, batch) cell."""
    import numpy as np

    backend = task["backend"]
    size, batch = task["image_size"], task["batch_size"]
    images = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    # the runtime is imported before the baseline, so that the baseline is "runtime loaded, no model yet"
    importlib.import_module({"torch": "torch", "onnxruntime": "onnxruntime"}.get(backend, "openvino"))
    baseline_rss = current_rss_mb()
    runners = {"torch": torch_runner, "onnxruntime": onnxruntime_runner}
    runner = runners.get(backend, openvino_runner)
    load_start = time.perf_counter()
    run_once, details = runner(task, images)
    load_seconds = time.perf_counter() - load_start
    times = wall_times(run_once, task["warmup"], task["min_repeats"], task["max_repeats"], task["min_seconds"])
    result = {
        "times_s": [round(value, 6) for value in times],
        "latency_ms_p50": round(1e3 * percentile(times, 0.5), 3),
        "latency_ms_p95": round(1e3 * percentile(times, 0.95), 3),
        "throughput_img_s": round(batch * len(times) / sum(times), 3),
        "baseline_rss_mb": round(baseline_rss, 1),
        "load_seconds": round(load_seconds, 2),
        "peak_gpu_mb": None,
        **details,
    }
    if backend == "torch" and task["device"] == "cuda":
        import torch

        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


# ------------------------------------------------------------------------------------------------------ train


def run_train(task: dict[str, Any]) -> dict[str, Any]:
    """Fit ``task["epochs"]`` epochs, timing each training epoch (validation excluded); test on a real dataset."""
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import Callback, seed_everything

    from flowad_plugins.bench.models import MODEL_SPECS, build_model

    class EpochTimer(Callback):
        """Wall time of each training epoch (data loading included, validation excluded)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.start = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    torch.set_num_threads(task["threads"])
    seed_everything(0, workers=True)
    size = task["image_size"]
    real_data = bool(task.get("data_root"))
    model = build_model(task["model"], size, real_weights=real_data)
    if real_data:
        from anomalib.data import MVTecAD

        datamodule = MVTecAD(root=task["data_root"], category=task["category"], train_batch_size=task["batch_size"],
                             eval_batch_size=task["batch_size"], num_workers=min(2, task["threads"]),
                             val_split_mode="synthetic", val_split_ratio=0.2, seed=0)
    else:
        from flowad_plugins.data import SyntheticAD

        datamodule = SyntheticAD(root=Path(task["work_dir"]) / "train_data", category="surface", image_size=size,
                                 num_train=task["train_images"], num_test_good=2, num_test_per_defect=1,
                                 train_batch_size=task["batch_size"], eval_batch_size=task["batch_size"])
    timer = EpochTimer()
    engine = Engine(max_epochs=task["epochs"], accelerator="gpu" if task["device"] == "cuda" else "cpu", devices=1,
                    logger=False, default_root_dir=task["work_dir"], enable_progress_bar=False, callbacks=[timer])
    engine.fit(model=model, datamodule=datamodule)
    datamodule.setup("fit")
    result: dict[str, Any] = {
        "epoch_seconds": [round(value, 2) for value in timer.seconds],
        "train_seconds_per_epoch": round(sum(timer.seconds) / max(len(timer.seconds), 1), 2),
        "train_images": len(datamodule.train_data),
        "epochs": task["epochs"],
        "data": f"{task['data_root']}/{task['category']}" if real_data else f"generated surface, {size} px",
        "metrics": None,
    }
    if real_data and MODEL_SPECS[task["model"]].offline_weights:
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
        result["metrics"] = {key: round(float(value), 4) for key, value in metrics.items()}
    elif real_data:
        result["metrics_skipped"] = ("its backbone has no offline ImageNet weights here (random features), so "
                                     "test metrics would say nothing about the detector")
    return result


TASKS = {"export": run_export, "time": run_time, "train": run_train}


def main(task_path: str, result_path: str) -> int:
    """Run the task in ``task_path``; write its result, peak RSS and any error to ``result_path``."""
    task = json.loads(Path(task_path).read_text())
    start = time.perf_counter()
    try:
        result = TASKS[task["kind"]](task)
        status = 0
    except Exception as error:
        result = {"error": f"{type(error).__name__}: {str(error).strip()[:600]}",
                  "traceback": traceback.format_exc()[-3000:]}
        status = 1
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["task_seconds"] = round(time.perf_counter() - start, 2)
    Path(result_path).write_text(json.dumps(result))
    return status


if __name__ == "__main__":
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # run as a script: don't let this folder's modules shadow top-level ones
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1], sys.argv[2]))
