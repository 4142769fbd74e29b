"""Where the backbone ends in an exported graph, and the nncf scope that keeps its weights in float.

The exported graph runs the whole backbone before the flow head (all three models, and the dynamo exporter keeps
that order): the head, scorer and post-processor are every image-dependent ONNX node after the backbone's last
layer (a ``Conv``, or a ViT block's weighted ``MatMul``). OpenVINO keeps the ONNX node names as its ops' friendly
names, so an nncf ``IgnoredScope`` can name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .extras import require

if TYPE_CHECKING:
    import openvino as ov
    from anomalib.models import AnomalibModule


def backbone_layer_count(module: AnomalibModule, input_size: Sequence[int] | None = None) -> int:
    """Convolutions and linear layers the backbone (``module.model.encoder``) runs for one image (counted with
    forward hooks): a CNN's convolutions, a ViT's patch embedding and its blocks' linear layers."""
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1))
             for layer in module.model.encoder.modules() if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear)]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, 3, *(input_size or (256, 256))))
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


def _layer_positions(graph: Any) -> list[int]:
    """Positions of the ONNX nodes a ``Conv2d`` or ``Linear`` becomes: every ``Conv``, and each ``MatMul``/``Gemm``
    whose second input is a constant (attention's activation products are not layers)."""
    constants = {initializer.name for initializer in graph.initializer}
    constants |= {output for node in graph.node if node.op_type == "Constant" for output in node.output}
    return [index for index, node in enumerate(graph.node) if node.op_type == "Conv"
            or (node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in constants)]


def float_tail_names(onnx_path: str | Path, backbone_layers: int) -> dict[str, str]:
    """``{node name: op type}`` of the image-dependent ONNX nodes after the backbone's last layer, the
    ``backbone_layers``-th (``backbone_layer_count``): flow head, scorer, …. The exporter's per-node module paths are
    not reliable enough: FastFlow's head is attributed to the encoder."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    nodes = list(graph.node)
    layer_positions = _layer_positions(graph)
    if backbone_layers < 1 or len(layer_positions) < backbone_layers:
        msg = f"{onnx_path} has {len(layer_positions)} layer nodes, fewer than the backbone's {backbone_layers}."
        raise ValueError(msg)
    boundary = layer_positions[backbone_layers - 1]
    # only nodes that depend on the image: weight-only subgraphs (e.g. folded flow weights) become constants in OpenVINO
    dynamic = {value.name for value in graph.input}
    depends_on_input = set()
    for node in nodes:
        if any(name in dynamic for name in node.input):
            dynamic.update(node.output)
            depends_on_input.add(node.name)
    return {node.name: node.op_type for node in nodes[boundary + 1 :] if node.name in depends_on_input}


def flow_head_names(module: AnomalibModule, onnx_path: str | Path, input_size: Sequence[int] | None = None) -> set[str]:
    """ONNX names of the flow head's nodes (everything image-dependent after the backbone) of ``module``'s export."""
    return set(float_tail_names(onnx_path, backbone_layer_count(module, input_size)))


WEIGHTED_OPENVINO_OPS = ("Convolution", "GroupConvolution", "MatMul")
MIN_COMPRESSED_WEIGHTS = 4096  # smaller constant weights (the scorer's blur kernels) stay float


def constant_weight_size(op: Any) -> int:
    """Elements of the constant behind ``op``'s weight input (through Convert/Reshape); 0 if it is not constant."""
    node = op.input_value(1).get_node()
    while node.get_type_name() != "Constant" and node.get_input_size():
        node = node.input_value(0).get_node()
    return int(np.prod(list(node.get_output_shape(0)))) if node.get_type_name() == "Constant" else 0


def float_weights_scope(ov_model: ov.Model, onnx_path: str | Path, backbone_layers: int) -> Any:
    """``nncf.IgnoredScope`` of the weighted ops whose weights stay float: the backbone's and the tiny ones."""
    nncf = require("nncf", "Keeping the flow head in float during INT8 quantization")

    tail = set(float_tail_names(onnx_path, backbone_layers))
    weighted = [op for op in ov_model.get_ops() if op.get_type_name() in WEIGHTED_OPENVINO_OPS]
    backbone = [op for op in weighted if op.get_friendly_name().split("/")[0] not in tail]
    if not backbone:
        msg = f"{onnx_path} does not match the OpenVINO model: no backbone convolution found."
        raise ValueError(msg)
    tiny = [op for op in weighted if constant_weight_size(op) < MIN_COMPRESSED_WEIGHTS]
    return nncf.IgnoredScope(names=sorted({op.get_friendly_name() for op in backbone + tiny}), validate=False)
