"""Exported OpenVINO graphs that are accurate at the CPU's default precision, with no configuration.

OpenVINO's CPU plugin runs a float32 IR in bfloat16 wherever the CPU has native bf16 (AVX512-BF16, AMX). Two parts
of our graphs do not tolerate that:

- the **backbone**: a flow scores how far a feature lies from the normal features, and bf16 rounding inside the
  backbone moves the features by a good fraction of their normal spread, which no float32 head can undo;
- the **score tail**: the per-position log-determinant (a sum of many log-scales), ``‖z‖²``, the log-likelihood (a
  difference of large terms), the exp/log aggregation over scales and the score normalisation.

The flow head's convolutions and GEMMs between them tolerate bf16 (measured on MVTec AD bottle:
``benchmarks/results/default_precision.md``). ``keep_precision_critical_in_float32`` therefore gives the backbone
and the score tail OpenVINO's ``precise`` runtime attribute (``ov::DisableFP16Compression``), which the CPU plugin
honours under bf16, and leaves the head to the CPU's fast precision. The attribute is written into the IR file as
the typed ``<attribute name="precise" version="0"/>`` that the IR reader restores (a string entry set through the
Python API is saved as another attribute and does nothing). Which nodes are the head comes from the ONNX file the
IR was converted from (``onnx_graph.float_tail_names``); the head's first non-convolution nodes are marked too, so
that the float32 region ends on nodes the plugin converts cleanly. The tail is found structurally: every node
downstream of a reduction over the channel axis (``ReduceSum``/``ReduceMean`` over axis 1: the log-det and ``‖z‖²``
sums of each flow), plus the elementwise node feeding each such reduction.

Whatever is selected, ``mark_precise`` also marks the element-wise layers the CPU plugin fuses into a marked
convolution (its residual ``Add`` and activation): a float32 mark that ends inside a fused Convolution + Add + ReLU
leaves that node without a kernel on bf16 CPUs (``[CPU] Convolution node ... object is not initialized``, an
OpenVINO CPU plugin defect reproduced by ``benchmarks/fused_precision_boundary.py``), which is what broke the
ResNet backbones, whose last block ends so right before the head.
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
    ``FUSING_PARENTS`` layer the chain of element-wise layers that each have the previous one as their only consumer
    (a convolution's bias, residual ``Add`` and activation, which the plugin merges into one node) is returned.
    A float32 mark that stops inside such a chain leaves the merged node without an executor on bf16 CPUs
    (``[CPU] Convolution node ... object is not initialized``; ``benchmarks/fused_precision_boundary.py``).
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
