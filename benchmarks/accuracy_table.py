"""Bottle, tire and generated-data test accuracy of all six models under one protocol, with one command.

Every row is one ``benchmarks/evaluate.py`` run (its command is stored in the row's JSON):

- ours: the shipped ``configs/*_efficientnet_lite0.yaml`` (model settings, epochs, the class's input size);
- anomalib's Cflow, Fastflow and Csflow: the same backbone (efficientnet_lite0; Cflow on the same layers
  ``[blocks.2, blocks.4]``), otherwise anomalib's defaults, input 256 px, the epochs of our config of the same
  family;
- all: training capped at ``--max-minutes`` (5: the budget a user accepts on 2 CPU cores), validation = 20 % of
  train/good + synthetic anomalies (seed 0), thresholds from validation, the test split read once at the end;
- the generated category is ``flowad_plugins.data.SyntheticAD``'s ``object`` (256 px), written by each run itself.

A row whose JSON already holds the same command is kept (``--force`` reruns it). Writes
``benchmarks/results/<category>/<row>.json`` and ``benchmarks/results/accuracy_table.md``::

    OMP_NUM_THREADS=2 python benchmarks/accuracy_table.py
    OMP_NUM_THREADS=2 python benchmarks/accuracy_table.py --categories tire --rows cflow_ad anomalib_cflow
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness.report import metric_cell

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# relative to the repository; the generated data is written by evaluate.py itself
ROOTS: dict[str, str | None] = {"bottle": "../shared/data/mvtec_ad", "tire": "../shared/data/mvtec_3d_rgb",
                                "generated": None}
LITE0 = "backbone=efficientnet_lite0"
# name: (label, arguments before --root, epochs, arguments after --max-minutes)
ROWS: dict[str, tuple[str, list[str], list[str], list[str]]] = {
    "cflow_ad": ("CflowAD (ours)", ["--config", "configs/cflow_ad_efficientnet_lite0.yaml"], [], []),
    "fastflow": ("FastFlow (ours)", ["--config", "configs/fastflow_efficientnet_lite0.yaml"], [], []),
    "csflow": ("CSFlow (ours)", ["--config", "configs/csflow_efficientnet_lite0.yaml"], [], ["--batch-size", "8"]),
    "anomalib_cflow": ("anomalib Cflow", ["--model", "anomalib.Cflow"], ["--epochs", "10"],
                       ["--init", LITE0, "layers=[blocks.2,blocks.4]"]),
    "anomalib_fastflow": ("anomalib Fastflow", ["--model", "anomalib.Fastflow"], ["--epochs", "30"],
                          ["--init", LITE0]),
    "anomalib_csflow": ("anomalib Csflow", ["--model", "anomalib.Csflow"], ["--epochs", "8"],
                        ["--batch-size", "8", "--init", LITE0]),
}


def row_arguments(name: str, category: str, max_minutes: float) -> list[str]:
    """``evaluate.py``'s arguments for row ``name`` on ``category`` (the bottle rows also save maps for the figure)."""
    _, head, epochs, tail = ROWS[name]
    out = f"benchmarks/results/{category}/{name}.json"
    maps = ["--save-maps", f"benchmarks/results/bottle/maps/{name}.npz"] if category == "bottle" else []
    root = [] if ROOTS[category] is None else ["--root", ROOTS[category]]
    return [*head, *root, "--category", category, *epochs, "--max-minutes", f"{max_minutes:g}",
            *tail, "--out", out, *maps]


def command_of(arguments: list[str]) -> str:
    return "python benchmarks/evaluate.py " + " ".join(arguments)


def _triple(path: Path) -> str:
    """``image AUROC / pixel AUROC / pixel AUPRO`` of a row's JSON, ``–`` when it is missing."""
    if not path.is_file():
        return "–"
    test = json.loads(path.read_text()).get("test_metrics", {})
    return " / ".join(metric_cell(test.get(key)) for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"))


def readme_rows(categories: list[str] | None = None) -> list[str]:
    """The README's compact table body: one line per model, ``image / pixel / AUPRO`` per category."""
    categories = categories or list(ROOTS)
    return [f"| {label} | " + " | ".join(_triple(RESULTS / category / f"{name}.json") for category in categories)
            + " |" for name, (label, *_) in ROWS.items()]


def markdown(categories: list[str], command: str) -> str:
    lines = ["# Test accuracy of the six models, one protocol", "", f"`{command}`: each row's own command is in its "
             "JSON (`command`). Same backbone (efficientnet_lite0, offline ImageNet weights), training capped at the "
             "same minutes, validation = 20 % of train/good + synthetic anomalies, the test split read once.", ""]
    for category in categories:
        lines += [f"## {category}", "", "| model | input px | epochs run (of) | train s | image AUROC | pixel AUROC | "
                  "pixel AUPRO | CPU | file |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for name, (label, *_) in ROWS.items():
            path = RESULTS / category / f"{name}.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            test = result.get("test_metrics", {})
            epochs = f"{result.get('epochs_run', result['epochs'])} ({result['epochs']})"
            lines.append(f"| {label} | {result['image_size']} | {epochs} | {result['train_seconds']:.0f} | "
                         f"{metric_cell(test.get('image_AUROC'))} | {metric_cell(test.get('pixel_AUROC'))} | "
                         f"{metric_cell(test.get('pixel_AUPRO'))} | {result['machine']['cpu']} | "
                         f"`benchmarks/results/{category}/{name}.json` |")
        lines.append("")
    lines += ["Compact (the README's table), image AUROC / pixel AUROC / pixel AUPRO:", "",
              "| model | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories),
              *readme_rows(categories), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=list(ROOTS), choices=list(ROOTS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--max-minutes", type=float, default=5.0, help="training budget of every row")
    parser.add_argument("--force", action="store_true", help="rerun rows whose JSON already holds their command")
    args = parser.parse_args()
    missing = [c for c in args.categories if ROOTS[c] is not None and not (REPO / ROOTS[c]).is_dir()]
    if missing:
        sys.exit(f"--categories {missing}: no data under {[ROOTS[c] for c in missing]} (relative to the repository)."
                 " Run the other categories with --categories.")
    todo = [(category, name) for category in args.categories for name in args.rows]
    for step, (category, name) in enumerate(todo, start=1):
        arguments = row_arguments(name, category, args.max_minutes)
        path = RESULTS / category / f"{name}.json"
        if not args.force and path.is_file() and json.loads(path.read_text()).get("command") == command_of(arguments):
            print(f"[{step}/{len(todo)}] {ROWS[name][0]} on {category}: kept ({path.relative_to(REPO)})", flush=True)
            continue
        print(f"[{step}/{len(todo)}] {ROWS[name][0]} on {category}: {command_of(arguments)}", flush=True)
        subprocess.run([sys.executable, "benchmarks/evaluate.py", *arguments], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    shown = "python benchmarks/accuracy_table.py" + "".join(
        f" --{flag} {' '.join(values)}" for flag, values, default in (
            ("categories", args.categories, list(ROOTS)), ("rows", args.rows, list(ROWS))) if values != default)
    text = markdown(args.categories, shown)
    (RESULTS / "accuracy_table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
