"""How much arithmetic each model does, and how fast this CPU does it: the bound behind the speed ratios.

Per pair (ours vs anomalib's built-in, the same settings as ``inference_speed.py``), at batch 1 and 256 px:
multiply-adds per image of the torch model's forward (convolutions and matrix products, counted with
``torch.utils.flop_counter``), the median wall time of that forward, each model alone in a fresh process (so none
inherits another's allocator state), the achieved rate (G multiply-adds/s) and the minor page faults per call.
Also the rate of one large float32 product (1024³ ``torch.mm``), the CPU's practical peak for dense matrix work.
Results: ``benchmarks/results/arithmetic.{json,md}``.

    python benchmarks/archive/arithmetic.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch
from rich.progress import track
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness
from harness.machine import cpu_model as cpu_name
from harness.models import build_benchmark_model, pair_of
from harness.timing import interleaved_wall_times, median_latencies_ms, median_ms

RESULTS = Path(__file__).resolve().parents[1] / "results"
PAIRS = ("cflow", "fastflow", "csflow")


def multiply_adds(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds of one ``model(images)`` call (convolutions and matrix products; elementwise ops excluded).

    Call the model once before: work it caches across calls is then not counted.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:  # not inference_mode: the counter's module tracker needs autograd views
        model(images)
    return counter.get_total_flops() // 2


def timed_forward(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> dict:
    """Median seconds per ``model(images)`` call and the minor page faults per call."""
    with torch.inference_mode():
        interleaved_wall_times([lambda: model(images)], warmup=3, repeats=0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        (times,) = interleaved_wall_times([lambda: model(images)], warmup=0, repeats=repeats)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"median_s": median_ms(times) / 1e3, "minor_faults_per_call": round(faults / repeats, 1)}


def matmul_rate(size: int = 1024, repeats: int = 20) -> float:
    """G multiply-adds/s of a ``size``³ float32 ``torch.mm`` (median of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    (latency,) = median_latencies_ms([lambda: torch.mm(a, b)], warmup=3, repeats=repeats)
    return size**3 / latency / 1e6


def measure_cell(pair: str, side: str, image_size: int, repeats: int) -> dict:
    """One model of one pair: multiply-adds, median ms and page faults of its batch-1 forward."""
    spec = pair_of(pair)[0 if side == "ours" else 1]
    model = build_benchmark_model(spec.name, image_size).model.eval()  # only this model is built in this process
    images = torch.rand(1, 3, image_size, image_size)
    with torch.inference_mode():
        model(images)  # one call first: one-time work (e.g. CflowAD's cached condition projection) is not counted
    macs = multiply_adds(model, images)
    timing = timed_forward(model, images, repeats)
    return {"pair": pair, "model": f"{spec.name}: {spec.settings}", "side": side, "multiply_adds": macs,
            "ms": round(1e3 * timing["median_s"], 2),
            "g_multiply_adds_per_s": round(macs / timing["median_s"] / 1e9, 1),
            "minor_faults_per_call": timing["minor_faults_per_call"]}


# The products of one CflowAD coupling block at batch 1 (efficientnet_lite0 blocks.2: 40 ch on 32×32 = 1024 fibers,
# blocks.4: 112 ch on 16×16 = 256 fibers; subnet hidden 2·(C/2 + 128)): (fibers, in, out) of the x₁ projection, the
# subnet's output layer and the channel mixing.
CFLOW_FIBER_PRODUCTS = ((1024, 20, 296), (1024, 296, 40), (1024, 40, 40), (256, 56, 368), (256, 368, 112),
                        (256, 112, 112))


def linear_rates(shapes: tuple[tuple[int, int, int], ...], repeats: int = 50) -> list[dict]:
    """G multiply-adds/s of ``F.linear`` (with bias) for each ``(rows, in, out)`` (median of ``repeats``)."""
    rates = []
    for rows, inputs, outputs in shapes:
        x, weight, bias = torch.randn(rows, inputs), torch.randn(outputs, inputs), torch.randn(outputs)
        (latency,) = median_latencies_ms([lambda: torch.nn.functional.linear(x, weight, bias)],  # noqa: B023
                                         warmup=3, repeats=repeats)
        rates.append({"shape": [rows, inputs, outputs],
                      "g_multiply_adds_per_s": round(rows * inputs * outputs / latency / 1e6, 1)})
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--cell", nargs=2, metavar=("PAIR", "SIDE"), default=None,
                        help="internal: measure one model in this process and print its row as JSON")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure_cell(*args.cell, args.image_size, args.repeats)))
        return

    rows = []
    cells = [(pair, side) for pair in PAIRS for side in ("ours", "anomalib")]
    for pair, side in track(cells, description="models, each in a fresh process"):
        command = [sys.executable, __file__, "--cell", pair, side, "--image-size", str(args.image_size),
                   "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    result = {
        "command": "python benchmarks/archive/arithmetic.py " + " ".join(sys.argv[1:]),
        "image_size": args.image_size,
        "batch_size": 1,
        "matmul_1024_g_multiply_adds_per_s": round(matmul_rate(), 1),
        "cflow_fiber_products": linear_rates(CFLOW_FIBER_PRODUCTS),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "arithmetic.json").write_text(json.dumps(result, indent=1) + "\n")
    machine = result["machine"]
    lines = [
        f"# Arithmetic per image and the rate it runs at ({args.image_size} px, batch 1, CPU)",
        "",
        f"Machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}. "
        f"Command: `{result['command']}`.",
        "",
        "Multiply-adds of the torch model's forward (convolutions and matrix products, `torch.utils.flop_counter`); "
        "median wall time, each model alone in a fresh process; minor page faults per call (`getrusage`). "
        f"A 1024³ float32 `torch.mm` runs at **{result['matmul_1024_g_multiply_adds_per_s']} G multiply-adds/s** here.",
        "",
        "| model | G multiply-adds | ms | G multiply-adds/s | minor faults per call |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {row['model']} | {row['multiply_adds'] / 1e9:.3f} | {row['ms']} | {row['g_multiply_adds_per_s']} | "
              f"{row['minor_faults_per_call']} |" for row in rows]
    lines += ["", "CflowAD's fiber products at batch 1 (`F.linear`, fibers × in → out): "
              + ", ".join(f"{a}×{b}→{c}: {rate['g_multiply_adds_per_s']} G/s"
                          for rate in result["cflow_fiber_products"] for a, b, c in [rate["shape"]]) + "."]
    (RESULTS / "arithmetic.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
