r"""Ours against anomalib's exported graph, interleaved in one process: the edge table of the README.

Each pair is exported once (each model through its own ``to_openvino``: ours with its float32 marks, anomalib's as
anomalib writes it; each backbone alone, unmarked), and all four IRs are compiled in one process twice: with no
configuration but the thread count (the CPU's default precision: bf16 where the CPU has AVX512-BF16 or AMX) and with
``INFERENCE_PRECISION_HINT=f32``. The eight calls alternate round by round (``harness.timing.interleaved_wall_times``,
the project's one latency definition) at batch 1 and 8. Also: multiply-adds per image (``torch.utils.flop_counter``),
how many convolutions of each compiled graph run in float32, and a per-op profile of both whole graphs.

Pairs, each at its shipped input side unless ``--image-size`` is given: ``cflow``, ``fastflow`` (256 px): the same
efficientnet_lite0 configuration on both sides (``harness.models``); ``csflow`` (640 px): our CSFlow's shipped
configuration (``configs/csflow_efficientnet_lite0.yaml``) against anomalib's Csflow on the same trunk, coupling
blocks and width; ``csflow-stock`` (640 px): the same against anomalib's Csflow as anomalib builds it
(EfficientNet-B5 up to its 304-channel stage, subnet width 1024). Weights are random (the work
done does not depend on them; B5's ImageNet weights do not install offline).

    OMP_NUM_THREADS=2 python benchmarks/edge_pairs.py
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
PAIR_SIZES = {"cflow": 256, "fastflow": 256, "csflow": 640, "csflow-stock": 640}  # each model's shipped side
GRAPHS = ("ours", "anomalib", "ours backbone", "anomalib backbone")
HINTS = ("default", "f32")


def build_pair_models(pair: str, size: int) -> tuple[Any, Any, str]:
    """(ours, anomalib's) Lightning modules of ``pair`` at ``size``² input, random weights, and a description."""
    if pair in ("csflow", "csflow-stock"):  # ours as shipped; anomalib's on the same trunk and width, or as it ships
        init = yaml.safe_load(SHIPPED_CSFLOW.read_text())["model"]["init_args"]
        init = {key: value for key, value in init.items() if key in SHIPPED_CSFLOW_ARCHITECTURE}
        ours = build_model("CSFlow", init, size, real_weights=False)
        width = init["hidden_channels"] or ours.model.encoder.channels[0]
        ours_text = f"ours as shipped ({SHIPPED_CSFLOW.name}: {init['backbone']} {init['layer']}, width {width})"
        if pair == "csflow":
            theirs = build_model("anomalib.Csflow", {"backbone": init["backbone"], "layer": init["layer"],
                                                     "n_coupling_blocks": init["coupling_blocks"],
                                                     "cross_conv_hidden_channels": width,
                                                     "clamp": init["clamp_alpha"]}, size, real_weights=False)
            return ours.eval(), theirs.eval(), f"{ours_text} vs anomalib.Csflow on the same trunk, blocks and width"
        theirs = build_model("anomalib.Csflow", STOCK_CSFLOW, size, real_weights=False)
        return ours.eval(), theirs.eval(), (f"{ours_text} vs anomalib.Csflow as shipped: EfficientNet-B5 blocks.5 "
                                            "(304 ch), width 1024")
    ours_spec, theirs_spec = pair_of(pair)
    ours = build_benchmark_model(ours_spec.name, size)
    theirs = build_benchmark_model(theirs_spec.name, size)
    return ours.eval(), theirs.eval(), ours_spec.settings


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
    """Median ms per call of the four IRs at both precisions and each batch size, interleaved, keyed
    ``"<graph>/<hint>"`` (``None`` and the error where an IR does not compile at that batch size), and how many
    convolutions of each run in float32 at the default precision."""
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
            for hint in HINTS:
                config = {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
                if hint != "default":
                    config["INFERENCE_PRECISION_HINT"] = hint
                try:
                    compiled = core.compile_model(model, "CPU", config)
                except RuntimeError as error:  # e.g. anomalib's Csflow backbone: a batch-1 Interpolate in its graph
                    result["errors"][f"{label}/{hint} b{batch}"] = str(error).strip().splitlines()[-1][:300]
                    continue
                request = compiled.create_infer_request()
                if hint == "default":
                    result.setdefault("float32_convolutions", {})[label] = float32_convolutions(compiled)
                calls.append(lambda request=request, images=images: request.infer({0: images}))
                labels.append(f"{label}/{hint}")
        times = interleaved_wall_times(calls, warmup=3, repeats=repeats)
        result[f"b{batch}"] = {f"{label}/{hint}": None for label in GRAPHS for hint in HINTS}
        result[f"b{batch}"].update({label: round(median_ms(t), 3) for label, t in zip(labels, times, strict=True)})
    return result


def op_profiles(xmls: dict[str, Path], size: int, threads: int, calls: int = 10, top: int = 6) -> dict[str, Any]:
    """Per whole graph at the default precision, batch 1: the ``top`` node types by OpenVINO's own time per call
    (ms; ``PERF_COUNT``, compiled apart from the timed graphs) and the precision each type ran in."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    profiles = {}
    for label in ("ours", "anomalib"):
        compiled = core.compile_model(xmls[label], "CPU", {"INFERENCE_NUM_THREADS": str(threads), "PERF_COUNT": "YES"})
        request = compiled.create_infer_request()
        request.infer({0: image})
        totals: dict[str, float] = {}
        precisions: dict[str, set[str]] = {}
        for _ in range(calls):
            request.infer({0: image})
            for info in request.profiling_info:
                totals[info.node_type] = totals.get(info.node_type, 0.0) + info.real_time.total_seconds() * 1000
                precisions.setdefault(info.node_type, set()).add(info.exec_type.rsplit("_", 1)[-1])
        ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
        profiles[label] = [{"op": op, "ms": round(total / calls, 3), "precisions": sorted(precisions[op])}
                           for op, total in ranked]
    return profiles


def ratios(row: dict[str, Any], batch: int) -> dict[str, dict[str, float | None]]:
    """Per precision: speed-up of ours over anomalib's, and each whole graph's time ÷ its backbone's alone."""
    ms = row[f"b{batch}"]

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return None if numerator is None or denominator is None else round(numerator / denominator, 3)

    return {hint: {"speedup": ratio(ms[f"anomalib/{hint}"], ms[f"ours/{hint}"]),
                   "ours_vs_backbone": ratio(ms[f"ours/{hint}"], ms[f"ours backbone/{hint}"]),
                   "anomalib_vs_backbone": ratio(ms[f"anomalib/{hint}"], ms[f"anomalib backbone/{hint}"])}
            for hint in HINTS}


def _cell(value: float | None, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.2f}{suffix}"


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    flags = ", ".join(flag for flag, present in machine["isa_flags"].items() if present) or "none"
    lines = [
        "# Ours vs anomalib's exported graph, interleaved in one process (OpenVINO CPU)", "",
        f"Machine: {machine['cpu']} (ISA: {flags}), {result['threads']} threads, OpenVINO "
        f"{machine['versions'].get('openvino')}. Command: `{result['command']}`", "",
        "ms per call (median of interleaved rounds); `default` = compiled with no configuration (the CPU's default "
        "precision), `f32` = `INFERENCE_PRECISION_HINT=f32`; speed-up = anomalib ms ÷ ours ms; ÷ backbone = the whole "
        "graph's ms ÷ its backbone's alone (exported unmarked) at the same precision. Ours keeps its backbone and "
        "score tail float32 inside the whole graph (second table).", "",
        "| pair | px | batch | precision | ours ms | anomalib ms | speed-up | ours backbone ms | anomalib backbone ms "
        "| ours ÷ backbone | anomalib ÷ backbone |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["pairs"]:
        for batch in result["batch_sizes"]:
            for hint in HINTS:
                ms, r = row[f"b{batch}"], row["ratios"][f"b{batch}"][hint]
                lines.append(f"| {row['pair']} | {row['image_size']} | {batch} | {hint} | "
                             f"{_cell(ms[f'ours/{hint}'])} | {_cell(ms[f'anomalib/{hint}'])} | "
                             f"{_cell(r['speedup'], '×')} | "
                             f"{_cell(ms[f'ours backbone/{hint}'])} | {_cell(ms[f'anomalib backbone/{hint}'])} | "
                             f"{_cell(r['ours_vs_backbone'])} | {_cell(r['anomalib_vs_backbone'])} |")
    lines += ["", "| pair | settings | G multiply-adds per image: ours / anomalib / ours backbone | "
                  "float32 convolutions at the default precision: ours / anomalib |", "|---|---|---|---|"]
    for row in result["pairs"]:
        m, p = row["multiply_adds"], row["float32_convolutions"]
        lines.append(f"| {row['pair']} | {row['settings']} | {m['ours'] / 1e9:.3f} / {m['anomalib'] / 1e9:.3f} / "
                     f"{m['ours backbone'] / 1e9:.3f} | {p['ours']} / {p['anomalib']} |")
    lines += ["", "Per-op profile, batch 1, default precision (OpenVINO's time per call by node type, ms, and the "
                  "precision it ran in):", "", "| pair | graph | top node types |", "|---|---|---|"]
    for row in result["pairs"]:
        for label, ops in row.get("profiles", {}).items():
            cells = ", ".join(f"{op['op']} {op['ms']:.2f} ({'/'.join(op['precisions'])})" for op in ops)
            lines.append(f"| {row['pair']} | {label} | {cells} |")
    errors = [f"- {row['pair']}, {key}: `{message}`" for row in result["pairs"]
              for key, message in row["errors"].items()]
    if errors:
        lines += ["", "Not compiled (–):", *errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", choices=list(PAIR_SIZES), default=list(PAIR_SIZES))
    parser.add_argument("--image-size", type=int, default=None, help="default: each pair's shipped input side")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds per batch size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/edge_pairs"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    command = " ".join([f"OMP_NUM_THREADS={args.threads} python benchmarks/edge_pairs.py", *sys.argv[1:]])
    result = {"command": command, "threads": args.threads, "batch_sizes": args.batch_sizes,
              "machine": machine_info(args.threads), "pairs": []}
    for pair in track(args.pairs, description="pairs"):
        torch.manual_seed(0)
        size = args.image_size or PAIR_SIZES[pair]
        ours, theirs, settings = build_pair_models(pair, size)
        with TemporaryDirectory() as folder:
            xmls, macs = export_pair(ours, theirs, size, Path(folder))
            row = {"pair": pair, "image_size": size, "settings": settings, "multiply_adds": macs,
                   **time_pair(xmls, size, args.threads, args.repeats, args.batch_sizes),
                   "profiles": op_profiles(xmls, size, args.threads)}
        row["ratios"] = {f"b{batch}": ratios(row, batch) for batch in args.batch_sizes}
        result["pairs"].append(row)
        print(pair, json.dumps(row["ratios"]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after every pair: a later failure keeps these
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
