"""The benchmark grid and its driver: models × backends × input sizes × devices × batch sizes.

Every task runs in a fresh subprocess (``runner.py``) so that peak RSS is the cell's own and a crash or a backend
that cannot load a model becomes an error string in that cell, not the end of the run. Per model and input size:
one export task (torch state dict, ONNX, OpenVINO IR), one timing task per (backend, device, batch size), and one
training task (time per epoch; accuracy when a dataset is given).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowad_plugins.bench import runner
from flowad_plugins.bench.models import DEFAULT_MODELS, MODEL_SPECS, check_model_names

SCHEMA_VERSION = 1
DEVICES = ("cpu", "cuda")
RUNNER_SCRIPT = Path(runner.__file__).resolve()


@dataclass
class BenchConfig:
    """What to run. Timing: ``warmup`` calls, then at least ``min_repeats`` calls and ``min_seconds`` per cell."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime", "openvino-fp32", "openvino-default"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    image_sizes: list[int] = field(default_factory=lambda: [256])
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 200
    min_seconds: float = 2.0
    epochs: int = 1
    train_batch_size: int = 8
    train_images: int = 32
    train: bool = True
    data_root: str | None = None
    category: str | None = None
    task_timeout_s: float = 1800.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter and the allowed values on bad input."""
        check_model_names(self.models)
        unknown = [backend for backend in self.backends if backend not in runner.BACKENDS]
        if unknown:
            msg = f"Unknown backends={unknown}; allowed: {list(runner.BACKENDS)}."
            raise ValueError(msg)
        unknown = [device for device in self.devices if device not in DEVICES]
        if unknown:
            msg = f"Unknown devices={unknown}; allowed: {list(DEVICES)}."
            raise ValueError(msg)
        for name in ("batch_sizes", "image_sizes"):
            values = getattr(self, name)
            if not values or any(value < 1 for value in values):
                msg = f"{name} must be a non-empty list of positive integers, got {values}."
                raise ValueError(msg)
        for name in ("threads", "min_repeats", "max_repeats", "epochs", "train_batch_size", "train_images"):
            if getattr(self, name) < 1:
                msg = f"{name} must be ≥ 1, got {getattr(self, name)}."
                raise ValueError(msg)
        if (self.data_root is None) != (self.category is None):
            msg = "data_root and category go together: give both (an MVTec-format dataset) or neither."
            raise ValueError(msg)
        if self.data_root is not None and not (Path(self.data_root) / self.category).is_dir():
            msg = f"data_root/category={Path(self.data_root) / self.category} is not a folder."
            raise ValueError(msg)


def quick_config(**overrides: Any) -> BenchConfig:
    """A grid that finishes in a few minutes on 2 CPU cores: 128 px, torch + ONNX Runtime, short timings."""
    settings: dict[str, Any] = {"models": ["CflowAD", "anomalib.Cflow"], "backends": ["torch", "onnxruntime"],
                                "batch_sizes": [1, 2], "image_sizes": [128], "warmup": 1, "min_repeats": 3,
                                "max_repeats": 20, "min_seconds": 0.3, "train_images": 8, "train_batch_size": 4}
    settings.update(overrides)
    return BenchConfig(**settings)


def run_task(task: dict[str, Any], work_dir: Path, timeout_s: float, threads: int) -> dict[str, Any]:
    """Run one task in a fresh Python process; its result, or ``{"error": ...}`` when it failed or died."""
    work_dir.mkdir(parents=True, exist_ok=True)
    task_path, result_path = work_dir / "task.json", work_dir / "result.json"
    result_path.unlink(missing_ok=True)
    task_path.write_text(json.dumps(task))
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    try:
        completed = subprocess.run([sys.executable, str(RUNNER_SCRIPT), str(task_path), str(result_path)],
                                   capture_output=True, text=True, timeout=timeout_s, env=environment, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"TimeoutExpired: task ran past {timeout_s:.0f} s"}
    if result_path.is_file():
        return json.loads(result_path.read_text())
    tail = (completed.stdout + completed.stderr)[-1500:]
    return {"error": f"process exited with code {completed.returncode} and no result: {tail}"}


def _cell_record(spec_name: str, backend: str, device: str, size: int, batch: int) -> dict[str, Any]:
    spec = MODEL_SPECS[spec_name]
    return {"model": spec_name, "family": spec.family, "ours": spec.ours, "backend": backend, "device": device,
            "image_size": size, "batch_size": batch}


def run_benchmark(config: BenchConfig, work_root: Path | None = None,
                  on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole grid; returns the result document (see ``report.RESULT_SCHEMA``).

    ``on_step(description)`` is called before each task (progress display); ``work_root`` keeps exported files
    (a temporary folder, removed afterwards, when ``None``).
    """
    import torch

    from flowad_plugins.bench.machine import machine_info

    config.validate()
    devices = [device for device in config.devices if device != "cuda" or torch.cuda.is_available()]
    skipped_devices = sorted(set(config.devices) - set(devices))
    temporary = None if work_root is not None else tempfile.TemporaryDirectory(prefix="flowad_bench_")
    root = Path(work_root if work_root is not None else temporary.name)
    step = on_step or (lambda _: None)
    models: dict[str, Any] = {}
    cells: list[dict[str, Any]] = []
    try:
        for name in config.models:
            spec = MODEL_SPECS[name]
            models[name] = {"family": spec.family, "ours": spec.ours, "settings": spec.settings,
                            "offline_weights": spec.offline_weights, "sizes": {}}
            for size in config.image_sizes:
                formats = sorted({runner.BACKEND_FORMATS[backend] for backend in config.backends})
                step(f"export {name} {size}px")
                export = run_task({"kind": "export", "model": name, "image_size": size, "formats": formats,
                                   "out_dir": str(root / name / str(size) / "export"),
                                   "work_dir": str(root / name / str(size)), "threads": config.threads,
                                   "data_root": config.data_root, "category": config.category},
                                  root / name / str(size) / "export_task", config.task_timeout_s, config.threads)
                entry = {"export": {key: export.get(key) for key in ("bytes", "seconds", "errors", "peak_rss_mb",
                                                                      "error")}}
                models[name]["parameters"] = export.get("parameters")
                for device in devices:
                    for backend in config.backends:
                        file_format = runner.BACKEND_FORMATS[backend]
                        for batch in config.batch_sizes:
                            cell = _cell_record(name, backend, device, size, batch)
                            cell.update({"parameters": export.get("parameters"),
                                         "file_format": file_format,
                                         "file_bytes": (export.get("bytes") or {}).get(file_format)})
                            file = (export.get("files") or {}).get(file_format)
                            if backend != "torch" and file is None:
                                reason = (export.get("errors") or {}).get(file_format) or export.get("error")
                                cell.update({"status": "error", "error": f"export to {file_format} failed: {reason}"})
                                cells.append(cell)
                                continue
                            step(f"{name} {backend} {device} {size}px b{batch}")
                            timing = run_task({"kind": "time", "model": name, "backend": backend, "device": device,
                                               "image_size": size, "batch_size": batch, "file": file,
                                               "threads": config.threads, "warmup": config.warmup,
                                               "min_repeats": config.min_repeats, "max_repeats": config.max_repeats,
                                               "min_seconds": config.min_seconds},
                                              root / "cells" / f"{name}_{backend}_{device}_{size}_{batch}",
                                              config.task_timeout_s, config.threads)
                            timing.pop("traceback", None)
                            cell.update(timing)
                            cell["status"] = "error" if "error" in timing else "ok"
                            cells.append(cell)
                if config.train:
                    step(f"train {name} {size}px")
                    train = run_task({"kind": "train", "model": name, "image_size": size, "device": devices[0],
                                      "epochs": config.epochs, "batch_size": config.train_batch_size,
                                      "train_images": config.train_images, "threads": config.threads,
                                      "data_root": config.data_root, "category": config.category,
                                      "work_dir": str(root / name / str(size) / "train")},
                                     root / name / str(size) / "train_task", config.task_timeout_s, config.threads)
                    train.pop("traceback", None)
                    entry["train"] = train
                models[name]["sizes"][str(size)] = entry
                # exported files can be large (anomalib's Csflow: 1.2 GB per format): drop them once timed
                shutil.rmtree(root / name / str(size) / "export", ignore_errors=True)
    finally:
        if temporary is not None:
            temporary.cleanup()
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(config.threads),
        "config": asdict(config),
        "skipped_devices": {device: "torch sees no CUDA device" for device in skipped_devices},
        "models": models,
        "cells": cells,
    }


def task_count(config: BenchConfig) -> int:
    """Number of subprocess tasks ``run_benchmark`` will start at most (for a progress bar)."""
    per_size = 1 + len(config.devices) * len(config.backends) * len(config.batch_sizes) + int(config.train)
    return len(config.models) * len(config.image_sizes) * per_size
