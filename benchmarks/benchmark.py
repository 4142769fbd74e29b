r"""Benchmark our flow models against anomalib's: speed, memory, size, training time and accuracy per backend.

Grid: models × parts (whole model; backbone alone) × backends (torch eager, ONNX Runtime, OpenVINO FP32 / default
precision / FP16 / INT8) × input sizes × devices (CPU; CUDA when present) × batch sizes. Each cell runs in a fresh
process; a backend that fails records its error in the cell. Writes ``<out>/<name>.json`` (machine and ISA flags,
versions, every raw timing, multiply-adds), ``<name>.md``, ``<name>.png`` (accuracy vs img/s, marker area = peak
RSS), ``<name>_readme.md`` (the README section), ``<name>_edge.md`` (ours ÷ anomalib, ours ÷ backbone,
multiply-add rates) and with ``--profile`` ``<name>_profile.{json,md}`` (OpenVINO per-op time), and prints the
ratios.

    # the edge grid: six models, whole + backbone, OpenVINO default / f32 / INT8, batch 1 and 8, per-op profile
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/benchmark.py --edge --name edge

    # the committed CPU results (on an otherwise idle machine, so nothing else competes for the cores)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/benchmark.py \
        --data-root ../shared/data/mvtec_ad --category bottle
    # a few minutes on 2 cores: CflowAD vs anomalib's Cflow, 128 px, torch + ONNX Runtime
    .venv/bin/python benchmarks/benchmark.py --quick --out-dir bench_quick
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from harness.edge_report import edge_table, print_edge_ratios, profile_table, profiles
from harness.grid import PARTS, BenchConfig, edge_config, quick_config, run_benchmark, task_count
from harness.models import MODEL_SPECS
from harness.report import (
    compute_ratios,
    markdown_report,
    plot,
    print_ratios,
    readme_section,
    validate_result,
)
from harness.runner import BACKENDS
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small grid (CflowAD vs anomalib.Cflow, 128 px, torch + onnxruntime, short timings); "
                             "other options still override it")
    parser.add_argument("--edge", action="store_true",
                        help="edge grid: whole model and backbone alone, OpenVINO default/f32/INT8, batch 1 and 8, "
                             "256 px, per-op profile, no training; other options still override it")
    parser.add_argument("--models", nargs="+", choices=list(MODEL_SPECS), default=None)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=None,
                        help="whole model, and the backbone alone exported the same way")
    parser.add_argument("--profile", action="store_true", help="also a per-op OpenVINO profile per OpenVINO cell")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=None)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--image-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                        help="default: cpu, plus cuda when torch sees a GPU")
    parser.add_argument("--threads", type=int, default=None, help=f"CPU threads per cell (default {defaults.threads})")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--min-repeats", type=int, default=None)
    parser.add_argument("--min-seconds", type=float, default=None)
    parser.add_argument("--max-repeats", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per model")
    parser.add_argument("--no-train", action="store_true", help="skip the training-time (and accuracy) tasks")
    parser.add_argument("--data-root", default=None, help="MVTec-format root; with --category adds accuracy")
    parser.add_argument("--category", default=None)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: cpu, or cuda with a GPU)")
    parser.add_argument("--report-only", type=Path, default=None, metavar="RESULT_JSON",
                        help="rewrite the markdown, README section and plot of an existing result JSON (no runs)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> BenchConfig:
    """The run's configuration: the default (or quick) grid with the given options applied."""
    overrides = {key: value for key, value in {
        "models": args.models, "backends": args.backends, "batch_sizes": args.batch_sizes,
        "image_sizes": args.image_sizes, "devices": args.devices, "parts": args.parts,
        "max_repeats": args.max_repeats, "threads": args.threads, "warmup": args.warmup,
        "min_repeats": args.min_repeats, "min_seconds": args.min_seconds, "epochs": args.epochs,
        "data_root": str(Path(args.data_root).resolve()) if args.data_root else None, "category": args.category,
    }.items() if value is not None}
    if args.no_train:
        overrides["train"] = False
    if args.profile:
        overrides["profile"] = True
    if "devices" not in overrides and not args.edge:  # the edge grid is OpenVINO on CPU
        import torch

        overrides["devices"] = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if args.quick and args.edge:
        msg = "--quick and --edge are two different presets: give one of them."
        raise SystemExit(msg)
    preset = quick_config if args.quick else edge_config if args.edge else BenchConfig
    config = preset(**overrides)
    config.validate()
    return config


def write_outputs(result: dict, out_dir: Path, name: str) -> None:
    """``<name>.json``, ``.png``, ``.md`` and ``_readme.md`` in ``out_dir``; then check the schema."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    validate_result(result)
    plot(result, plot_path)
    (out_dir / f"{name}.md").write_text(markdown_report(result) + f"\n![accuracy vs throughput]({plot_path.name})\n")

    def shown(path: Path) -> str:
        return str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path)

    (out_dir / f"{name}_readme.md").write_text(readme_section(result, shown(json_path), shown(plot_path)))
    (out_dir / f"{name}_edge.md").write_text("\n".join(edge_table(result)) + "\n")
    if result["config"].get("profile"):
        (out_dir / f"{name}_profile.json").write_text(json.dumps(profiles(result), indent=1) + "\n")
        (out_dir / f"{name}_profile.md").write_text("\n".join(profile_table(result)) + "\n")
    print(print_ratios(result))
    print(print_edge_ratios(result))
    failed = [cell for cell in result["cells"] if cell["status"] != "ok"]
    print(f"{len(result['cells']) - len(failed)}/{len(result['cells'])} cells ok; results in {shown(out_dir)}/{name}.*")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        result = json.loads(args.report_only.read_text())
        result["ratios"] = compute_ratios(result)
        write_outputs(result, args.report_only.parent, args.report_only.stem)
        return result
    config = build_config(args)
    command = shlex.join(["python", "benchmarks/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    name = args.name or ("cuda" if "cuda" in config.devices else "cpu")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False) as progress:
        bar = progress.add_task("benchmark", total=task_count(config))
        started = [False]

        def on_step(description: str) -> None:
            if started[0]:
                progress.advance(bar)
            started[0] = True
            progress.update(bar, description=description)

        result = run_benchmark(config, on_step=on_step)
        progress.update(bar, completed=task_count(config), description="done")
    result["command"] = command
    result["ratios"] = compute_ratios(result)
    write_outputs(result, args.out_dir, name)
    return result


if __name__ == "__main__":
    main()
