"""Turn a benchmark result document into ratios, markdown tables, the README section and a plot."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Required keys of the result document and of each timed cell (``validate_result`` checks them).
RESULT_KEYS = ("schema_version", "created", "command", "machine", "config", "models", "cells", "ratios")
MACHINE_KEYS = ("cpu", "logical_cpus", "ram_gib", "threads", "versions")
VERSION_KEYS = ("python", "torch", "anomalib", "openvino", "onnxruntime")
CELL_KEYS = ("model", "family", "ours", "backend", "device", "image_size", "batch_size", "status", "parameters",
             "file_bytes")
OK_CELL_KEYS = ("times_s", "latency_ms_p50", "latency_ms_p95", "throughput_img_s", "peak_rss_mb",
                "baseline_rss_mb", "peak_gpu_mb", "precision")
ACCURACY_KEYS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")


def metric_cell(value: float | None) -> str:
    """A metric as a table cell: three decimals, ``–`` when it was not measured."""
    return "–" if value is None else f"{value:.3f}"


def validate_result(result: dict[str, Any]) -> None:
    """Raise ``ValueError`` listing what is missing or implausible in a result document."""
    problems = [f"missing key {key!r}" for key in RESULT_KEYS if key not in result]
    problems += [f"machine lacks {key!r}" for key in MACHINE_KEYS if key not in result.get("machine", {})]
    versions = result.get("machine", {}).get("versions", {})
    problems += [f"versions lack {key!r}" for key in VERSION_KEYS if key not in versions]
    for index, cell in enumerate(result.get("cells", [])):
        label = f"cell {index} ({cell.get('model')}, {cell.get('backend')}, b{cell.get('batch_size')})"
        problems += [f"{label} lacks {key!r}" for key in CELL_KEYS if key not in cell]
        if cell.get("status") == "ok":
            problems += [f"{label} lacks {key!r}" for key in OK_CELL_KEYS if key not in cell]
            for key in ("latency_ms_p50", "latency_ms_p95", "throughput_img_s", "peak_rss_mb"):
                if not isinstance(cell.get(key), int | float) or not cell[key] > 0:
                    problems.append(f"{label}: {key}={cell.get(key)!r} is not positive")
            if not cell.get("times_s") or any(not value > 0 for value in cell["times_s"]):
                problems.append(f"{label}: raw times_s missing or not positive")
        elif not cell.get("error"):
            problems.append(f"{label}: status {cell.get('status')!r} without an error string")
    if problems:
        msg = "Invalid benchmark result: " + "; ".join(problems[:20])
        raise ValueError(msg)


def _ok_cells(result: dict[str, Any]) -> Iterable[dict[str, Any]]:
    return (cell for cell in result["cells"] if cell.get("status") == "ok")


def _train(result: dict[str, Any], model: str, size: int) -> dict[str, Any]:
    return result["models"].get(model, {}).get("sizes", {}).get(str(size), {}).get("train") or {}


def compute_ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """ours/anomalib per family, backend, device, input size and batch where both cells succeeded.

    ``speedup`` = ours img/s ÷ anomalib img/s (> 1: ours faster); ``memory`` and ``file_size`` = ours ÷ anomalib
    (< 1: ours smaller).
    """
    by_key = {}
    for cell in _ok_cells(result):
        if cell.get("part", "model") == "model":
            by_key[(cell["family"], cell["backend"], cell["device"], cell["image_size"], cell["batch_size"],
                    cell["ours"])] = cell
    families = ["cflow", "fastflow", "csflow"]
    backends = list(result.get("config", {}).get("backends", []))

    def order(item: tuple) -> tuple:
        family, backend, device, size, batch, _ = item[0]
        return (families.index(family) if family in families else len(families), family,
                backends.index(backend) if backend in backends else len(backends), backend, device, size, batch)

    ratios = []
    for (family, backend, device, size, batch, ours), cell in sorted(by_key.items(), key=order):
        theirs = by_key.get((family, backend, device, size, batch, False))
        if not ours or theirs is None:
            continue
        ratio = {"family": family, "backend": backend, "device": device, "image_size": size, "batch_size": batch,
                 "ours": cell["model"], "anomalib": theirs["model"],
                 "speedup": round(cell["throughput_img_s"] / theirs["throughput_img_s"], 3),
                 "latency_ms": [cell["latency_ms_p50"], theirs["latency_ms_p50"]],
                 "memory": round(cell["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
                 "file_size": (round(cell["file_bytes"] / theirs["file_bytes"], 4)
                               if cell.get("file_bytes") and theirs.get("file_bytes") else None)}
        ratios.append(ratio)
    return ratios


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _megabytes(value: int | None) -> str:
    return "–" if not value else f"{value / 2**20:.1f}"


def cell_table(result: dict[str, Any]) -> list[str]:
    """One row per cell: latency, throughput, memory, file size, or the error."""
    lines = ["| model | backend | device | px | batch | p50 ms | p95 ms | img/s | peak RSS MB | runtime RSS MB | "
             "GPU MB | precision | file MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    errors = []
    for cell in result["cells"]:
        model = cell["model"] if cell.get("part", "model") == "model" else f"{cell['model']} (backbone)"
        head = (f"| {model} | {cell['backend']} | {cell['device']} | {cell['image_size']} | "
                f"{cell['batch_size']} |")
        if cell.get("status") != "ok":
            errors.append(cell)
            lines.append(f"{head} error¹ | | | | | | | {_megabytes(cell.get('file_bytes'))} |")
            continue
        lines.append(
            f"{head} {_number(cell['latency_ms_p50'])} | {_number(cell['latency_ms_p95'])} | "
            f"{_number(cell['throughput_img_s'])} | {_number(cell['peak_rss_mb'], 0)} | "
            f"{_number(cell['baseline_rss_mb'], 0)} | {_number(cell.get('peak_gpu_mb'), 0)} | "
            f"{cell.get('precision', '–')} | {_megabytes(cell.get('file_bytes'))} |")
    if errors:
        lines += ["", "¹ Errors (the cell ran, the backend failed):", ""]
        seen = set()
        for cell in errors:
            key = (cell["model"], cell["backend"], cell["error"][:200])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {cell['model']} / {cell['backend']}: `{cell['error'][:300]}`")
    return lines


def model_table(result: dict[str, Any]) -> list[str]:
    """One row per model and input size: parameters, training time per epoch, accuracy when measured."""
    lines = ["| model | px | parameters | train s/epoch | train images | image AUROC | pixel AUROC | pixel AUPRO |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, model in result["models"].items():
        for size in model.get("sizes", {}):
            train = _train(result, name, int(size))
            metrics = train.get("metrics") or {}
            seconds = train.get("train_seconds_per_epoch", f"error: {train.get('error', '–')[:80]}"
                                if train else "–")
            lines.append(f"| {name} | {size} | {model.get('parameters') or 0:,} | {_number(seconds)} | "
                         f"{train.get('train_images', '–')} | "
                         + " | ".join(_number(metrics.get(key), 3) for key in ACCURACY_KEYS) + " |")
    return lines


def ratio_table(result: dict[str, Any]) -> list[str]:
    """ours ÷ anomalib per family, backend and batch: speed-up (img/s), memory and file size."""
    lines = ["| pair | backend | device | px | batch | ours ms/call | anomalib ms/call | "
             "speed-up (ours/anomalib img/s) | peak RSS ours/anomalib | file ours/anomalib |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for ratio in result["ratios"]:
        lines.append(
            f"| {ratio['ours']} / {ratio['anomalib']} | {ratio['backend']} | {ratio['device']} | {ratio['image_size']} "
            f"| {ratio['batch_size']} | {_number(ratio['latency_ms'][0])} | {_number(ratio['latency_ms'][1])} | "
            f"**{ratio['speedup']:.2f}×** | {ratio['memory']:.2f} | {_number(ratio['file_size'], 3)} |")
    return lines


def machine_line(result: dict[str, Any]) -> str:
    """One sentence: CPU, cores, RAM, GPU, threads, versions."""
    machine = result["machine"]
    versions = machine["versions"]
    gpu = machine.get("gpu") or {}
    return (f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['ram_gib']} GiB RAM"
            f"{', ' + gpu['name'] if gpu else ', no GPU'}; {machine['threads']} threads; Python {versions['python']}, "
            f"torch {versions['torch']}, anomalib {versions['anomalib']}, OpenVINO {versions['openvino']}, "
            f"ONNX Runtime {versions['onnxruntime']}.")


def method_lines(result: dict[str, Any]) -> list[str]:
    """How the figures were taken (from the run's own configuration)."""
    config = result["config"]
    data = (f"{config['data_root']}/{config['category']} (validation = 20 % of train/good + synthetic anomalies; "
            "test metrics of the torch model)" if config.get("data_root") else "generated images (no accuracy)")
    lines = [
        f"- Each cell runs in a fresh process: {config['warmup']} warm-up calls, then at least "
        f"{config['min_repeats']} timed calls and {config['min_seconds']} s; p50/p95 of the per-call times, img/s = "
        "images ÷ total timed seconds. Input: random B×3×H×W images in [0, 1]; the timed call is the full exported "
        "graph (anomalib pre-processing, model, post-processing).",
        "- Peak RSS = the process's peak resident memory (VmHWM); runtime RSS = after importing the backend, "
        "before loading the model. Exported files come from each model's own `to_onnx` / `to_openvino` (FP16 and "
        "INT8: `compression_type=FP16` / `INT8_PTQ` for anomalib's models, NNCF post-training quantisation with "
        "their calibration, and `INT8`, flow-head weights, for ours), so our IRs carry their float32 marks; the "
        "backbone alone is converted from its ONNX file.",
        "- `openvino-fp32` sets `INFERENCE_PRECISION_HINT=f32`; `openvino-default` keeps OpenVINO's default, "
        "which on CPUs with bf16 units computes in bf16 (the precision column shows what the plugin reported).",
        f"- Training: {config['epochs']} epoch(s), batch {config['train_batch_size']}, on {data}; the time per "
        "epoch excludes validation. Weights do not change speed, so timing cells use random flow weights.",
    ]
    if config.get("data_root"):
        lines.append(f"- Accuracy is after {config['epochs']} epoch(s) at each model's default learning rate, the same "
                     "budget for all; models whose backbone has no offline weights here (resnet18, EfficientNet-B5) "
                     "get no accuracy, since random features say nothing about the detector.")
    return lines


def markdown_report(result: dict[str, Any]) -> str:
    """The full results page: machine, method, per-cell table, model table, ratios."""
    lines = [
        "# Benchmark: our flow models vs anomalib's, per backend",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {machine_line(result)}  ",
        f"Run: {result['created']}.",
        "",
        *method_lines(result),
        "",
        "## ours ÷ anomalib",
        "",
        *ratio_table(result),
        "",
        "## Models: size, training time, accuracy",
        "",
        *model_table(result),
        "",
        "## Every cell",
        "",
        *cell_table(result),
        "",
    ]
    if result.get("skipped_devices"):
        lines += [f"Skipped devices: {result['skipped_devices']}.", ""]
    return "\n".join(lines)


def readme_section(result: dict[str, Any], json_path: str, plot_path: str | None) -> str:
    """The README's performance section: ratios, model table, the plot, and how to reproduce."""
    lines = [
        "### Performance: speed, memory, size and accuracy per backend, side by side with anomalib",
        "",
        f"Generated by `benchmarks/benchmark.py` from `{json_path}` (every raw timing is there). "
        f"Machine: {machine_line(result)}",
        "",
        *ratio_table(result),
        "",
        *model_table(result),
        "",
    ]
    if plot_path:
        lines += [f"![accuracy vs throughput]({plot_path})", ""]
    lines += [*method_lines(result), "", "Reproduce (on an otherwise idle machine):", "", "```bash",
              result["command"], "```", ""]
    return "\n".join(lines)


def print_ratios(result: dict[str, Any]) -> str:
    """Plain-text ours/anomalib ratios per model pair, for the terminal."""
    lines = []
    for ratio in result["ratios"]:
        lines.append(f"{ratio['ours']:>9} / {ratio['anomalib']:<18} {ratio['backend']:<17} {ratio['device']} "
                     f"{ratio['image_size']}px b{ratio['batch_size']}: speed-up {ratio['speedup']:.2f}×, "
                     f"peak RSS {ratio['memory']:.2f}×, file {_number(ratio['file_size'], 3)}×")
    return "\n".join(lines) or "no pair of cells where both ours and anomalib's succeeded"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accuracy (pixel AUPRO; image AUROC if absent) vs img/s at the largest batch, marker area ∝ peak RSS.

    Without accuracy (no dataset given) the y axis lists model/backend instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(result["config"]["batch_sizes"])
    cells = [cell for cell in _ok_cells(result) if cell["batch_size"] == batch and cell.get("part", "model") == "model"]
    metric = "pixel_AUPRO"
    accuracy = {}
    for cell in cells:
        metrics = _train(result, cell["model"], cell["image_size"]).get("metrics") or {}
        value = metrics.get(metric, metrics.get("image_AUROC"))
        if value is not None:
            accuracy[cell["model"]] = value
    figure, axis = plt.subplots(figsize=(8, 5.5))
    markers = {"torch": "o", "onnxruntime": "s", "openvino-fp32": "^", "openvino-default": "v",
               "openvino-fp16": "D", "openvino-int8": "P"}
    colours = {"cflow": "C0", "fastflow": "C1", "csflow": "C2"}
    labels: list[str] = []
    for cell in cells:
        if accuracy:
            if cell["model"] not in accuracy:
                continue
            y = accuracy[cell["model"]]
        else:
            label = f"{cell['model']} {cell['backend']}"
            labels.append(label)
            y = len(labels) - 1
        axis.scatter(cell["throughput_img_s"], y, s=max(cell["peak_rss_mb"] / 4, 10), marker=markers[cell["backend"]],
                     facecolors=colours.get(cell["family"], "C3") if cell["ours"] else "none",
                     edgecolors=colours.get(cell["family"], "C3"), alpha=0.7, linewidths=1.5)
    if accuracy:
        for model, value in accuracy.items():
            axis.annotate(model, (min(c["throughput_img_s"] for c in cells if c["model"] == model), value),
                          textcoords="offset points", xytext=(0, 12), fontsize=8, ha="center")
        axis.set_ylabel(f"test {metric} (torch model)")
    else:
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.margins(x=0.08, y=0.12)
    axis.set_xscale("log")
    axis.set_xlabel(f"throughput, img/s at batch {batch} (log)")
    handles = [plt.Line2D([], [], marker=marker, linestyle="", color="grey", label=backend)
               for backend, marker in markers.items() if backend in result["config"]["backends"]]
    handles += [plt.Line2D([], [], marker="o", linestyle="", color="black", label="ours (filled)"),
                plt.Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="black",
                           label="anomalib (hollow)")]
    axis.legend(handles=handles, fontsize=8, loc="best")
    axis.set_title(f"{result['machine']['cpu']}, {result['machine']['threads']} threads — marker area ∝ peak RSS",
                   fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
