"""The benchmark grid and its driver: models × parts × backends × input sizes × devices × batch sizes.

Every task runs in a fresh subprocess (``runner.py``) so that peak RSS is the cell's own and a crash or a backend
that cannot load a model becomes an error string in that cell, not the end of the run. Per model and input size:
one export task (torch state dict, ONNX, OpenVINO IR; whole model and, with ``parts`` including ``backbone``, the
backbone alone), one timing task per (part, backend, device, batch size), one training task (time per epoch;
accuracy when a dataset is given), and with ``profile`` one per-op OpenVINO profile per (part, backend, batch).
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

from harness import runner
from harness.models import DEFAULT_MODELS, MODEL_SPECS, check_model_names

SCHEMA_VERSION = 2
DEVICES = ("cpu", "cuda")
PARTS = ("model", "backbone")
RUNNER_SCRIPT = Path(runner.__file__).resolve()


@dataclass
class BenchConfig:
    """What to run. Timing: ``warmup`` calls, then at least ``min_repeats`` calls and ``min_seconds`` per cell."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime", "openvino-fp32", "openvino-default"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    image_sizes: list[int] = field(default_factory=lambda: [256])
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    parts: list[str] = field(default_factory=lambda: ["model"])
    profile: bool = False
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
        unknown = [part for part in self.parts if part not in PARTS]
        if unknown or "model" not in self.parts:
            msg = f"parts={self.parts} must include 'model'; allowed: {list(PARTS)}."
            raise ValueError(msg)
        if self.profile and not any(backend.startswith("openvino") for backend in self.backends):
            msg = f"profile=True profiles OpenVINO cells: backends={self.backends} has none."
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


def edge_config(**overrides: Any) -> BenchConfig:
    """The edge grid: six models × (whole, backbone) × OpenVINO default / f32 / INT8 × batch 1 and 8, 256 px, CPU."""
    settings: dict[str, Any] = {"backends": ["openvino-default", "openvino-fp32", "openvino-int8"],
                                "parts": list(PARTS), "batch_sizes": [1, 8], "image_sizes": [256], "train": False,
                                "profile": True}
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


def _cell_record(spec_name: str, part: str, backend: str, device: str, size: int, batch: int) -> dict[str, Any]:
    spec = MODEL_SPECS[spec_name]
    return {"model": spec_name, "family": spec.family, "ours": spec.ours, "part": part, "backend": backend,
            "device": device, "image_size": size, "batch_size": batch}


def run_benchmark(config: BenchConfig, work_root: Path | None = None,
                  on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the whole grid; returns the result document (see ``report.RESULT_SCHEMA``).

    ``on_step(description)`` is called before each task (progress display); ``work_root`` keeps exported files
    (a temporary folder, removed afterwards, when ``None``).
    """
    import torch

    from harness.machine import machine_info

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
            models[name] = {"family": spec.family, "ours": spec.ours, "settings": spec.settings, "init": spec.init,
                            "sizes": {}}
            for size in config.image_sizes:
                work = root / name / str(size)
                formats = sorted({runner.BACKEND_FORMATS[backend] for backend in config.backends})
                step(f"export {name} {size}px")
                export = run_task({"kind": "export", "model": name, "image_size": size, "formats": formats,
                                   "parts": config.parts, "out_dir": str(work / "export"), "work_dir": str(work),
                                   "threads": config.threads, "data_root": config.data_root,
                                   "category": config.category},
                                  work / "export_task", config.task_timeout_s, config.threads)
                parts = export.get("parts") or {}
                entry: dict[str, Any] = {"export": {
                    part: {key: (parts.get(part) or {}).get(key) for key in ("bytes", "seconds", "errors",
                                                                             "multiply_adds_per_image")}
                    for part in config.parts}, "export_error": export.get("error"),
                    "export_peak_rss_mb": export.get("peak_rss_mb"), "profiles": {}}
                models[name]["parameters"] = export.get("parameters")
                for part, device, backend, batch in _cell_keys(config, devices):
                    exported = parts.get(part) or {}
                    file_format = runner.BACKEND_FORMATS[backend]
                    cell = _cell_record(name, part, backend, device, size, batch)
                    cell.update({"parameters": export.get("parameters"), "file_format": file_format,
                                 "file_bytes": (exported.get("bytes") or {}).get(file_format),
                                 "multiply_adds_per_image": exported.get("multiply_adds_per_image")})
                    file = (exported.get("files") or {}).get(file_format)
                    if backend != "torch" and file is None:
                        reason = (exported.get("errors") or {}).get(file_format) or export.get("error")
                        cell.update({"status": "error", "error": f"export to {file_format} failed: {reason}"})
                        cells.append(cell)
                        continue
                    step(f"{name} {part} {backend} {device} {size}px b{batch}")
                    task = {"kind": "time", "model": name, "part": part, "backend": backend, "device": device,
                            "image_size": size, "batch_size": batch, "file": file, "threads": config.threads,
                            "warmup": config.warmup, "min_repeats": config.min_repeats,
                            "max_repeats": config.max_repeats, "min_seconds": config.min_seconds}
                    cell_dir = root / "cells" / f"{name}_{part}_{backend}_{device}_{size}_{batch}"
                    timing = run_task(task, cell_dir, config.task_timeout_s, config.threads)
                    timing.pop("traceback", None)
                    cell.update(timing)
                    cell["status"] = "error" if "error" in timing else "ok"
                    cells.append(cell)
                    if config.profile and backend.startswith("openvino") and device == "cpu":
                        step(f"profile {name} {part} {backend} b{batch}")
                        profile = run_task({**task, "kind": "profile"}, cell_dir / "profile", config.task_timeout_s,
                                           config.threads)
                        profile.pop("traceback", None)
                        entry["profiles"][f"{part}/{backend}/b{batch}"] = profile
                if config.train:
                    step(f"train {name} {size}px")
                    train = run_task({"kind": "train", "model": name, "image_size": size, "device": devices[0],
                                      "epochs": config.epochs, "batch_size": config.train_batch_size,
                                      "train_images": config.train_images, "threads": config.threads,
                                      "data_root": config.data_root, "category": config.category,
                                      "work_dir": str(work / "train")},
                                     work / "train_task", config.task_timeout_s, config.threads)
                    train.pop("traceback", None)
                    entry["train"] = train
                models[name]["sizes"][str(size)] = entry
                # exported files can be large: drop them once timed
                shutil.rmtree(work / "export", ignore_errors=True)
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


def _cell_keys(config: BenchConfig, devices: list[str]) -> list[tuple[str, str, str, int]]:
    return [(part, device, backend, batch) for part in config.parts for device in devices
            for backend in config.backends for batch in config.batch_sizes]


def task_count(config: BenchConfig) -> int:
    """Number of subprocess tasks ``run_benchmark`` will start at most (for a progress bar)."""
    cells = len(_cell_keys(config, config.devices))
    profiles = len([key for key in _cell_keys(config, ["cpu"]) if key[2].startswith("openvino")]) * config.profile
    return len(config.models) * len(config.image_sizes) * (1 + cells + profiles + int(config.train))
