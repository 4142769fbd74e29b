"""Per-op OpenVINO profile of our three exported models: where the time of one inference goes, by node type.

Builds each model with the edge harness's configuration (efficientnet_lite0, 256 px; untrained flows with fitted
statistics: the graph and its cost do not depend on the weights), exports it with ``to_openvino`` (pre- and
post-processing included), compiles it with no configuration beyond the thread count (the CPU's default precision)
and sums ``PERF_COUNT`` real time by node type over ``--repeats`` calls of one infer request at batch 1. Also
records the op count of the IR, the median latency and the runtime precision of each node type.

Run it once on the code to compare against (``PYTHONPATH=<other checkout>/src``) with ``--label before`` and once
with ``--label after``; both land in one JSON and the markdown table shows them side by side:

    OMP_NUM_THREADS=2 python benchmarks/archive/openvino_profile.py --label after \
        --out benchmarks/results/openvino_profile
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness
from harness.machine import machine_info
from harness.timing import interleaved_wall_times, median_ms

SIZE = 256


def build(name: str):
    """The model as the edge harness pairs it (arguments that every version of the plugins accepts)."""
    import torch

    from flowad_plugins import CflowAD, CSFlow, FastFlow

    torch.manual_seed(0)
    if name == "CflowAD":
        model = CflowAD(backbone="efficientnet_lite0", layers=["blocks.2", "blocks.4"])
    elif name == "FastFlow":
        model = FastFlow(backbone="efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"],
                         input_size=(SIZE, SIZE))
    else:
        model = CSFlow(backbone="efficientnet_lite0", layer="blocks.4", hidden_channels=112,
                       pre_processor=CSFlow.configure_pre_processor((SIZE, SIZE)))
    model.eval()
    model.model.scorer.statistics.fitted.fill_(True)
    return model


def profile(xml: Path, repeats: int, threads: int) -> dict:
    """Median latency, op count and per-node-type real time (ms per call) at the default precision, batch 1."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(xml, "CPU", {"INFERENCE_NUM_THREADS": str(threads), "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    images = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    for _ in range(5):
        request.infer({0: images})
    by_type: collections.Counter = collections.Counter()
    latencies = []
    for _ in range(repeats):
        (seconds,) = interleaved_wall_times([lambda: request.infer({0: images})], warmup=0, repeats=1)
        latencies += seconds
        for info in request.profiling_info:
            by_type[info.node_type] += info.real_time.total_seconds() * 1e3 / repeats
    runtime = compiled.get_runtime_model()
    precisions = collections.Counter(
        f"{op.get_rt_info()['layerType'].astype(str)}:{op.get_rt_info()['runtimePrecision'].astype(str)}"
        for op in runtime.get_ops())
    return {"median_ms": median_ms(latencies), "ir_ops": len(core.read_model(xml).get_ops()),
            "precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "ms_by_type": dict(by_type.most_common()), "runtime_precisions": dict(precisions)}


def markdown(results: dict) -> list[str]:
    """Side-by-side table per model: labels as columns, the top node types as rows."""
    lines = ["# OpenVINO per-op profile (default precision, batch 1, 256 px)", "",
             f"Machine: {results.get('machine', {}).get('cpu', '?')}. Command: see the script's docstring.", ""]
    for model, by_label in results["models"].items():
        labels = list(by_label)
        lines += [f"## {model}", "", "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines.append("| median ms | " + " | ".join(f"{by_label[x]['median_ms']:.2f}" for x in labels) + " |")
        lines.append("| IR ops | " + " | ".join(str(by_label[x]["ir_ops"]) for x in labels) + " |")
        types = collections.Counter()
        for label in labels:
            types.update(by_label[label]["ms_by_type"])
        for node_type, _ in types.most_common(12):
            cells = [f"{by_label[x]['ms_by_type'].get(node_type, 0.0):.2f}" for x in labels]
            lines.append(f"| {node_type} ms | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="column name, e.g. before / after")
    parser.add_argument("--models", nargs="+", default=["CflowAD", "FastFlow", "CSFlow"],
                        choices=["CflowAD", "FastFlow", "CSFlow"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/openvino_profile"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    json_path = args.out.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.is_file() else {"models": {}}
    results["machine"] = machine_info(args.threads)
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            xml = Path(build(name).to_openvino(Path(folder), input_size=(SIZE, SIZE)))
            measured = profile(xml, args.repeats, args.threads)
        results["models"].setdefault(name, {})[args.label] = measured
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(measured["ms_by_type"].items())[:8])
        print(f"{name} [{args.label}]: {measured['median_ms']:.2f} ms, {measured['ir_ops']} ops; {top}")
    results.setdefault("commands", {})[args.label] = " ".join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(markdown(results)) + "\n")


if __name__ == "__main__":
    main()
