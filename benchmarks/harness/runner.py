"""One benchmark task, run in a fresh process so its memory figures are its own.

``python harness/runner.py TASK.json RESULT.json`` reads a task, runs it and writes its result (or
``{"error": ...}``). It is started as a script, not as a module of a package that imports torch: an ONNX Runtime
or OpenVINO cell must not pay for torch and anomalib in its peak RSS.

Task kinds:

- ``export`` (``harness.exports``): build the model; files per format for the whole model and its backbone alone.
- ``time``: load one backend, feed B×3×H×W images in [0, 1], warm up, then time repeated calls.
- ``profile``: one OpenVINO infer request with ``PERF_COUNT=YES``; real time per node type, summed over calls.
- ``train`` (``harness.training``): fit on generated data or an MVTec-format dataset, time each training epoch.
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

HARNESS = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HARNESS:
    sys.path.pop(0)  # run as a script: this folder's modules must not shadow top-level ones
if str(HARNESS.parent) not in sys.path:
    sys.path.append(str(HARNESS.parent))  # benchmarks/, for ``import harness``

from harness.timing import interleaved_wall_times, median_ms  # noqa: E402

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


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile of ``values`` (``fraction`` in [0, 1])."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ------------------------------------------------------------------------------------------------------- time


def torch_runner(task: dict[str, Any], images: Any) -> tuple[Any, dict[str, Any]]:
    """Our Lightning module's forward (pre-processing, model, post-processing), as exported."""
    import torch

    from harness.models import backbone_of, build_benchmark_model

    torch.set_num_threads(task["threads"])
    device = torch.device(task["device"])
    model = build_benchmark_model(task["model"], task["image_size"]).eval()
    model = (model if task.get("part", "model") == "model" else backbone_of(model)).to(device)
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


def compile_openvino(task: dict[str, Any], shape: tuple[int, ...], extra: dict[str, Any] | None = None) -> Any:
    """The IR in ``task["file"]`` compiled on CPU for input ``shape``: 1 stream, latency hint, ``threads`` threads.

    Only the precision hint differs between backends: ``openvino-default`` sets none (the CPU's default, bf16 where
    the CPU has bf16 units), ``openvino-fp32`` sets ``f32``.
    """
    import openvino as ov

    if task["device"] != "cpu":
        msg = f"OpenVINO runs on CPU and Intel GPUs/NPUs only; device={task['device']!r} is not benchmarked."
        raise RuntimeError(msg)
    core = ov.Core()
    model = core.read_model(task["file"])
    model.reshape({model.inputs[0].any_name: list(shape)})
    config = {"INFERENCE_NUM_THREADS": task["threads"], "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              **OPENVINO_BACKENDS[task["backend"]][1], **(extra or {})}
    return core.compile_model(model, "CPU", config), config


def openvino_runner(task: dict[str, Any], images: Any) -> tuple[Any, dict[str, Any]]:
    """One infer request of the compiled IR; reports the precision the plugin computes in."""
    compiled, config = compile_openvino(task, images.shape)
    request = compiled.create_infer_request()
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    return (lambda: request.infer({0: images})), {"precision": precision, "config": {k: str(v) for k, v in
                                                                                     config.items()}}


def run_profile(task: dict[str, Any]) -> dict[str, Any]:
    """Per-op profile of one IR: ``PERF_COUNT=YES``, one infer request, real time summed by node type per call."""
    import numpy as np

    size, batch = task["image_size"], task["batch_size"]
    images = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
    compiled, _ = compile_openvino(task, images.shape, {"PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    for _ in range(task["warmup"]):
        request.infer({0: images})
    totals: dict[str, float] = {}
    calls = max(task["min_repeats"], 1)
    wall = 0.0
    for _ in range(calls):
        start = time.perf_counter()
        request.infer({0: images})
        wall += time.perf_counter() - start
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                totals[info.node_type] = totals.get(info.node_type, 0.0) + info.real_time.total_seconds()
    per_call_ms = {op: round(1e3 * seconds / calls, 4) for op, seconds in totals.items()}
    ordered = dict(sorted(per_call_ms.items(), key=lambda item: -item[1]))
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return {"op_ms_per_call": ordered, "ops_total_ms": round(sum(ordered.values()), 3),
            "wall_ms_per_call": round(1e3 * wall / calls, 3), "calls": calls,
            "precision": hint.to_string() if hasattr(hint, "to_string") else str(hint)}


def run_time(task: dict[str, Any]) -> dict[str, Any]:
    """Latency and throughput of one (model or backbone, backend, device, input size, batch) cell."""
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
    (times,) = interleaved_wall_times([run_once], task["warmup"], task["min_repeats"],
                                      min_seconds=task["min_seconds"], max_repeats=task["max_repeats"])
    result = {
        "times_s": [round(value, 6) for value in times],
        "latency_ms_p50": round(median_ms(times), 3),
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


def run_export(task: dict[str, Any]) -> dict[str, Any]:
    from harness.exports import run_export as export

    return export(task)


def run_train(task: dict[str, Any]) -> dict[str, Any]:
    from harness.training import run_train as train

    return train(task)


TASKS = {"export": run_export, "time": run_time, "profile": run_profile, "train": run_train}


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1], sys.argv[2]))
