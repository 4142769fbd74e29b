"""Minimal reproducer: a float32 mark that ends inside a fused Convolution + Add + ReLU breaks OpenVINO's CPU plugin.

On a CPU whose default inference precision is bf16 (AVX512-BF16 / AMX), OpenVINO's CPU plugin merges a convolution,
the residual ``Add`` after it and the ``ReLU`` after that into one node (a convolution with a sum post-op). When the
convolution carries the ``precise`` attribute (kept float32) and the ``ReLU`` does not, the merged node is still
built in float32, but the runtime graph lacks the float32 reorder of its residual operand that the fully marked
case has, and no kernel is created for it: compiling a static graph or running a dynamic one fails with
``[CPU] Convolution node with name '…' object is not initialized``. The batch dimension (static or dynamic) and the
residual ``Add``'s own mark do not matter; the ``ReLU``'s does. Without a residual ``Add`` nothing fails.

The script builds three tiny graphs (``C×16×16`` features, weights random), tries **every** subset of float32
marks on their layers, compiles each at the CPU's default precision and runs batch 1 and 8, once with the marks as
chosen and once as ``export.precision.mark_precise`` writes them (the element-wise layers fused into a marked
convolution marked with it). It also prints the CPU plugin's runtime graph of the smallest failing case.

    python benchmarks/fused_precision_boundary.py   # writes benchmarks/results/fused_precision_boundary.{json,md}
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as opset
from harness.machine import cpu_model, isa_flags, package_versions

from flowad_plugins.export.precision import mark_precise

CHANNELS = 32
RESULTS = Path(__file__).parent / "results" / "fused_precision_boundary"


def _weights(generator: np.random.Generator, *shape: int) -> ov.Node:
    return opset.constant(generator.standard_normal(shape).astype(np.float32) * 0.05)


def _conv(features: ov.Output, name: str, generator: np.random.Generator) -> ov.Node:
    """3×3 convolution, ``CHANNELS`` in and out, same size."""
    return opset.convolution(features, _weights(generator, CHANNELS, CHANNELS, 3, 3), [1, 1], [1, 1], [1, 1],
                             [1, 1], name=name)


def basic_block(image: ov.Node, generator: np.random.Generator) -> ov.Node:
    """ResNet basic block (conv → relu → conv → + input → relu) and the next convolution."""
    hidden = opset.relu(_conv(image, "conv1", generator), name="relu1")
    block = opset.relu(opset.add(_conv(hidden, "conv2", generator), image, name="add"), name="relu2")
    return _conv(block, "next_conv", generator)


def projection_shortcut(image: ov.Node, generator: np.random.Generator) -> ov.Node:
    """Block whose residual comes from another convolution (ResNet's downsampling shortcut)."""
    shortcut = _conv(image, "shortcut", generator)
    block = opset.relu(opset.add(_conv(image, "conv2", generator), shortcut, name="add"), name="relu2")
    return _conv(block, "next_conv", generator)


def residual_without_activation(image: ov.Node, generator: np.random.Generator) -> ov.Node:
    """conv → + input (EfficientNet's inverted residual ends so), then the next convolution: never fails."""
    return _conv(opset.add(_conv(image, "conv2", generator), image, name="add"), "next_conv", generator)


PATTERNS: dict[str, Callable[[ov.Node, np.random.Generator], ov.Node]] = {
    "basic_block": basic_block,
    "projection_shortcut": projection_shortcut,
    "residual_without_activation": residual_without_activation,
}


def build(pattern: str, dynamic_batch: bool) -> ov.Model:
    """The ``pattern`` graph on a ``B×C×16×16`` input (``B`` dynamic or 8)."""
    image = opset.parameter([-1 if dynamic_batch else 8, CHANNELS, 16, 16], np.float32, name="input")
    return ov.Model([PATTERNS[pattern](image, np.random.default_rng(0))], [image])


def layer_names(model: ov.Model) -> list[str]:
    """Names of the layers that can carry a mark, in graph order."""
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() not in ("Constant", "Parameter", "Result")]


def first_error(xml: Path, batches: tuple[int, ...]) -> str | None:
    """Compile ``xml`` at the CPU's default precision and run each batch size: the first error line, or None."""
    try:
        compiled = ov.Core().compile_model(str(xml), "CPU")
        for batch in batches:
            compiled(np.random.default_rng(1).random((batch, CHANNELS, 16, 16), dtype=np.float32))
    except RuntimeError as error:
        return str(error).strip().splitlines()[-1]
    return None


def runtime_graph(xml: Path) -> list[str]:
    """The CPU plugin's nodes after fusion: type, name, runtime precision, output precision, fused layers."""
    compiled = ov.Core().compile_model(str(xml), "CPU")
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        rows.append(f"{info['layerType'].astype(str):<12} {op.get_friendly_name():<34} "
                    f"runtime {info['runtimePrecision'].astype(str):<5} out {info['outputPrecisions'].astype(str):<5} "
                    f"layers {info['originalLayersNames'].astype(str)}")
    return rows


def sweep(folder: Path) -> list[dict]:
    """Every pattern × batch kind × mark subset × (marks as chosen, marks with their fused chains)."""
    rows = []
    for pattern, dynamic_batch in itertools.product(PATTERNS, (True, False)):
        model = build(pattern, dynamic_batch)
        names = layer_names(model)
        xml = folder / f"{pattern}.xml"
        for bits in itertools.product((False, True), repeat=len(names)):
            chosen = {name for name, bit in zip(names, bits, strict=True) if bit}
            row = {"pattern": pattern, "batch": "dynamic" if dynamic_batch else "static 8", "layers": names,
                   "float32": sorted(chosen)}
            for follow_fusion in (False, True):
                ov.save_model(model, xml, compress_to_fp16=False)
                mark_precise(xml, lambda name, _, chosen=chosen: name in chosen, follow_fusion=follow_fusion)
                key = "with_fused_chains" if follow_fusion else "as_chosen"
                row[key] = first_error(xml, (1, 8) if dynamic_batch else (8,))
            rows.append(row)
    return rows


def summary(rows: list[dict], examples: dict[str, list[str]]) -> str:
    """Markdown: failures per pattern, the failing mark sets, the runtime graph of the smallest failing case."""
    lines = [
        "# A float32 mark inside a fused Convolution + Add + ReLU (OpenVINO CPU, default precision)",
        "",
        f"CPU: {cpu_model()}; bf16 ISA: {', '.join(k for k, v in isa_flags().items() if v) or 'none'}; "
        f"OpenVINO {package_versions().get('openvino')}. Command: `python benchmarks/fused_precision_boundary.py`.",
        "Every subset of float32 marks on each graph's layers, compiled with no configuration, run at batch 1 and 8 "
        "(static graphs: batch 8). *As chosen*: the marks exactly as listed; *with fused chains*: as "
        "`mark_precise` writes them (element-wise layers fused into a marked convolution take its mark).",
        "",
        "| pattern | batch | mark sets | fail as chosen | fail with fused chains |",
        "|---|---|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["pattern"], row["batch"]), []).append(row)
    for (pattern, batch), group in groups.items():
        lines.append(f"| {pattern} | {batch} | {len(group)} | {sum(bool(r['as_chosen']) for r in group)} | "
                     f"{sum(bool(r['with_fused_chains']) for r in group)} |")
    lines += ["", "Failing mark sets (marks as chosen; layers in graph order, F = float32):", ""]
    for (pattern, batch), group in groups.items():
        failing = [r for r in group if r["as_chosen"]]
        if not failing:
            continue
        names = group[0]["layers"]
        lines.append(f"- {pattern}, {batch} ({', '.join(names)}): " + ", ".join(
            "".join("F" if name in r["float32"] else "." for name in names) for r in failing))
        lines.append(f"  error: `{failing[0]['as_chosen']}`")
    for title, graph in examples.items():
        lines += ["", f"Runtime graph of `basic_block` (dynamic batch), `conv2` float32, {title}:", "", "```", *graph,
                  "```"]
    return "\n".join([*lines, ""])


def main() -> None:
    if not isa_flags().get("avx512_bf16") and not isa_flags().get("amx_bf16"):
        print("this CPU has no native bf16: the default precision is float32 and nothing here can fail",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        rows = sweep(Path(folder))
        examples = {}
        for title, follow_fusion in (("as chosen (fails at its first inference)", False),
                                     ("with its fused chain (runs)", True)):
            xml = Path(folder) / f"example_{follow_fusion}.xml"
            ov.save_model(build("basic_block", dynamic_batch=True), xml, compress_to_fp16=False)
            mark_precise(xml, lambda name, _: name == "conv2", follow_fusion=follow_fusion)
            examples[title] = runtime_graph(xml)  # a dynamic graph compiles; its first inference is what fails
    report = {"command": "python benchmarks/fused_precision_boundary.py", "cpu": cpu_model(), "isa_flags": isa_flags(),
              "versions": package_versions(), "rows": rows, "runtime_graphs": examples}
    RESULTS.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    RESULTS.with_suffix(".md").write_text(summary(rows, examples))
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
