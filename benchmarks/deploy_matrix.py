"""Does every shipped config deploy? Export × compression × precision × batch × runtime, against torch FP32.

For every config in ``configs/`` the model it ships is built (ImageNet weights where they install offline, else
random ones: deployability does not depend on the weights), exported with ``to_openvino`` at each documented
compression (FP32, FP16, INT8 flow-head weights), and each IR is compiled with no configuration (the CPU's default
precision: bf16 on AVX512-BF16/AMX) and with ``INFERENCE_PRECISION_HINT=f32``, in anomalib's ``OpenVINOInferencer``
and in ``EdgeModel`` (``flowad-predict``), and called at batch 1 and 8 on generated images (half normal, half with
defects). Each cell records whether it compiled, ran, and matched torch (``harness.deploy``). The same IR re-marked
(no float32 marks, the score tail only, every convolution alone) runs at the default precision too. Models are
untrained (no normalisation statistics), so the scores and maps compared are the raw ones, where bf16 differences
are not squashed.

Each config runs in its own process. Sizes: the config's own, except where ``SMALLER_SIZES`` says (named in the
results); ``LARGE_CONFIGS`` run last, with the exported marks only.

    python benchmarks/deploy_matrix.py            # writes benchmarks/results/deploy_matrix.{json,md}
    python benchmarks/deploy_matrix.py --configs fastflow_resnet18.yaml --compressions FP32 --out /tmp/m
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from harness.deploy import COMPRESSIONS, MARKINGS, config_model, export, reference_outputs, run_ir
from harness.machine import machine_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "deploy_matrix"
# paper recipes whose own size does not fit the run's time on 2 CPU cores: (size, why)
SMALLER_SIZES: dict[str, tuple[tuple[int, int], str]] = {
    "csflow_paper.yaml": ((256, 256), "EfficientNet-B5 and a 1024-wide flow at 3 scales, ~460 M parameters: its 768 "
                                      "px would not fit the run's time on 2 cores"),
}
# the largest recipes run with their exported marks only (the re-marked variants are covered by the others) and last
LARGE_CONFIGS = ("fastflow_cait.yaml", "csflow_paper.yaml")
IMAGES = 8


def test_images(size: tuple[int, int], count: int = IMAGES) -> np.ndarray:
    """``count×H×W×3`` uint8 generated images, half normal, half with a defect (square ``size``)."""
    from flowad_plugins.data.synthetic import CATEGORIES, SyntheticSpec, generate_image

    spec = SyntheticSpec(category="surface", image_size=size[0])
    defects = CATEGORIES["surface"]
    images = [generate_image(spec, 1000 + index, None if index % 2 == 0 else defects[index // 2 % len(defects)])[0]
              for index in range(count)]
    return np.stack(images)


def run_config(config: Path, compressions: list[str], markings: list[str], work: Path) -> dict[str, Any]:
    """Every cell of one config (this process)."""
    torch.manual_seed(0)
    size, why = SMALLER_SIZES.get(config.name, (None, None))
    model, info = config_model(config, size)
    if why:
        info["smaller_size_because"] = why
    input_size = tuple(info["input_size"])
    images = test_images(input_size)
    reference = reference_outputs(model, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    cells: list[dict[str, Any]] = []
    for compression in compressions:
        folder = work / compression
        start = time.perf_counter()
        try:
            xml = export(model, folder, compression, input_size)
        except Exception as error:
            cells.append({"compression": compression, "exports": False, "error": f"{type(error).__name__}: {error}"
                          [:300]})
            continue
        export_s = round(time.perf_counter() - start, 1)
        for cell in run_ir(xml, images, reference, compression, folder, markings):
            cells.append({**cell, "exports": True, "export_s": export_s})
        print(f"{config.name} {compression}: exported in {export_s} s, "
              f"{sum(c.get('parity', False) for c in cells if c['compression'] == compression)}/"
              f"{sum(c['compression'] == compression for c in cells)} cells pass", file=sys.stderr, flush=True)
    return {**info, "cells": cells}


def cell_mark(cell: dict[str, Any]) -> str:
    """✓ (compiles, runs, matches torch), ≈ (runs, parity below the bound), ✗run, ✗compile, ✗export."""
    if not cell.get("exports", True):
        return "✗export"
    if not cell.get("compiles"):
        return "✗compile"
    if not cell.get("runs"):
        return "✗run"
    return "✓" if cell["parity"] else "≈"


def markdown(report: dict[str, Any]) -> str:
    """Summary table (one row per config × compression × marks) and the failures with their errors."""
    machine = report["machine"]
    flags = ", ".join(flag for flag, present in machine["isa_flags"].items() if present) or "none"
    lines = [
        "# Deployment matrix: every shipped config, every compression, both precisions, batch 1 and 8",
        "",
        f"CPU: {machine['cpu']} (ISA: {flags}; OpenVINO capabilities: "
        f"{', '.join(machine['openvino_cpu_capabilities'] or [])}), {machine['logical_cpus']} logical CPUs; "
        f"OpenVINO {machine['versions'].get('openvino')}, torch {machine['versions'].get('torch')}, "
        f"anomalib {machine['versions'].get('anomalib')}, nncf {machine['versions'].get('nncf')}.",
        f"Command: `{report['command']}` ({report['minutes']} min).",
        "",
        "Cell: ✓ compiles, runs and matches torch FP32 (map correlation and score order at least "
        "0.99 / 0.95), ≈ runs but below "
        "that bound, ✗ fails (export, compile or run). Columns: precision / runtime (Inferencer = anomalib's "
        "OpenVINOInferencer, predict = flowad-predict's EdgeModel) / batch. Marks: `exported` as `to_openvino` "
        "writes the IR; `none`, `tail`, `convolutions`: the same IR re-marked (default precision only).",
        "",
    ]
    columns = [(p, r, b) for p in ("default", "f32") for r in ("OpenVINOInferencer", "flowad-predict") for b in (1, 8)]
    short = {"OpenVINOInferencer": "Inferencer", "flowad-predict": "predict"}
    lines.append("| config | px | weights | compression | marks | " + " | ".join(
        f"{p} {short[r]} b{b}" for p, r, b in columns) + " | min map corr | min score order |")
    lines.append("|---|---:|---|---|---|" + "---|" * len(columns) + "---:|---:|")
    failures = []
    for entry in report["configs"]:
        if "error" in entry:
            lines.append(f"| {entry['config']} | | | | | ✗ {entry['error'][:80]} |")
            continue
        px = f"{entry['input_size'][0]}" + ("*" if entry.get("smaller_size_because") else "")
        groups: dict[tuple[str, str], list[dict]] = {}
        for cell in entry["cells"]:
            groups.setdefault((cell["compression"], cell.get("marks", "exported")), []).append(cell)
        for (compression, marks), cells in groups.items():
            by_key = {(c.get("precision"), c.get("runtime"), c.get("batch")): c for c in cells}
            row = [cell_mark(by_key[key]) if key in by_key else ("✗export" if not cells[0].get("exports", True)
                                                                 else "") for key in columns]
            measured = [c for c in cells if c.get("runs")]
            map_corr = min((c["map_correlation"] for c in measured), default=float("nan"))
            order = min((c["score_order"] for c in measured), default=float("nan"))
            lines.append(f"| {entry['config']} | {px} | {entry['weights'].split(' ')[0]} | {compression} | {marks} | "
                         + " | ".join(row) + f" | {map_corr:.4f} | {order:.3f} |")
            failures += [(entry["config"], c) for c in cells if "error" in c]
    smaller = [e for e in report["configs"] if e.get("smaller_size_because")]
    if smaller:
        lines += ["", "\\* smaller than the config's size: " + "; ".join(
            f"{e['config']} {e['config_input_size'][0]} → {e['input_size'][0]} px ({e['smaller_size_because']})"
            for e in smaller)]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- {config} {c['compression']} {c.get('marks', '')} {c.get('precision', '')} "
                  f"{c.get('runtime', '')} b{c.get('batch', '')}: `{c['error']}`" for config, c in failures]
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="config file names (default: all of configs/)")
    parser.add_argument("--compressions", nargs="+", default=list(COMPRESSIONS), choices=COMPRESSIONS)
    parser.add_argument("--markings", nargs="+", default=list(MARKINGS), choices=MARKINGS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results path without suffix (.json, .md)")
    parser.add_argument("--no-fused-chains", action="store_true",
                        help="mark exactly the layers the export selects, not what the CPU plugin fuses into them "
                             "(the export before that fix: shows the failures it fixed)")
    parser.add_argument("--one-config", type=Path, default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args(argv)
    if args.one_config is not None:
        if args.no_fused_chains:
            from flowad_plugins.export import precision

            precision.fused_chain_ids = lambda *_: set()
        with tempfile.TemporaryDirectory() as work:
            entry = run_config(args.one_config, args.compressions, args.markings, Path(work))
        args.out.write_text(json.dumps(entry, indent=1, allow_nan=True))
        return None
    names = args.configs or sorted((path.name for path in (REPO / "configs").glob("*.yaml")),
                                   key=lambda name: (name in LARGE_CONFIGS, name))
    start = time.perf_counter()
    command = "python benchmarks/deploy_matrix.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {"command": command.strip(), "machine": machine_info(threads=torch.get_num_threads()),
                              "configs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as part:
            result = subprocess.run([sys.executable, __file__, "--one-config", str(REPO / "configs" / name),
                                     "--compressions", *args.compressions, "--markings",
                                     *(["exported"] if name in LARGE_CONFIGS else args.markings),
                                     "--out", part.name, *(["--no-fused-chains"] if args.no_fused_chains else [])],
                                    check=False, capture_output=True, text=True)
            text = Path(part.name).read_text()
        if result.returncode != 0 or not text:
            tail = [line for line in (result.stderr or "").splitlines() if line.strip()][-1:] or ["no output"]
            report["configs"].append({"config": name, "error": f"exit {result.returncode}: {tail[0]}"[:300]})
        else:
            report["configs"].append(json.loads(text))
        report["minutes"] = round((time.perf_counter() - start) / 60, 1)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))
        print(f"{name}: done after {report['minutes']} min", file=sys.stderr, flush=True)
    return report


if __name__ == "__main__":
    main()
