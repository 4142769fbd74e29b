"""Exported OpenVINO graphs that are accurate at the CPU's default precision, with no configuration.

OpenVINO's CPU plugin runs a float32 IR in bfloat16 wherever the CPU has native bf16 (AVX512-BF16, AMX). That suits
the convolutions and GEMMs of the backbone and the flow, but not the precision-critical tail: the per-position
log-determinant (a sum of many log-scales), ``‖z‖²``, the log-likelihood (a difference of large terms), the
exp/log aggregation over scales and the score normalisation, where an 8-bit mantissa ties and shifts scores.

``keep_tail_in_float32`` marks that tail in the IR with OpenVINO's ``precise`` runtime attribute (the one that
also keeps nodes out of FP16 compression), so every runtime that honours it keeps those nodes in float32 and lets
everything before them run in the fast precision. The tail is found structurally: every node downstream of a
reduction over the channel axis (``ReduceSum``/``ReduceMean`` over axis 1, i.e. the log-det and ``‖z‖²`` sums of
each flow), plus the elementwise node feeding each such reduction. Backbones reduce over channels nowhere (global
pooling reduces over the spatial axes, normalisations are ``MVN``), so the flow itself is never marked. The
attribute only takes effect once serialised, so the function rewrites the IR file in place.
"""

from __future__ import annotations

from pathlib import Path

PRECISE_ATTRIBUTE = "precise_0"  # ov::DisableFP16Compression's runtime-info key
CHANNEL_REDUCTIONS = ("ReduceSum", "ReduceMean")
ELEMENTWISE_FEEDERS = ("Power", "Multiply", "Tanh", "Add", "Subtract", "Clamp", "Sigmoid", "Exp")


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


def keep_tail_in_float32(xml_path: str | Path) -> int:
    """Mark the float32 tail of the IR at ``xml_path`` and rewrite it in place; returns the number of nodes marked."""
    import openvino as ov

    xml_path = Path(xml_path)
    core = ov.Core()
    model = core.read_model(xml_path)
    tail = float32_tail(model)
    for node in tail:
        if node.get_type_name() not in ("Result", "Constant"):
            node.get_rt_info()[PRECISE_ATTRIBUTE] = ""
    temporary = xml_path.with_name(xml_path.stem + ".precise.xml")
    ov.save_model(model, temporary, compress_to_fp16=False)
    del model
    temporary.replace(xml_path)
    temporary.with_suffix(".bin").replace(xml_path.with_suffix(".bin"))
    return len(tail)
