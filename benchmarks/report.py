"""Print the README's results tables from the committed JSON files in ``benchmarks/results/``.

    python benchmarks/report.py > results.md   # then paste into README.md "Results"
    python benchmarks/report.py --edge benchmarks/results/bench/edge.json   # the README's edge table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.report import metric_cell

RESULTS = Path(__file__).resolve().parent / "results"

ACCURACY_ROWS = [
    ("CflowAD (ours)", "bottle/cflow_ad.json"),
    ("FastFlow (ours)", "bottle/fastflow.json"),
    ("CSFlow (ours)", "bottle/csflow.json"),
    ("anomalib Cflow", "bottle/anomalib_cflow.json"),
    ("anomalib Fastflow", "bottle/anomalib_fastflow.json"),
    ("anomalib Csflow", "bottle/anomalib_csflow.json"),
]
FPS_FILE = RESULTS / "bottle" / "fps.json"  # benchmarks/bottle_fps.py: all six timed interleaved, same load
FPS = json.loads(FPS_FILE.read_text())["images_per_second"] if FPS_FILE.is_file() else {}
SPEED_FILES = ["cflow_cpu_speed.json", "fastflow_cpu_speed.json", "csflow_cpu_speed.json"]


def accuracy_table() -> list[str]:
    """The six-row bottle table: test metrics, train time and torch CPU throughput of the trained model."""
    lines = [
        "| model | input px | epochs | train s | image AUROC | pixel AUROC | pixel AUPRO | FPS (torch CPU, batch 8) | "
        "map blur σ (chosen on val) | file |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, name in ACCURACY_ROWS:
        path = RESULTS / name
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        test = result.get("test_metrics", {})
        fps = FPS.get(Path(name).stem, "–")
        epochs = result.get("epochs", "–")
        if "epochs_run" in result and result["epochs_run"] < result["epochs"]:  # stopped by the time budget
            epochs = f"{result['epochs_run']} (of {epochs}; {result['max_minutes']:g}-min budget)"
        lines.append(
            f"| {label} | {result.get('image_size', '–')} | {epochs} | {result.get('train_seconds', '–')} | "
            + " | ".join(metric_cell(test.get(key)) for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")) + " | "
            f"{fps} | {result.get('chosen_blur_sigma', '–')} | `benchmarks/results/{name}` |"
        )
    return lines


def reproduce_commands() -> list[str]:
    """The command stored in each result file of the accuracy table."""
    lines = []
    for _, name in ACCURACY_ROWS:
        path = RESULTS / name
        if path.is_file() and "command" in (result := json.loads(path.read_text())):
            lines.append(result["command"])
    if not lines:
        return []
    return ["```bash", *lines, "python benchmarks/bottle_fps.py", "python benchmarks/maps_figure.py", "```"]


def speed_table() -> list[str]:
    lines = [
        "| pair | batch | ours ms | anomalib ms | speed-up (ours/anomalib) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in SPEED_FILES:
        path = RESULTS / name
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for row in result["rows"]:
            lines.append(
                f"| {result['pair']} | {row['batch_size']} | {row['ours_ms']} | {row['anomalib_ms']} | "
                f"**{row['speedup']}×** |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge", type=Path, default=None, metavar="RESULT_JSON",
                        help="print the edge table (markdown) of a benchmark.py result instead")
    args = parser.parse_args(argv)
    if args.edge is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from harness.edge_report import edge_table

        print("\n".join(edge_table(json.loads(args.edge.read_text()))))
        return
    print("\n".join(["### Accuracy on MVTec AD bottle (test set, CPU, input size per row)", "", *accuracy_table(), "",
                     *reproduce_commands(), "",
                     "### Torch CPU inference speed, side by side with anomalib", "", *speed_table()]))


if __name__ == "__main__":
    main()
