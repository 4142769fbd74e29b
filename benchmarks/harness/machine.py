"""What machine and software a benchmark ran on: CPU model and ISA flags, cores, RAM, GPU, versions, threads."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

ISA_FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512f")
VERSIONED_PACKAGES = ("torch", "anomalib", "openvino", "onnxruntime", "onnx", "nncf", "timm", "FrEIA",
                      "flowad-plugins")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_flags() -> dict[str, bool]:
    """Which of the instruction sets that decide OpenVINO's CPU precision this CPU has (/proc/cpuinfo flags).

    ``avx512_bf16``/``amx_bf16``: bf16 compute (OpenVINO's CPU default precision is then bf16); ``amx_int8``,
    ``avx512_vnni``/``avx_vnni``: int8 dot products; ``avx512f``: 512-bit vectors.
    """
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {flag: flag in flags for flag in ISA_FLAGS}


def openvino_cpu_capabilities() -> list[str] | None:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU plugin (e.g. FP32, BF16, INT8), or ``None``."""
    try:
        import openvino as ov

        return [str(value) for value in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception:
        return None


def physical_cores() -> int | None:
    """Physical core count (psutil), or ``None`` when unknown."""
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def total_ram_gib() -> float | None:
    """Installed RAM in GiB."""
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        return None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages whose speed matters here (``None`` = not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def gpu_info() -> dict[str, Any] | None:
    """CUDA device name and memory when torch sees one, else ``None``."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda}


def machine_info(threads: int) -> dict[str, Any]:
    """Everything needed to judge a figure: CPU, cores, RAM, GPU, OS, versions, load and the thread count used.

    The one machine record of ``benchmarks/``: every result file stores it (scripts may add their own keys).
    """
    return {
        "cpu": cpu_model(),
        "isa_flags": isa_flags(),
        "openvino_cpu_capabilities": openvino_cpu_capabilities(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "ram_gib": total_ram_gib(),
        "gpu": gpu_info(),
        "os": f"{platform.system()} {platform.release()}",
        "threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": package_versions(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
    }
