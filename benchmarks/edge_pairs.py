r"""Ours against anomalib's exported graph, interleaved in one process: the edge speed ratios without drift.

The edge grid (``benchmark.py --edge``) runs every cell in its own process one after another, so a machine whose
speed drifts between cells skews the ratios. Here each pair is exported once (each model through its own
``to_openvino``: ours with its float32 marks, anomalib's as anomalib writes it; the backbone alone as the grid
exports it), all four IRs are compiled in one process with no configuration but the thread count (the CPU's
default precision), and their calls alternate round by round (``harness.timing.interleaved_wall_times``) at batch
1 and 8. Also: multiply-adds per image (``torch.utils.flop_counter``) and the rate each graph reaches, against the
rate of its own backbone alone, and the precision the CPU plugin chose.

Pairs: ``cflow``, ``fastflow``, ``csflow`` (the grid's pairs: the same efficientnet_lite0 configuration on both
sides, ``harness.models``) and ``csflow-stock``: our CSFlow's shipped configuration
(``configs/csflow_efficientnet_lite0.yaml``) against anomalib's Csflow as anomalib builds it (EfficientNet-B5 up to
its 304-channel stage, subnet width 1024), at the same input size. Weights are random (the work done does not
depend on them; B5's ImageNet weights do not install offline).

    OMP_NUM_THREADS=2 python benchmarks/edge_pairs.py --out benchmarks/results/edge_pairs
    OMP_NUM_THREADS=2 python benchmarks/edge_pairs.py --pairs csflow-stock --image-size 640 --out ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.exports import export_backbone, multiply_adds_per_image
from harness.machine import machine_info
from harness.models import backbone_of, build_benchmark_model, build_model, pair_of
from harness.timing import interleaved_wall_times, median_ms
from rich.progress import track

STOCK_CSFLOW = {"backbone": "efficientnet_b5", "layer": "blocks.5"}  # anomalib's Csflow: B5, width 1024 (its default)
SHIPPED_CSFLOW = Path(__file__).resolve().parents[1] / "configs" / "csflow_efficientnet_lite0.yaml"
SHIPPED_CSFLOW_ARCHITECTURE = ("backbone", "layer", "num_scales", "coupling_blocks", "kernel_sizes", "hidden_channels",
                               "clamp_alpha")
PAIRS = ("cflow", "fastflow", "csflow", "csflow-stock")
GRAPHS = ("ours", "anomalib", "ours backbone", "anomalib backbone")


def build_pair_models(pair: str, size: int) -> tuple[Any, Any, str]:
    """(ours, anomalib's) Lightning modules of ``pair`` at ``size``² input, random weights, and a description."""
    if pair == "csflow-stock":  # each side as it ships: our CSFlow's config, anomalib's Csflow defaults
        init = yaml.safe_load(SHIPPED_CSFLOW.read_text())["model"]["init_args"]
        init = {key: value for key, value in init.items() if key in SHIPPED_CSFLOW_ARCHITECTURE}
        ours = build_model("CSFlow", init, size, real_weights=False)
        theirs = build_model("anomalib.Csflow", STOCK_CSFLOW, size, real_weights=False)
        settings = (f"ours as shipped ({SHIPPED_CSFLOW.name}: {init['backbone']} {init['layer']}, width = its "
                    "channels) vs anomalib.Csflow as shipped: EfficientNet-B5 blocks.5 (304 ch), width 1024")
        return ours.eval(), theirs.eval(), settings
    ours_spec, theirs_spec = pair_of(pair)
    ours = build_benchmark_model(ours_spec.name, size)
    theirs = build_benchmark_model(theirs_spec.name, size)
    settings = ours_spec.settings
    return ours.eval(), theirs.eval(), settings


def export_pair(ours: Any, theirs: Any, size: int, folder: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """The four IRs of a pair and the multiply-adds per image of each graph."""
    task = {"image_size": size, "work_dir": str(folder)}
    xmls, macs = {}, {}
    for label, model in (("ours", ours), ("anomalib", theirs)):
        xmls[label] = Path(model.to_openvino(folder / label, input_size=(size, size)))
        macs[label] = multiply_adds_per_image(model.model, size)
        backbone = backbone_of(model)
        record = export_backbone(backbone, task, folder / f"{label}_backbone", ["openvino-fp32"])
        if "openvino-fp32" not in record["files"]:
            msg = f"{label} backbone export failed: {record['errors']}"
            raise RuntimeError(msg)
        xmls[f"{label} backbone"] = Path(record["files"]["openvino-fp32"])
        macs[f"{label} backbone"] = multiply_adds_per_image(backbone, size)
    return xmls, macs


def float32_convolutions(compiled: Any) -> str:
    """``"f32 of total"`` convolutions of a compiled model's runtime graph (the rest run in the fast precision)."""
    precisions = [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
                  if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "GroupConvolution")]
    return f"{sum(p == 'f32' for p in precisions)} of {len(precisions)}"


def time_pair(xmls: dict[str, Path], size: int, threads: int, repeats: int, batches: list[int]) -> dict[str, Any]:
    """Median ms per call of the four IRs at each batch size, interleaved (``None`` and the error where an IR does
    not compile at that batch size), and how many convolutions of each run in float32."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    result: dict[str, Any] = {"errors": {}}
    for batch in batches:
        images = np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)
        calls, labels = [], []
        for label in GRAPHS:
            model = core.read_model(xmls[label])
            model.reshape({model.input(0).get_any_name(): [batch, 3, size, size]})
            try:
                compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": str(threads),
                                                             "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"})
            except RuntimeError as error:  # e.g. anomalib's Csflow backbone: a batch-1 Interpolate in its graph
                result["errors"][f"{label} b{batch}"] = str(error).strip().splitlines()[-1][:300]
                continue
            request = compiled.create_infer_request()
            result.setdefault("float32_convolutions", {})[label] = float32_convolutions(compiled)
            calls.append(lambda request=request, images=images: request.infer({0: images}))
            labels.append(label)
        times = interleaved_wall_times(calls, warmup=3, repeats=repeats)
        result[f"b{batch}"] = {label: None for label in GRAPHS}
        result[f"b{batch}"].update({label: round(median_ms(t), 3) for label, t in zip(labels, times,
                                                                                                  strict=True)})
    return result


def ratios(row: dict[str, Any], batch: int) -> dict[str, float | None]:
    """Speed-up of ours over anomalib's, and each graph's multiply-add rate ÷ its backbone's (per image)."""
    ms = row[f"b{batch}"]

    def rate(label: str) -> float | None:
        return None if ms[label] is None else row["multiply_adds"][label] * batch / (ms[label] / 1000)

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return None if numerator is None or denominator is None else round(numerator / denominator, 3)

    return {"speedup": ratio(ms["anomalib"], ms["ours"]),
            "ours_rate_vs_backbone": ratio(rate("ours"), rate("ours backbone")),
            "anomalib_rate_vs_backbone": ratio(rate("anomalib"), rate("anomalib backbone"))}


def _cell(value: float | None, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.2f}{suffix}"


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    flags = ", ".join(flag for flag, present in machine["isa_flags"].items() if present) or "none"
    lines = [
        "# Ours vs anomalib's exported graph, interleaved in one process (OpenVINO, CPU default precision)", "",
        f"Machine: {machine['cpu']} (ISA: {flags}), {result['threads']} threads, OpenVINO "
        f"{machine['versions'].get('openvino')}. Command: `{result['command']}`", "",
        "ms per call (median of interleaved rounds); speed-up = anomalib ms ÷ ours ms; rate = multiply-adds per "
        "second, ÷ that of the same model's backbone alone (exported unmarked, so it runs at the CPU's default "
        "precision). Ours keeps its backbone and score tail float32 inside the whole graph (second table).", "",
        "| pair | px | batch | ours ms | anomalib ms | speed-up | ours backbone ms | anomalib backbone ms | "
        "ours rate ÷ backbone | anomalib rate ÷ backbone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["pairs"]:
        for batch in result["batch_sizes"]:
            ms, r = row[f"b{batch}"], row["ratios"][f"b{batch}"]
            lines.append(f"| {row['pair']} | {row['image_size']} | {batch} | {_cell(ms['ours'])} | "
                         f"{_cell(ms['anomalib'])} | {_cell(r['speedup'], '×')} | {_cell(ms['ours backbone'])} | "
                         f"{_cell(ms['anomalib backbone'])} | {_cell(r['ours_rate_vs_backbone'])} | "
                         f"{_cell(r['anomalib_rate_vs_backbone'])} |")
    lines += ["", "| pair | settings | G multiply-adds per image: ours / anomalib / ours backbone | "
                  "float32 convolutions at run time: ours / anomalib |", "|---|---|---|---|"]
    for row in result["pairs"]:
        m, p = row["multiply_adds"], row["float32_convolutions"]
        lines.append(f"| {row['pair']} | {row['settings']} | {m['ours'] / 1e9:.3f} / {m['anomalib'] / 1e9:.3f} / "
                     f"{m['ours backbone'] / 1e9:.3f} | {p['ours']} / {p['anomalib']} |")
    errors = [f"- {row['pair']}, {key}: `{message}`" for row in result["pairs"]
              for key, message in row["errors"].items()]
    if errors:
        lines += ["", "Not compiled (–):", *errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timed rounds per batch size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edge_pairs"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    command = f"OMP_NUM_THREADS={args.threads} python benchmarks/edge_pairs.py --pairs {' '.join(args.pairs)} " \
              f"--image-size {args.image_size} --repeats {args.repeats}"
    result = {"command": command, "threads": args.threads, "batch_sizes": args.batch_sizes,
              "machine": machine_info(args.threads), "pairs": []}
    for pair in track(args.pairs, description="pairs"):
        torch.manual_seed(0)
        ours, theirs, settings = build_pair_models(pair, args.image_size)
        with TemporaryDirectory() as folder:
            xmls, macs = export_pair(ours, theirs, args.image_size, Path(folder))
            row = {"pair": pair, "image_size": args.image_size, "settings": settings, "multiply_adds": macs,
                   **time_pair(xmls, args.image_size, args.threads, args.repeats, args.batch_sizes)}
        row["ratios"] = {f"b{batch}": ratios(row, batch) for batch in args.batch_sizes}
        result["pairs"].append(row)
        print(pair, json.dumps(row["ratios"]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every pair: a later failure keeps these
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
