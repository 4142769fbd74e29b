"""Exported OpenVINO graphs that are accurate at the CPU's default precision, with no configuration.

OpenVINO's CPU plugin runs a float32 IR in bf16 wherever the CPU has native bf16 (AVX512-BF16, AMX). Two parts of
our graphs do not tolerate that: the **backbone** (bf16 rounding moves the features by a good fraction of their
normal spread) and the **score tail** (log-det sums, ``‖z‖²``, the log-likelihood, the exp/log aggregation and the
normalisation). The flow head tolerates bf16 (``benchmarks/results/default_precision.md``).
``keep_precision_critical_in_float32`` gives the backbone and the tail OpenVINO's ``precise`` attribute
(``ov::DisableFP16Compression``, honoured under bf16), written into the IR as the typed ``<attribute
name="precise" version="0"/>`` (a string entry set through the Python API does nothing). The head is known from
the ONNX file the IR came from (``onnx_graph.float_tail_names``); the tail is everything downstream of a reduction
over the channel axis. ``mark_precise`` also marks the element-wise layers the CPU plugin fuses into a marked
convolution: a mark ending inside a fused Convolution + Add + ReLU fails on bf16 CPUs (``[CPU] Convolution node ...
object is not initialized``, an OpenVINO defect: ``benchmarks/fused_precision_boundary.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flowad_plugins.edge.settings import PRECISE_ATTRIBUTE

UNMARKED_TYPES = ("Const", "Parameter", "Result")
CHANNEL_REDUCTIONS = ("ReduceSum", "ReduceMean")
ELEMENTWISE_FEEDERS = ("Power", "Multiply", "Tanh", "Add", "Subtract", "Clamp", "Sigmoid", "Exp")
# layers the CPU plugin merges element-wise successors into, and the IR types of those successors
FUSING_PARENTS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
FUSED_ELEMENTWISE = ("Add", "Subtract", "Multiply", "Divide", "Maximum", "Minimum", "SquaredDifference", "ReLU",
                     "PReLU", "Clamp", "Elu", "Gelu", "Sigmoid", "HSigmoid", "Swish", "HSwish", "Mish", "Tanh", "Exp",
                     "Log", "Abs", "Sqrt", "Power", "SoftPlus", "Round", "Floor", "Ceiling", "Negative", "Erf")


def _reduces_channels(node) -> bool:
    """Whether ``node`` is a sum/mean over axis 1 only (its axes input is a constant ``[1]``)."""
    if node.get_type_name() not in CHANNEL_REDUCTIONS:
        return False
    axes = node.input_value(1).get_node()
    if axes.get_type_name() != "Constant":
        return False
    values = [int(value) for value in axes.get_data().reshape(-1)]
    return values == [1]


def float32_tail(model) -> list:
    """The nodes of ``model`` that must stay float32 (see the module docstring), in graph order."""
    seeds = [node for node in model.get_ordered_ops() if _reduces_channels(node)]
    marked: dict[str, object] = {}
    stack = list(seeds)
    for seed in seeds:
        feeder = seed.input_value(0).get_node()
        if feeder.get_type_name() in ELEMENTWISE_FEEDERS:
            marked[feeder.get_friendly_name()] = feeder
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in marked and node not in seeds:
            continue
        marked[name] = node
        for output in node.outputs():
            stack.extend(target.get_node() for target in output.get_target_inputs())
    order = {node.get_friendly_name(): index for index, node in enumerate(model.get_ordered_ops())}
    return sorted(marked.values(), key=lambda node: order.get(node.get_friendly_name(), 0))


def fused_chain_ids(root, selected: set[str]) -> set[str]:
    """Ids of the layers the CPU plugin fuses into a selected weighted layer, so that they take its precision.

    ``root``: the IR's parsed XML root; ``selected``: layer ids to be kept float32. From every selected
    ``FUSING_PARENTS`` layer: the chain of element-wise layers each consuming only the previous one (bias,
    residual ``Add``, activation); a mark stopping inside it fails on bf16 CPUs (see the module).
    """
    layers = {layer.get("id"): layer for layer in root.iter("layer")}
    consumers: dict[str, list[str]] = {}
    for edge in root.iter("edge"):
        consumers.setdefault(edge.get("from-layer"), []).append(edge.get("to-layer"))
    chained: set[str] = set()
    for layer_id in selected:
        if layers[layer_id].get("type") not in FUSING_PARENTS:
            continue
        current = layer_id
        while len(consumers.get(current, [])) == 1:
            current = consumers[current][0]
            if layers[current].get("type") not in FUSED_ELEMENTWISE:
                break
            chained.add(current)
    return chained


def mark_precise(xml_path: str | Path, select: Callable[[str, str], bool], follow_fusion: bool = True) -> int:
    """Give every layer of the IR at ``xml_path`` for which ``select(name, type)`` holds the ``precise`` attribute,
    in place; returns how many layers were marked (constants, parameters and results never are).

    ``follow_fusion``: also mark the element-wise layers the CPU plugin fuses into a selected convolution or MatMul
    (``fused_chain_ids``), so that no selection can split a fused node between two precisions. ``False`` only
    to reproduce that failure."""
    import xml.etree.ElementTree as ElementTree

    xml_path = Path(xml_path)
    tree = ElementTree.parse(xml_path)
    selected = {layer.get("id") for layer in tree.getroot().iter("layer")
                if layer.get("type") not in UNMARKED_TYPES and select(layer.get("name"), layer.get("type"))}
    if follow_fusion:
        selected |= fused_chain_ids(tree.getroot(), selected)
    marked = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("id") not in selected:
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ElementTree.Element("rt_info")
            layer.insert(1 if layer.find("data") is not None else 0, rt_info)
        if not any(attribute.get("name") == PRECISE_ATTRIBUTE["name"] for attribute in rt_info):
            ElementTree.SubElement(rt_info, "attribute", PRECISE_ATTRIBUTE)
        marked += 1
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    return marked


def marked_layer_names(xml_path: str | Path) -> set[str]:
    """Names of the layers of the IR at ``xml_path`` that carry the ``precise`` attribute.

    ``ov.save_model`` writes a read-in ``precise`` attribute back as an fp16-only one that no longer keeps bf16 away,
    so code that re-saves one of our IRs takes these names before and marks them again after (``mark_precise``).
    """
    import xml.etree.ElementTree as ElementTree

    return {layer.get("name") for layer in ElementTree.parse(xml_path).getroot().iter("layer")
            if any(attribute.get("name") == PRECISE_ATTRIBUTE["name"] for attribute in layer.iter("attribute"))}


def onnx_base_name(name: str) -> str:
    """The ONNX node an OpenVINO op came from (``node_conv2d_3/WithoutBiases`` → ``node_conv2d_3``)."""
    return name.split("/")[0]


def head_entry_names(xml_path: str | Path, head: set[str]) -> set[str]:
    """Head layers (not convolutions) fed directly by a non-constant layer outside ``head`` (ONNX base names)."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(xml_path).getroot()
    layers = {layer.get("id"): layer for layer in root.iter("layer")}
    entries = set()
    for edge in root.iter("edge"):
        source, target = layers[edge.get("from-layer")], layers[edge.get("to-layer")]
        if (onnx_base_name(source.get("name")) not in head and source.get("type") != "Const"
                and onnx_base_name(target.get("name")) in head and target.get("type") != "Convolution"):
            entries.add(target.get("name"))
    return entries


def keep_precision_critical_in_float32(xml_path: str | Path, head: set[str] | None) -> int:
    """Mark the backbone, the head's entry nodes and the score tail of the IR at ``xml_path`` float32, in place.

    ``head``: ONNX names of the flow head's nodes (``onnx_graph.float_tail_names`` of the file the IR was converted
    from); empty or ``None``: the whole graph is marked. Returns the layers marked.
    """
    import openvino as ov

    model = ov.Core().read_model(xml_path)
    tail = {node.get_friendly_name() for node in float32_tail(model)}
    del model
    head = head or set()
    keep = tail | head_entry_names(xml_path, head)
    return mark_precise(xml_path, lambda name, _: name in keep or onnx_base_name(name) not in head)
