"""Torch CPU throughput (img/s, batch 8) of the six models in the bottle table, measured interleaved.

Each model is timed at the input size of its table row (``image_size`` of its result JSON: 256 px, CS-Flow 512 px).

The models are built exactly as ``benchmarks/evaluate.py`` builds them (same backbone, layers, flows); flow
weights don't change the work, so they stay as initialised. Every round times each model once, in turn, so
all six see the same machine load; the figure is the median over rounds. Writes
``benchmarks/results/bottle/fps.json``, which ``benchmarks/report.py`` reads for the table's FPS column.

    python benchmarks/bottle_fps.py
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
from harness.machine import cpu_model as cpu_name
from harness.models import build_model
from harness.timing import interleaved_wall_times
from rich.progress import Progress

LITE0 = {"backbone": "efficientnet_lite0"}
MODELS = {
    "cflow_ad": ("CflowAD", {**LITE0, "layers": ["blocks.2", "blocks.4"]}),
    "fastflow": ("FastFlow", {**LITE0, "layers": ["blocks.1", "blocks.2", "blocks.4"]}),
    "csflow": ("CSFlow", LITE0),
    "anomalib_cflow": ("anomalib.Cflow", {**LITE0, "layers": ["blocks.2", "blocks.4"]}),
    "anomalib_fastflow": ("anomalib.Fastflow", LITE0),
    "anomalib_csflow": ("anomalib.Csflow", LITE0),
}


RESULTS = Path(__file__).resolve().parent / "results" / "bottle"


def table_image_size(key: str) -> int:
    """Input size of the model's bottle-table row (256 when it has no result yet)."""
    path = RESULTS / f"{key}.json"
    return int(json.loads(path.read_text()).get("image_size", 256)) if path.is_file() else 256


def main(batch_size: int = 8, rounds: int = 7) -> None:
    torch.manual_seed(0)
    sizes = {key: table_image_size(key) for key in MODELS}
    models = {key: build_model(name, dict(init), image_size=sizes[key]).model.eval()
              for key, (name, init) in MODELS.items()}
    inputs = {key: torch.rand(batch_size, 3, sizes[key], sizes[key]) for key in MODELS}
    loads = []
    with torch.inference_mode(), Progress() as progress:
        bar = progress.add_task("timing six models", total=rounds)

        def next_round() -> None:
            loads.append(os.getloadavg()[0])
            progress.advance(bar)

        per_model = interleaved_wall_times(
            [lambda key=key, model=model: model(inputs[key]) for key, model in models.items()], warmup=1,
            repeats=rounds, before_round=next_round)
    times = dict(zip(models, per_model, strict=True))
    result = {
        "batch_size": batch_size,
        "image_sizes": sizes,
        "rounds": rounds,
        "images_per_second": {key: round(batch_size / statistics.median(t), 1) for key, t in times.items()},
        "median_ms": {key: round(1000 * statistics.median(t), 1) for key, t in times.items()},
        "raw_seconds": times,
        "load_average_1min": loads,
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "command": "python benchmarks/bottle_fps.py",
    }
    out = RESULTS / "fps.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["images_per_second"], indent=1))


if __name__ == "__main__":
    main()
