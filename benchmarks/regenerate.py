r"""Regenerate every number README.md and docs/ report: run the measurement scripts, then rewrite the copied tables.

Each step is one command of a script in ``benchmarks/``; it writes the result files named in its ``writes`` and those
files are what the README and docs cite. Steps that need trained checkpoints take them from the ``checkpoints``
group (``decisions.py``, written under ``--work-dir``, never committed). After the steps, the tables copied into
README.md and docs/ (between their ``<!-- … -->`` markers, ``harness.tables``) are rewritten from the new results.
Prose figures around them are not: ``--dry-run`` lists which document cites each file, to re-read after a run.

    python benchmarks/regenerate.py --dry-run                 # what would run, in order, and what each writes
    OMP_NUM_THREADS=2 python benchmarks/regenerate.py         # everything: several hours on 2 CPU cores
    OMP_NUM_THREADS=2 python benchmarks/regenerate.py --only speed edge
    python benchmarks/regenerate.py --tables-only             # rewrite the copied tables from the committed results
    python benchmarks/regenerate.py --check-tables            # exit 1 if a copied table differs from its results

Not regenerated: the evidence files of docs/selection.md (records of a choice made once, each holding the command
that made it) and ``benchmarks/archive/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: harness and the scripts
from harness.tables import TABLES, rewrite_tables, stale_tables

REPO = Path(__file__).resolve().parents[1]
MVTEC_AD = "../shared/data/mvtec_ad"
MVTEC_3D = "../shared/data/mvtec_3d_rgb"
R = "benchmarks/results"


@dataclass(frozen=True)
class Step:
    """One script run: its group, arguments after ``python``, the result files it writes and who cites them."""

    group: str
    arguments: tuple[str, ...]
    writes: tuple[str, ...]
    cited_by: tuple[str, ...] = ()


def steps(work_dir: Path) -> list[Step]:
    """Every step in run order; checkpoints land in ``work_dir/checkpoints/<Model>_<category>.ckpt``."""
    ckpt = work_dir / "checkpoints"
    models = ("CflowAD", "FastFlow", "CSFlow")

    def per_model(category: str, folder_only: bool = False) -> tuple[str, ...]:
        return tuple(f"{m}={ckpt}" if folder_only else f"{m}={ckpt / f'{m}_{category}.ckpt'}" for m in models)

    return [
        Step("accuracy", ("benchmarks/accuracy_table.py", "--force"),
             (f"{R}/<bottle|tire|generated>/<row>.json", f"{R}/accuracy_table.md"),
             ("README.md (accuracy table)", "docs/results.md")),
        Step("accuracy", ("benchmarks/maps_figure.py",), (f"{R}/bottle/anomaly_maps.png",),
             ("README.md", "docs/results.md")),
        Step("checkpoints", ("benchmarks/decisions.py", "--save-checkpoints", str(ckpt)),
             (f"{R}/decisions.json", f"{R}/decisions.md", f"{ckpt}/<Model>_<category>.ckpt|.pt"),
             ("README.md (decisions table)", "docs/selection.md", "docs/thresholds.md")),
        Step("tire", ("benchmarks/checkpoint_maps.py", "--category", "tire", "--checkpoint",
                      *per_model("tire", folder_only=True), "--out", f"{R}/tire/anomaly_maps.png"),
             (f"{R}/tire/anomaly_maps.png",), ("README.md", "docs/results.md")),
        Step("export", ("benchmarks/default_precision.py", "--ckpt", *per_model("bottle"),
                        *(f"anomalib.{m}={ckpt / f'anomalib.{m}_bottle.pt'}" for m in ("Cflow", "Fastflow"))),
             (f"{R}/default_precision.json", f"{R}/default_precision.md"), ("README.md", "docs/export.md (table)")),
        Step("export", ("benchmarks/default_precision.py", "--root", MVTEC_3D, "--category", "tire", "--out",
                        f"{R}/default_precision_tire", "--ckpt", *per_model("tire")),
             (f"{R}/default_precision_tire.md",), ("docs/export.md",)),
        Step("export", ("benchmarks/export_parity.py", "--ckpt", *per_model("bottle")), (f"{R}/export_parity.md",),
             ("README.md", "docs/export.md")),
        Step("speed", ("benchmarks/benchmark.py", "--data-root", MVTEC_AD, "--category", "bottle"),
             (f"{R}/bench/cpu.json", f"{R}/bench/cpu.md", f"{R}/bench/cpu.png"), ("README.md", "docs/benchmarks.md")),
        Step("speed", ("benchmarks/benchmark.py", "--backends", "torch", "--no-train", "--data-root", MVTEC_AD,
                       "--category", "bottle", "--name", "cpu_torch", "--batch-sizes", "1", "8", "32"),
             (f"{R}/bench/cpu_torch.json", f"{R}/bench/cpu_torch.md"), ("README.md", "docs/benchmarks.md")),
        Step("speed", ("benchmarks/inference_speed.py", "--pair", "cflow", "--repeats", "21"),
             (f"{R}/cflow_cpu_speed.md",), ("docs/benchmarks.md",)),
        Step("edge", ("benchmarks/edge_pairs.py",), (f"{R}/edge_pairs.json", f"{R}/edge_pairs.md"),
             ("README.md (edge table)", "docs/export.md", "docs/results.md")),
        Step("edge", ("benchmarks/benchmark.py", "--edge", "--name", "edge"),
             (f"{R}/bench/edge.json", f"{R}/bench/edge_profile.md"), ("docs/export.md (per-op profiles)",)),
        Step("edge", ("benchmarks/edge_runtime.py",), (f"{R}/edge_runtime.md",), ("README.md",)),
        Step("training", ("benchmarks/training_epochs.py", "--config", "configs/csflow_efficientnet_lite0.yaml",
                          "--batch-size", "8", "--epochs", "3", "--out", f"{R}/training_epochs_csflow.json"),
             (f"{R}/training_epochs_csflow.md",), ("README.md", "docs/results.md")),
        Step("checkpoints", ("benchmarks/readme_recipe.py",), (f"{R}/readme_recipe.json", f"{R}/readme_recipe.md"),
             ("README.md", "docs/thresholds.md")),
        Step("scale-out", ("benchmarks/large_images.py",), (f"{R}/large_images_cpu.md",), ("docs/scale_out.md",)),
        Step("scale-out", ("benchmarks/mixed_precision.py", "--models", *models), (f"{R}/bf16_summary.md",),
             ("docs/scale_out.md",)),
    ]


GROUPS = ("accuracy", "checkpoints", "tire", "export", "speed", "edge", "training", "scale-out")


def selected(all_steps: list[Step], only: list[str] | None) -> list[Step]:
    """The steps of the groups in ``only`` (all when ``None``); a group that needs checkpoints brings their step."""
    if only is None:
        return all_steps
    wanted = set(only) | ({"checkpoints"} if {"tire", "export"} & set(only) else set())
    return [step for step in all_steps if step.group in wanted]


def describe(step: Step) -> str:
    lines = [f"[{step.group}] python {' '.join(step.arguments)}", f"    writes: {', '.join(step.writes)}"]
    if step.cited_by:
        lines.append(f"    cited by: {', '.join(step.cited_by)}")
    return "\n".join(lines)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the steps and the tables, run nothing")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=None, metavar="GROUP",
                        help=f"run these groups only (allowed: {', '.join(GROUPS)})")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/work"),
                        help="checkpoints and scratch files, relative to the repository (not committed)")
    tables = parser.add_mutually_exclusive_group()
    tables.add_argument("--tables-only", action="store_true", help="rewrite the copied tables, run no step")
    tables.add_argument("--check-tables", action="store_true",
                        help="exit 1 when a copied table differs from the committed results, change nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    if args.check_tables:
        stale = stale_tables()
        print("copied tables match the results" if not stale else f"stale tables: {', '.join(stale)}")
        return 1 if stale else 0
    todo = [] if args.tables_only else selected(steps(args.work_dir), args.only)
    if args.dry_run:
        print("\n".join(describe(step) for step in todo))
        print("then rewrite the copied tables: " + "; ".join(f"{t.document} ({t.name})" for t in TABLES))
        return 0
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for index, step in enumerate(todo, start=1):
        print(f"[{index}/{len(todo)}] {describe(step)}", flush=True)
        subprocess.run([sys.executable, *step.arguments], cwd=REPO, env=environment, check=True)
    changed = rewrite_tables()
    print("rewrote tables: " + (", ".join(changed) if changed else "none changed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
